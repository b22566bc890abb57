"""`lvlm demo`: a tiny LVLM trained end to end on the built-in synthetic set, on CPU.

pretrain (captions) -> sft (questions and descriptions) -> dpo (faithful vs hallucinated
descriptions) -> a short ppo (exact-match reward on questions), with held-out evaluations between
the stages; prints one results table and writes DIR/summary.json.
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
from lvlm_jax.evals.evaluators import chair_eval, pope_eval
from lvlm_jax.evals.runners import eval_loss, vqa_exact_match
from lvlm_jax.train import input_pipeline, loop
from lvlm_jax.train.stages import LossContext, get_stage

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "demo.py")
STAGES = ("pretrain", "sft", "dpo", "ppo")
# Held-out examples per evaluation (the eval split: scenes never seen in training).
EVAL_EXAMPLES = {"caption": 256, "vqa": 320, "pope": 300, "chair": 128}
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


def held_out_vqa(cfg, model, params, tokenizer, n: int = 320) -> tuple[float, list[dict]]:
    size = input_pipeline.image_size(cfg, model.cfg)
    shapes = SyntheticShapes(seed=cfg.seed, image_size=size, split="eval")
    records = [shapes.vqa(i) for i in range(n)]
    accuracy, results = vqa_exact_match(model, params, tokenizer, cfg.data.template, records,
                                        image_size=size, image_mean=cfg.data.image_mean,
                                        image_std=cfg.data.image_std)
    for record, result in zip(records, results, strict=True):
        result["kind"] = record["kind"]
    return accuracy, results


def _by_kind(results: Sequence[dict]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(r["kind"], []).append(r["correct"])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _runner_kw(cfg) -> dict[str, Any]:
    return {"seed": cfg.seed, "image_mean": cfg.data.image_mean,
            "image_std": cfg.data.image_std}


def _hallucination(cfg, model, params, tokenizer, n: int) -> dict[str, float]:
    """CHAIR of free descriptions of held-out images: chair_i is the hallucination rate."""
    return chair_eval(model, params, tokenizer, cfg.data.template, num_examples=n,
                      max_new_tokens=40, **_runner_kw(cfg))


def _mean(history: Sequence[dict], key: str, part: slice) -> float | None:
    values = [h[key] for h in history[part] if key in h]
    return sum(values) / len(values) if values else None


def run_demo(workdir: str, overrides: Overrides = (), log: Callable[[str], Any] = print,
             stage_overrides: Mapping[str, Overrides] | None = None,
             eval_examples: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Runs the four stages in `workdir`; `overrides` apply to every stage's config and
    `stage_overrides[stage]` to one stage's; `eval_examples` replaces EVAL_EXAMPLES' sizes."""
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    stage_overrides = stage_overrides or {}
    n = {**EVAL_EXAMPLES, **(eval_examples or {})}
    summary: dict[str, Any] = {"stage_seconds": {}}

    def stage(name: str, number: int, title: str, params: Any = None):
        log(f"== stage {number}/{len(STAGES)}: {name} ({title})")
        start = time.perf_counter()
        cfg = _config(name, [*overrides, *stage_overrides.get(name, ())])
        setup, history = loop.train(cfg, os.path.join(workdir, name), init_params=params)
        summary["stage_seconds"][name] = time.perf_counter() - start
        summary[f"{name}_final_train_loss"] = history[-1]["loss"] if history else None
        return cfg, setup, history, jax.device_get(setup.state.params)

    cfg, setup, _, params = stage("pretrain", 1, "image-text alignment on captions")
    tokenizer = input_pipeline.load_tokenizer(cfg.data)
    summary["caption_loss"] = held_out_caption_loss(cfg, setup, tokenizer, n["caption"])

    cfg, setup, _, params = stage("sft", 2, "visual instruction tuning", params)
    model = setup.model
    summary["vqa_accuracy"], results = held_out_vqa(cfg, model, params, tokenizer, n["vqa"])
    summary["vqa_accuracy_by_kind"] = _by_kind(results)
    pope = pope_eval(model, params, tokenizer, cfg.data.template, num_examples=n["pope"],
                     **_runner_kw(cfg))
    summary.update({k: v for k, v in pope.items() if k.startswith("pope_")})
    before = _hallucination(cfg, model, params, tokenizer, n["chair"])
    summary["hallucination_rate_before"] = before["chair_i"]
    summary["hallucinated_descriptions_before"] = before["chair_s"]
    summary["object_recall_before"] = before["chair_recall"]

    cfg, _, history, params = stage("dpo", 3, "preference tuning on descriptions", params)
    summary["dpo_reward_accuracy"] = _mean(history, "reward_accuracy", slice(-5, None))
    after = _hallucination(cfg, model, params, tokenizer, n["chair"])
    summary["hallucination_rate_after"] = after["chair_i"]
    summary["hallucinated_descriptions_after"] = after["chair_s"]
    summary["object_recall_after"] = after["chair_recall"]

    cfg, _, history, params = stage("ppo", 4, "RL with an exact-match reward", params)
    summary["ppo_reward_first"] = _mean(history, "reward", slice(0, 3))
    summary["ppo_reward_last"] = _mean(history, "reward", slice(-3, None))
    summary["vqa_accuracy_after_ppo"], _ = held_out_vqa(cfg, model, params, tokenizer, n["vqa"])

    summary["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "vqa_results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(format_table(summary))
    return summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_table(summary: dict[str, Any]) -> str:
    rows = [
        ("held-out caption loss (after pretrain)", f"{summary['caption_loss']:.3f}"),
        ("held-out VQA accuracy (after sft)", _pct(summary["vqa_accuracy"])),
    ]
    rows += [(f"  {k} questions", _pct(v)) for k, v in summary["vqa_accuracy_by_kind"].items()]
    rows += [
        ("POPE accuracy (after sft)", _pct(summary["pope_accuracy"])),
        ("POPE F1", _pct(summary["pope_f1"])),
        ("POPE yes-ratio", _pct(summary["pope_yes_ratio"])),
        ("hallucination rate, CHAIR-i (after sft)", _pct(summary["hallucination_rate_before"])),
        ("hallucination rate, CHAIR-i (after dpo)", _pct(summary["hallucination_rate_after"])),
        ("descriptions with a hallucination (sft)",
         _pct(summary["hallucinated_descriptions_before"])),
        ("descriptions with a hallucination (dpo)",
         _pct(summary["hallucinated_descriptions_after"])),
        ("dpo reward accuracy (last steps)", _pct(summary["dpo_reward_accuracy"])),
        ("ppo mean reward (first -> last steps)",
         f"{_pct(summary['ppo_reward_first'])} -> {_pct(summary['ppo_reward_last'])}"),
        ("held-out VQA accuracy (after ppo)", _pct(summary["vqa_accuracy_after_ppo"])),
        ("wall time", f"{summary['wall_seconds']:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    value_width = max(10, *(len(r[1]) for r in rows))
    lines = ["", "lvlm demo results", "-" * (width + value_width)]
    lines += [f"{name:<{width}}{value:>{value_width}}" for name, value in rows]
    return "\n".join(lines)
