"""Evaluations during training: the configured `evals.tasks` run on the live train state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from lvlm_jax.train import lora as lora_lib
from lvlm_jax.train.metrics_writer import MetricsWriter
from lvlm_jax.train.stages import LossContext, get_stage
from lvlm_jax.train.stages.base import Stage, batch_fields


def eval_loss(ctx: LossContext, stage: Stage, params: Any, batches: Iterable[dict]) -> float:
    """Token-weighted mean loss of `stage` over host-local batches (one device is enough for
    the small eval sets this is used on)."""
    fn = jax.jit(lambda p, b: stage.loss(ctx, p, b, jax.random.PRNGKey(0))[:2])
    total = weight = 0.0
    for batch in batches:
        t, w = fn(params, {f: batch[f] for f in batch_fields(stage, ctx.config)})
        total, weight = total + float(t), weight + float(w)
    return total / max(weight, 1.0)


def eval_loss_fn(cfg: Any, model: Any) -> Callable[[Any], float]:
    """state -> the held-out loss of the stage on the eval split of the configured source."""
    from lvlm_jax.train import input_pipeline
    from lvlm_jax.train.stages.base import bind_reference

    stage = get_stage(cfg.stage)
    if lora_lib.enabled(cfg):
        stage = lora_lib.adapted_stage(stage, cfg.lora)
    ctx = LossContext(model, tuple(cfg.data.image_mean), tuple(cfg.data.image_std),
                      cfg.train.loss_chunk, config=cfg)
    batches = input_pipeline.make_eval_batches(cfg, model.cfg)
    if stage.uses_reference:
        bound = bind_reference(stage)  # outermost: LoRA's wrapper then sees the policy params
        return lambda state: eval_loss(ctx, bound, (state.params, state.reference), batches())
    return lambda state: eval_loss(ctx, stage, state.params, batches())


def eval_loss_evaluator(cfg: Any, model: Any) -> Any:
    """`lvlm eval`'s eval_loss task: the held-out loss of the run's stage, on params with any
    LoRA adapters already merged."""
    from lvlm_jax.evals.evaluators import Evaluator
    from lvlm_jax.train import input_pipeline

    stage = get_stage(cfg.stage)
    if getattr(stage, "uses_reference", False):
        raise ValueError(f"eval_loss of stage {cfg.stage!r} needs the frozen reference model; "
                         "it is logged during training (evals.every_steps) instead")
    ctx = LossContext(model, tuple(cfg.data.image_mean), tuple(cfg.data.image_std),
                      cfg.train.loss_chunk, config=cfg)
    batches = input_pipeline.make_eval_batches(cfg, model.cfg)
    run = lambda runner, records, max_new_tokens: (  # noqa: E731
        {"eval_loss": eval_loss(ctx, stage, runner.params, batches())}, [])
    return Evaluator("eval_loss", run)


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
    from lvlm_jax.train.input_pipeline import load_tokenizer

    # An unknown task, or a benchmark's missing files, fail here, before the first step.
    suite = EvalSuite(cfg, model, load_tokenizer(cfg.data), skip=("eval_loss",))

    def evaluate(state: Any, step: int) -> dict:
        done = {} if loss_of is None else {"eval_loss": ({"eval_loss": loss_of(state)}, [])}
        return suite(step, lora_lib.merge(state.params), workdir, writer, done)

    return evaluate
