"""`lvlm demo`: a tiny LVLM trained end to end on the built-in synthetic set, on CPU.

pretrain (captions) -> sft (question-answer conversations) -> held-out evaluation; prints one
results table and writes DIR/summary.json.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from data_pipelines.loader import SyntheticSource, make_dataset
from data_pipelines.synthetic import SyntheticShapes
from lvlm_jax import config as config_lib
from lvlm_jax.evals.runners import eval_loss, vqa_exact_match
from lvlm_jax.train import input_pipeline, loop
from lvlm_jax.train.stages import LossContext, get_stage

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments", "demo.py")


def _config(stage: str, overrides=()) -> Any:
    cfg = config_lib.load(f"{DEMO_CONFIG}:{stage}", overrides)
    return cfg


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


def held_out_vqa(cfg, setup, tokenizer, n: int = 320) -> tuple[float, list[dict]]:
    size = input_pipeline.image_size(cfg, setup.model.cfg)
    shapes = SyntheticShapes(seed=cfg.seed, image_size=size, split="eval")
    records = [shapes.vqa(i) for i in range(n)]
    return vqa_exact_match(setup.model, jax.device_get(setup.state.params), tokenizer,
                           cfg.data.template, records, image_size=size,
                           image_mean=cfg.data.image_mean, image_std=cfg.data.image_std)


def run_demo(workdir: str, overrides=(), log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    summary: dict[str, Any] = {}

    log("== stage 1/2: pretrain (image-text alignment on captions)")
    cfg = _config("pretrain", overrides)
    setup, hist = loop.train(cfg, os.path.join(workdir, "pretrain"))
    tokenizer = input_pipeline.load_tokenizer(cfg.data)
    summary["pretrain_final_train_loss"] = hist[-1]["loss"] if hist else None
    summary["caption_loss"] = held_out_caption_loss(cfg, setup, tokenizer)
    params = jax.device_get(setup.state.params)

    log("== stage 2/2: sft (visual instruction tuning on question-answer conversations)")
    cfg = _config("sft", overrides)
    setup, hist = loop.train(cfg, os.path.join(workdir, "sft"), init_params=params)
    summary["sft_final_train_loss"] = hist[-1]["loss"] if hist else None
    accuracy, results = held_out_vqa(cfg, setup, tokenizer)
    summary["vqa_accuracy"] = accuracy
    by_kind: dict[str, list[float]] = {}
    shapes = SyntheticShapes(seed=cfg.seed, split="eval")
    for i, r in enumerate(results):
        by_kind.setdefault(shapes.vqa(i)["kind"], []).append(r["correct"])
    summary["vqa_accuracy_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}
    summary["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(workdir, "vqa_results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    rows = [
        ("held-out caption loss (after pretrain)", f"{summary['caption_loss']:.3f}"),
        ("held-out VQA accuracy (after sft)", f"{100 * summary['vqa_accuracy']:.1f}%"),
    ]
    rows += [(f"  {k} questions", f"{100 * v:.1f}%")
             for k, v in summary["vqa_accuracy_by_kind"].items()]
    rows.append(("wall time", f"{summary['wall_seconds']:.0f} s"))
    width = max(len(r[0]) for r in rows) + 2
    lines = ["", "lvlm demo results", "-" * (width + 10)]
    lines += [f"{name:<{width}}{value:>10}" for name, value in rows]
    return "\n".join(lines)
