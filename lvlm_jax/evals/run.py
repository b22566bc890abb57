"""Runs the configured evaluators on params and writes what they found, during training and from
`lvlm eval`:

    WORKDIR/eval/step_N/TASK.jsonl    per-example results (one JSON object a line)
    WORKDIR/eval/step_N/summary.json  {"step": N, figure: value, ...}
    metrics.jsonl + TensorBoard       the figures, and `evals.num_rendered` examples per task
                                      rendered as images (eval/TASK/K)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lvlm_jax.evals.evaluators import (
    Evaluator,
    Result,
    build_evaluators,
    runner_settings,
    task_names,
)
from lvlm_jax.evals.model_runner import ModelRunner
from lvlm_jax.evals.render import render_result


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"step_{int(step)}")


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic | np.ndarray):
        return v.tolist()
    return str(v)


def write_results(workdir: str, step: int, evaluators: Sequence[Evaluator],
                  results: Mapping[str, Result], writer: Any = None,
                  num_rendered: int = 0) -> dict[str, float]:
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
        json.dump({"step": int(step), **figures}, f, indent=2)
    if writer is not None and images and hasattr(writer, "write_images"):
        writer.write_images(step, images)
    return figures


class EvalSuite:
    """The evaluators of `cfg.evals.tasks` for one model, records loaded once."""

    def __init__(self, cfg: Any, model: Any, tokenizer: Any = None, skip: Sequence[str] = ()):
        from lvlm_jax.train.input_pipeline import load_tokenizer

        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.data)
        self.settings = runner_settings(cfg, model.cfg)
        self.num_rendered = int(cfg.evals.get("num_rendered", 0))
        self.evaluators = build_evaluators(cfg, model, skip)

    def run(self, params: Any) -> dict[str, Result]:
        runner = ModelRunner(self.model, params, self.tokenizer, **self.settings)
        return {e.name: e.evaluate(runner) for e in self.evaluators}

    def __call__(self, step: int, params: Any, workdir: str, writer: Any = None,
                 done: Mapping[str, Result] | None = None) -> dict[str, float]:
        """Runs every evaluator and writes the results of `step`, with those of tasks `done`
        elsewhere (the loop's eval_loss); returns the figures. `params`: LoRA merged."""
        results = {**(done or {}), **self.run(params)}
        return write_results(workdir, step, self.evaluators, results, writer, self.num_rendered)


def checkpoint_steps(workdir: str) -> list[int]:
    from lvlm_jax.checkpoints.manager import checkpoint_dir

    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    # Orbax renames a step's folder to its bare number only once the save is complete.
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _restore_params(workdir: str, abstract_state: Any, step: int) -> Any:
    """The params of a step, placed on this run's mesh. The whole state is read onto its
    abstract shardings, as a resumed run reads it: orbax refuses a target-less restore of a
    checkpoint saved on another device topology, and a state-only restore is all or nothing."""
    import orbax.checkpoint as ocp

    from lvlm_jax.checkpoints.manager import checkpoint_dir

    with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data")) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"].params


def evaluate_checkpoint(cfg: Any, workdir: str, step: int | None = None
                        ) -> tuple[int, dict[str, float]]:
    """`lvlm eval`: the configured evaluators on the latest (or `step`) checkpoint of
    `workdir`, results written as during training; returns (step, figures)."""
    from lvlm_jax.checkpoints.export import check_same_model
    from lvlm_jax.train import input_pipeline, loop, lora
    from lvlm_jax.train.metrics_writer import MetricsWriter

    task_names(cfg)  # an unknown task fails before anything is loaded
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir!r} holds no checkpoint (nothing under "
                                f"{os.path.join(workdir, 'checkpoints')})")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint of step {step}; it has steps "
                                f"{', '.join(map(str, steps))}")
    tokenizer = input_pipeline.load_tokenizer(cfg.data)
    model_cfg = input_pipeline.resolve_model_config(cfg, tokenizer)
    check_same_model(workdir, model_cfg)
    # The config's mesh over this host's devices, sharding the params as training does.
    setup = loop.plan(cfg, model_cfg, dataset_size=max(int(cfg.data.num_examples), 1))
    step = steps[-1] if step is None else step
    # Adapters of a LoRA run are folded into the kernels the model runs.
    params = lora.merge(_restore_params(workdir, setup.abstract_state, step))
    suite = EvalSuite(cfg, setup.model, tokenizer)
    writer = MetricsWriter(workdir)
    try:
        import flax.linen as nn

        from lvlm_jax import sharding

        with loop.mesh_context(setup.mesh), nn.logical_axis_rules(
                sharding.flax_rules(setup.rules)):
            figures = suite(step, params, workdir, writer)
        writer.write(step, figures)
    finally:
        writer.close()
    return step, figures


def format_summary(step: int, figures: Mapping[str, float], workdir: str = "") -> str:
    """The figures as a two-column table."""
    width = max([len(k) for k in figures] + [6]) + 2
    lines = [f"eval at step {step}" + (f" ({step_dir(workdir, step)})" if workdir else ""),
             "-" * (width + 12)]
    lines += [f"{k:<{width}}{v:>12.4f}" for k, v in figures.items()]
    return "\n".join(lines)
