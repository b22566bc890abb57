"""`lvlm demo`: a tiny LVLM trained end to end on the built-in synthetic set, on CPU.

pretrain (captions) -> sft (questions and descriptions) -> dpo (faithful vs hallucinated
descriptions) -> ppo, and grpo from the same dpo params (exact-match reward on questions), with
held-out evaluations between the stages; prints one results table and writes DIR/summary.json,
DIR/loss_curves.png and DIR/examples.png. `--seeds=N` runs it N times in DIR/seed_K/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from data_pipelines.loader import SyntheticSource, make_dataset
from data_pipelines.synthetic import SyntheticShapes
from lvlm_jax import config as config_lib
from lvlm_jax import demo_plots, demo_report
from lvlm_jax.evals.evaluators import chair_eval, pope_eval
from lvlm_jax.evals.runners import sampled_reward, vqa_exact_match
from lvlm_jax.train import input_pipeline, loop
from lvlm_jax.train.periodic_evals import eval_loss
from lvlm_jax.train.stages import LossContext, get_stage

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "demo.py")
STAGES = ("pretrain", "sft", "dpo", "ppo", "grpo")
TITLES = {"pretrain": "image-text alignment on captions", "sft": "visual instruction tuning",
          "dpo": "preference tuning on descriptions", "ppo": "RL with an exact-match reward",
          "grpo": "RL with group-normalised rewards, from the dpo params"}
# Held-out examples per evaluation (the eval split: scenes never seen in training). "rl": the
# RL stages' fixed prompt set, each prompt answered RL_SAMPLES times.
EVAL_EXAMPLES = {"caption": 256, "vqa": 320, "pope": 300, "chair": 128, "rl": 128}
RL_SAMPLES = 4
RL_PROMPTS_FROM = 100_000  # eval-split indices of the RL prompts, apart from the VQA set's
EXAMPLES_SHOWN = 8
Overrides = Sequence[tuple[str, str]]


def _config(stage: str, overrides: Overrides = ()) -> Any:
    return config_lib.load(f"{DEMO_CONFIG}:{stage}", overrides)


def held_out_caption_loss(cfg, setup, tokenizer, n: int = 256) -> float:
    model_cfg = setup.model.cfg
    size = input_pipeline.image_size(cfg, model_cfg)
    source = SyntheticSource("caption", n, seed=cfg.seed, image_size=size, split="eval")
    batches = make_dataset(source, kind="caption", tokenizer=tokenizer, template="plain",
                           seq_len=cfg.data.seq_len, image_size=size,
                           image_tokens=model_cfg.image_tokens, batch_size=32, seed=0,
                           shuffle=False, num_epochs=1)
    ctx = LossContext(setup.model, tuple(cfg.data.image_mean), tuple(cfg.data.image_std),
                      cfg.train.loss_chunk)
    return eval_loss(ctx, get_stage("pretrain"), jax.device_get(setup.state.params), batches)


def eval_records(cfg, model, n: int, start: int = 0) -> list[dict]:
    """Held-out VQA records `start`..`start + n` of the eval split (scenes never trained on)."""
    size = input_pipeline.image_size(cfg, model.cfg)
    shapes = SyntheticShapes(seed=cfg.seed, image_size=size, split="eval")
    return [shapes.vqa(i) for i in range(start, start + n)]


def _image_kw(cfg, model) -> dict[str, Any]:
    return {"image_size": input_pipeline.image_size(cfg, model.cfg),
            "image_mean": cfg.data.image_mean, "image_std": cfg.data.image_std}


def held_out_vqa(cfg, model, params, tokenizer, n: int = 320, records: Sequence[dict] = ()
                 ) -> tuple[float, list[dict]]:
    records = list(records) or eval_records(cfg, model, n)
    accuracy, results = vqa_exact_match(model, params, tokenizer, cfg.data.template, records,
                                        **_image_kw(cfg, model))
    for record, result in zip(records, results, strict=True):
        result["kind"] = record["kind"]
    return accuracy, results


def held_out_rl(cfg, model, params, tokenizer, records: Sequence[dict]) -> dict[str, float]:
    """The RL stages' figures on a fixed prompt set: the mean rule reward of RL_SAMPLES answers
    sampled per prompt as the stage samples them (its temperature, its max_new_tokens), the
    same random numbers for every params; and the greedy answers' exact match."""
    section = cfg[cfg.stage]
    kw = {**_image_kw(cfg, model), "max_new_tokens": int(section.max_new_tokens)}
    reward = sampled_reward(model, params, tokenizer, cfg.data.template, records,
                            samples=RL_SAMPLES, temperature=float(section.temperature),
                            seed=cfg.seed, **kw)
    accuracy, _ = vqa_exact_match(model, params, tokenizer, cfg.data.template, records, **kw)
    return {"reward": reward, "accuracy": accuracy}


def _by_kind(results: Sequence[dict]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(r["kind"], []).append(r["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _runner_kw(cfg) -> dict[str, Any]:
    return {"seed": cfg.seed, "image_mean": cfg.data.image_mean,
            "image_std": cfg.data.image_std}


def _hallucination(cfg, model, params, tokenizer, n: int, temperature: float = 1.0
                   ) -> dict[str, float]:
    """CHAIR of free descriptions of held-out images: chair_i is the hallucination rate.

    Sampled (temperature 1, the same random numbers for every params) by default: sft learns
    the noisy descriptions' distribution, an absent object in about half of them, but each
    place an object could be added is a minority choice, so greedy decoding hides what the
    model would say; a well-trained sft model hallucinates nothing greedily, and greedy
    CHAIR then cannot show what dpo changed."""
    return chair_eval(model, params, tokenizer, cfg.data.template, num_examples=n,
                      max_new_tokens=40, temperature=temperature, sample_seed=cfg.seed,
                      **_runner_kw(cfg))


def _mean(history: Sequence[dict], key: str, part: slice) -> float | None:
    values = [h[key] for h in history[part] if key in h]
    return sum(values) / len(values) if values else None


def run_demo(workdir: str, overrides: Overrides = (), log: Callable[[str], Any] = print,
             stage_overrides: Mapping[str, Overrides] | None = None,
             eval_examples: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Runs the stages in `workdir`; `overrides` apply to every stage's config and
    `stage_overrides[stage]` to one stage's; `eval_examples` replaces EVAL_EXAMPLES' sizes."""
    t0 = time.perf_counter()
    check_workdir(workdir, overrides)
    os.makedirs(workdir, exist_ok=True)
    stage_overrides = stage_overrides or {}
    n = {**EVAL_EXAMPLES, **(eval_examples or {})}
    summary: dict[str, Any] = {"stage_seconds": {}}

    def stage(name: str, params: Any = None):
        log(f"== stage {STAGES.index(name) + 1}/{len(STAGES)}: {name} ({TITLES[name]})")
        start = time.perf_counter()
        cfg = _config(name, [*overrides, *stage_overrides.get(name, ())])
        setup, history = loop.train(cfg, os.path.join(workdir, name), init_params=params)
        summary["stage_seconds"][name] = time.perf_counter() - start
        summary[f"{name}_final_train_loss"] = history[-1]["loss"] if history else None
        return cfg, setup, history, jax.device_get(setup.state.params)

    cfg, setup, _, params = stage("pretrain")
    tokenizer = input_pipeline.load_tokenizer(cfg.data)
    summary["caption_loss"] = held_out_caption_loss(cfg, setup, tokenizer, n["caption"])

    cfg, setup, _, params = stage("sft", params)
    model = setup.model
    vqa_records = eval_records(cfg, model, n["vqa"])
    summary["vqa_accuracy"], results = held_out_vqa(cfg, model, params, tokenizer,
                                                    records=vqa_records)
    summary["vqa_accuracy_by_kind"] = _by_kind(results)
    pope = pope_eval(model, params, tokenizer, cfg.data.template, num_examples=n["pope"],
                     **_runner_kw(cfg))
    summary.update({k: v for k, v in pope.items() if k.startswith("pope_")})
    before = _hallucination(cfg, model, params, tokenizer, n["chair"])
    summary["hallucination_rate_before"] = before["chair_i"]
    summary["hallucinated_descriptions_before"] = before["chair_s"]
    summary["object_recall_before"] = before["chair_recall"]
    summary["hallucination_rate_greedy_before"] = _hallucination(
        cfg, model, params, tokenizer, n["chair"], temperature=0.0)["chair_i"]

    cfg, _, history, dpo_params = stage("dpo", params)
    summary["dpo_reward_accuracy"] = _mean(history, "reward_accuracy", slice(-5, None))
    after = _hallucination(cfg, model, dpo_params, tokenizer, n["chair"])
    summary["hallucination_rate_after"] = after["chair_i"]
    summary["hallucinated_descriptions_after"] = after["chair_s"]
    summary["object_recall_after"] = after["chair_recall"]
    summary["hallucination_rate_greedy_after"] = _hallucination(
        cfg, model, dpo_params, tokenizer, n["chair"], temperature=0.0)["chair_i"]
    summary["vqa_accuracy_after_dpo"], _ = held_out_vqa(cfg, model, dpo_params, tokenizer,
                                                        records=vqa_records)
    rl_records = eval_records(cfg, model, n["rl"], start=RL_PROMPTS_FROM)
    # Both RL stages start from the dpo params and are measured on the same prompts, each
    # sampled as that stage samples (the same random numbers before and after).
    measured: dict[tuple, dict[str, float]] = {}
    for name, prefix in (("ppo", "rl"), ("grpo", "grpo")):
        rl_cfg = _config(name, [*overrides, *stage_overrides.get(name, ())])
        key = (float(rl_cfg[name].temperature), int(rl_cfg[name].max_new_tokens))
        if key not in measured:
            measured[key] = held_out_rl(rl_cfg, model, dpo_params, tokenizer, rl_records)
        summary[f"{prefix}_reward_before"] = measured[key]["reward"]
        summary[f"{prefix}_accuracy_before"] = measured[key]["accuracy"]
        cfg, _, history, rl_params = stage(name, dpo_params)
        summary[f"{name}_reward_first"] = _mean(history, "reward", slice(0, 3))
        summary[f"{name}_reward_last"] = _mean(history, "reward", slice(-3, None))
        rl = held_out_rl(cfg, model, rl_params, tokenizer, rl_records)
        summary[f"{prefix}_reward_after"] = rl["reward"]
        summary[f"{prefix}_accuracy_after"] = rl["accuracy"]
        if name == "ppo":
            summary["vqa_accuracy_after_ppo"], _ = held_out_vqa(cfg, model, rl_params,
                                                                tokenizer, records=vqa_records)

    summary["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "vqa_results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    _figures(workdir, vqa_records, results)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(demo_report.format_table(summary))
    return summary


def _figures(workdir: str, records: Sequence[dict], results: Sequence[dict]) -> None:
    """loss_curves.png (every stage's training loss; the RL stages' rollout reward) and
    examples.png (held-out questions, sft's answers)."""
    demo_plots.plot_loss_curves(workdir, STAGES, os.path.join(workdir, "loss_curves.png"),
                                metrics={"ppo": "reward", "grpo": "reward"})
    shown = [{"image": rec["image"], "question": res["question"],
              "answer": res["prediction"], "reference": res["answer"]}
             for rec, res in list(zip(records, results, strict=True))[:EXAMPLES_SHOWN]]
    demo_plots.plot_examples(shown, os.path.join(workdir, "examples.png"))


def check_workdir(workdir: str, overrides: Overrides = ()) -> None:
    """Fails with one line, before anything is written, when `workdir` is a file or holds a
    run of another model (at its top or in a stage's folder)."""
    from lvlm_jax.checkpoints.export import check_same_model

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory")
    dirs = [d for d in (workdir, *(os.path.join(workdir, s) for s in STAGES))
            if os.path.exists(os.path.join(d, "model_config.json"))]
    if not dirs:
        return
    cfg = _config("sft", overrides)
    model_cfg = input_pipeline.resolve_model_config(cfg, input_pipeline.load_tokenizer(cfg.data))
    for d in dirs:
        if d == workdir:
            raise ValueError(f"--workdir={workdir} holds an `lvlm train` run; the demo writes "
                             "one folder per stage: use a new or empty workdir")
        check_same_model(d, model_cfg)


def run_demo_seeds(workdir: str, seeds: int, overrides: Overrides = (),
                   log: Callable[[str], Any] = print, **kw: Any) -> dict[str, Any]:
    """The demo for seeds 0..seeds-1, each in WORKDIR/seed_K/; prints every figure of every
    seed with its median and min-max and writes them to WORKDIR/summary.json."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory")
    runs = [(k, os.path.join(workdir, f"seed_{k}"), [*overrides, ("seed", str(k))])
            for k in range(seeds)]
    for _, path, ov in runs:  # every seed's folder is checked before the first one trains
        check_workdir(path, ov)
    summaries = []
    for k, path, ov in runs:
        log(f"==== seed {k} ({k + 1} of {seeds}): {path}")
        summaries.append(run_demo(path, ov, log=log, **kw))
    env = demo_report.environment()
    result = {"seeds": list(range(seeds)), "environment": env,
              "figures": demo_report.aggregate(summaries),
              "per_seed": {str(k): s for k, s in enumerate(summaries)}}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(demo_report.format_seeds_table(summaries, list(range(seeds)), env))
    return result
