"""Runs the configured evaluators on params and writes what they found, during training and from
`lvlm eval`:

    WORKDIR/eval/step_N/TASK.jsonl    per-example results (one JSON object a line)
    WORKDIR/eval/step_N/summary.json  {"step": N, figure: value, ..., "tasks": [one row a task:
                                      {"task", "examples", "skipped": {reason: n}, "seconds",
                                      its figures}]}
    metrics.jsonl + TensorBoard       the figures, and `evals.num_rendered` examples per task
                                      rendered as images (eval/TASK/K)

Nothing here imports the trainer: a caller with a model, params and a tokenizer runs evaluators.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lvlm_jax.evals.evaluators import (
    Evaluator,
    Result,
    build_evaluators,
    runner_settings,
)
from lvlm_jax.evals.model_runner import ModelRunner
from lvlm_jax.evals.render import render_result


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"step_{int(step)}")


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic | np.ndarray):
        return v.tolist()
    return str(v)


def task_row(evaluator: Evaluator | None, name: str, result: Result,
             seconds: float = 0.0) -> dict[str, Any]:
    """The summary row of one task: its figures, how many examples were scored and how many
    were skipped by reason (by its reader, or for an image that would not decode)."""
    summary, examples = result
    skipped = dict(evaluator.skipped) if evaluator is not None else {}
    if evaluator is not None and evaluator.records and examples:
        unreadable = len(evaluator.records) - len(examples)
        if unreadable > 0:
            skipped["unreadable image"] = unreadable
    return {"task": name, "examples": len(examples), "skipped": skipped,
            "seconds": round(float(seconds), 3), **{k: float(v) for k, v in summary.items()}}


def write_results(workdir: str, step: int, evaluators: Sequence[Evaluator],
                  results: Mapping[str, Result], writer: Any = None,
                  num_rendered: int = 0, seconds: Mapping[str, float] | None = None
                  ) -> dict[str, float]:
    """Writes per-example JSONL and summary.json under WORKDIR/eval/step_N (process 0 only) and
    renders the first `num_rendered` examples of each task to `writer`'s TensorBoard; returns
    all tasks' figures in one flat dict."""
    figures: dict[str, float] = {}
    for name in results:
        figures.update({k: float(v) for k, v in results[name][0].items()})
    if jax.process_index() != 0:
        return figures
    out = step_dir(workdir, step)
    os.makedirs(out, exist_ok=True)
    images = {}
    by_name = {e.name: e for e in evaluators}
    rows = [task_row(by_name.get(name), name, result, (seconds or {}).get(name, 0.0))
            for name, result in results.items()]
    for name, (_, examples) in results.items():
        if not examples:
            continue
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, default=_json_default) + "\n")
        records = by_name[name].records if name in by_name else []
        for k, ex in enumerate(examples[:num_rendered]):
            if "index" in ex and ex["index"] < len(records):
                images[f"eval/{name}/{k}"] = render_result(records[ex["index"]], ex)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"step": int(step), **figures, "tasks": rows}, f, indent=2)
    if writer is not None and images and hasattr(writer, "write_images"):
        writer.write_images(step, images)
    return figures


class EvalSuite:
    """The evaluators of `cfg.evals.tasks` for one model, records loaded once. `extra`:
    evaluators built elsewhere (the trainer's eval_loss); `mesh`: batches are sharded over its
    batch axes; `show_progress`: a bar per task."""

    def __init__(self, cfg: Any, model: Any, tokenizer: Any, skip: Sequence[str] = (),
                 extra: Sequence[Evaluator] = (), mesh: Any = None,
                 show_progress: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = {**runner_settings(cfg, model.cfg), "mesh": mesh,
                         "show_progress": show_progress}
        self.num_rendered = int(cfg.evals.get("num_rendered", 0))
        self.evaluators = build_evaluators(cfg, model, skip, extra)
        self.seconds: dict[str, float] = {}

    def run(self, params: Any) -> dict[str, Result]:
        runner = ModelRunner(self.model, params, self.tokenizer, **self.settings)
        results = {}
        for e in self.evaluators:
            start = time.perf_counter()
            results[e.name] = e.evaluate(runner)
            self.seconds[e.name] = time.perf_counter() - start
        return results

    def __call__(self, step: int, params: Any, workdir: str, writer: Any = None,
                 done: Mapping[str, Result] | None = None) -> dict[str, float]:
        """Runs every evaluator and writes the results of `step`, with those of tasks `done`
        elsewhere (the loop's eval_loss); returns the figures. `params`: LoRA merged."""
        results = {**(done or {}), **self.run(params)}
        return write_results(workdir, step, self.evaluators, results, writer, self.num_rendered,
                             self.seconds)
