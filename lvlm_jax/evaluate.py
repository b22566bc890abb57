"""`lvlm eval`: a run's checkpoint restored onto the config's mesh, through the evaluators.

Above both the trainer (which knows how to plan the sharded state a checkpoint holds, and the
stages' held-out loss) and `evals/` (which knows nothing of training).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lvlm_jax.evals.evaluators import task_names
from lvlm_jax.evals.run import EvalSuite, step_dir


def checkpoint_steps(workdir: str) -> list[int]:
    from lvlm_jax.checkpoints.manager import checkpoint_dir

    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    # Orbax renames a step's folder to its bare number only once the save is complete.
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _restore_params(workdir: str, abstract_state: Any, step: int) -> Any:
    """The params of a step, read straight onto this run's mesh (not the optimizer state)."""
    from lvlm_jax.checkpoints.manager import restore_params

    return restore_params(workdir, step, target=abstract_state.params)[0]


def _check_workdir(workdir: str, step: int | None) -> int:
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir!r} holds no checkpoint (nothing under "
                                f"{os.path.join(workdir, 'checkpoints')})")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir!r} has no checkpoint of step {step}; it has steps "
                                f"{', '.join(map(str, steps))}")
    return steps[-1] if step is None else step


def evaluate_checkpoint(cfg: Any, workdir: str, step: int | None = None,
                        show_progress: bool = True) -> tuple[int, dict[str, float]]:
    """The configured evaluators (`evals.tasks`, benchmarks read from `evals.data_dir`) on the
    latest (or `step`) checkpoint of `workdir`, batches sharded over the config's mesh, results
    written as during training; returns (step, figures)."""
    import flax.linen as nn

    from lvlm_jax import sharding
    from lvlm_jax.checkpoints.export import check_same_model
    from lvlm_jax.train import input_pipeline, loop, lora
    from lvlm_jax.train.metrics_writer import MetricsWriter
    from lvlm_jax.train.periodic_evals import eval_loss_evaluator

    names = task_names(cfg)  # an unknown task fails before anything is loaded
    step = _check_workdir(workdir, step)
    tokenizer = input_pipeline.load_tokenizer(cfg.data, workdir)  # the run's saved one
    model_cfg = input_pipeline.resolve_model_config(cfg, tokenizer)
    check_same_model(workdir, model_cfg)
    # The config's mesh over this host's devices, sharding the params as training does.
    setup = loop.plan(cfg, model_cfg, dataset_size=max(int(cfg.data.num_examples), 1))
    extra = [eval_loss_evaluator(cfg, setup.model)] if "eval_loss" in names else []
    # Records are read (and a benchmark's missing files reported) before the restore.
    suite = EvalSuite(cfg, setup.model, tokenizer, extra=extra, mesh=setup.mesh,
                      show_progress=show_progress)
    # Adapters of a LoRA run are folded into the kernels the model runs.
    params = lora.merge(_restore_params(workdir, setup.abstract_state, step))
    writer = MetricsWriter(workdir)
    try:
        with sharding.mesh_context(setup.mesh), nn.logical_axis_rules(
                sharding.flax_rules(setup.rules)):
            figures = suite(step, params, workdir, writer)
        writer.write(step, figures)
    finally:
        writer.close()
    return step, figures


def format_summary(step: int, figures: dict[str, float], workdir: str = "") -> str:
    """The figures as a two-column table, then one line per task of summary.json's rows
    (examples scored, skipped by reason, seconds) when `workdir` has them."""
    width = max([len(k) for k in figures] + [6]) + 2
    lines = [f"eval at step {step}" + (f" ({step_dir(workdir, step)})" if workdir else ""),
             "-" * (width + 12)]
    lines += [f"{k:<{width}}{v:>12.4f}" for k, v in figures.items()]
    path = os.path.join(step_dir(workdir, step), "summary.json") if workdir else ""
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f).get("tasks", [])
        if rows:
            lines.append("-" * (width + 12))
        for row in rows:
            skipped = ", ".join(f"{n} {reason}" for reason, n in row["skipped"].items())
            lines.append(f"{row['task']}: {row['examples']} examples in {row['seconds']:.1f} s"
                         + (f" (skipped: {skipped})" if skipped else ""))
    return "\n".join(lines)
