"""Evaluations during training: the configured `evals.tasks` run on the live train state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lvlm_jax.train import lora as lora_lib
from lvlm_jax.train.metrics_writer import MetricsWriter
from lvlm_jax.train.stages import LossContext, get_stage


def eval_loss_fn(cfg: Any, model: Any) -> Callable[[Any], float]:
    """state -> the held-out loss of the stage on the eval split of the configured source."""
    from lvlm_jax.evals.runners import eval_loss
    from lvlm_jax.train import input_pipeline
    from lvlm_jax.train.stages.base import bind_reference

    stage = get_stage(cfg.stage)
    if lora_lib.enabled(cfg):
        stage = lora_lib.merging_stage(stage)
    ctx = LossContext(model, tuple(cfg.data.image_mean), tuple(cfg.data.image_std),
                      cfg.train.loss_chunk, config=cfg)
    batches = input_pipeline.make_eval_batches(cfg, model.cfg)
    if stage.uses_reference:
        bound = bind_reference(stage)  # outermost: LoRA's merge then sees the policy params
        return lambda state: eval_loss(ctx, bound, (state.params, state.reference), batches())
    return lambda state: eval_loss(ctx, stage, state.params, batches())


def make_evaluator(cfg: Any, model: Any, workdir: str,
                   writer: MetricsWriter) -> Callable[[Any, int], dict]:
    """(state, step) -> the figures of `evals.tasks` (eval_loss as "eval_loss"); per-example
    results go to WORKDIR/eval/step_N/ and rendered examples to TensorBoard (lvlm_jax/evals)."""
    from lvlm_jax.evals.evaluators import task_names
    from lvlm_jax.evals.run import EvalSuite

    loss_of = eval_loss_fn(cfg, model) if "eval_loss" in task_names(cfg) else None
    if loss_of is not None and getattr(get_stage(cfg.stage), "make_rollout", None):
        # A rollout stage's batches are prompts: it has no held-out loss to measure.
        raise ValueError(f"evals.tasks has eval_loss, which stage {cfg.stage!r} cannot compute "
                         "(its batches are sampled rollouts); use generation tasks such as "
                         "vqa or pope")
    suite = EvalSuite(cfg, model, skip=("eval_loss",))  # an unknown task fails here

    def evaluate(state: Any, step: int) -> dict:
        done = {} if loss_of is None else {"eval_loss": ({"eval_loss": loss_of(state)}, [])}
        return suite(step, lora_lib.merge(state.params), workdir, writer, done)

    return evaluate
