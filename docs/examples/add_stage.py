"""docs/add_stage.md's worked example: an SFT stage with label smoothing, registered and trained.

    python docs/examples/add_stage.py        # two steps on the synthetic set, prints the losses
    lvlm train --config=docs/examples/add_stage.py --workdir=/tmp/sft_smooth

This file is also a config file: `lvlm train` executes it to call get_config, and executing it
registers the stage, so `config.stage = "sft_smooth"` resolves. tests/test_docs.py runs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.config import ConfigDict, base_config
from lvlm_jax.train.stages import STAGES, sft
from lvlm_jax.train.stages.base import (
    LM_FIELDS,
    LossContext,
    Stage,
    model_inputs,
    model_variables,
)

NAME = "sft_smooth"


def smoothed_loss(ctx: LossContext, params: Any, batch: dict, rng: jax.Array):
    """(1 - e) * NLL + e * the mean of -log p over the vocabulary, on the supervised tokens.

    Returns sums, not means: the train step divides by the total weight of the whole batch, so
    gradient accumulation and data-parallel shards add up exactly. Metrics are sums too.
    """
    del rng  # a deterministic loss
    eps = STAGE.option(ctx, "label_smoothing", 0.1)  # config.sft_smooth.label_smoothing
    # Full logits are fine at small vocabularies; for 32k+ see losses.chunked_cross_entropy_sum.
    # model_variables: the params plus, in a LoRA run, its adapters for the dense layers.
    logits, _ = ctx.model.apply(model_variables(params), **model_inputs(ctx, batch))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    per_token = (1.0 - eps) * nll - eps * jnp.mean(logp, axis=-1)
    weights = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(per_token * weights), jnp.sum(weights), {"nll": jnp.sum(nll * weights)}


STAGE = Stage(
    name=NAME,
    loss=smoothed_loss,
    fields=LM_FIELDS,  # the batch fields the step receives: sft's
    default_freeze=sft.STAGE.default_freeze,  # vision tower frozen unless optimizer.freeze is set
    description="sft with label-smoothed cross-entropy",
)
STAGES[NAME] = STAGE  # the registration: get_stage(NAME) now finds it


def get_config(arg: str | None = None) -> ConfigDict:
    """A tiny LVLM on the synthetic conversations; `arg` is the label smoothing (default 0.1)."""
    c = base_config()
    c.stage = NAME
    c[NAME] = ConfigDict({"label_smoothing": float(arg) if arg else 0.1})  # the stage's options
    c.model.vision = {"preset": "tiny", "image_size": 32, "patch_size": 8, "depth": 1}
    c.model.language = {"preset": "tiny", "vocab_size": 384, "num_layers": 1}
    c.data.seq_len = 96
    c.data.batch_size = 8
    c.train.total_steps = 20
    c.train.progress = False
    c.train.loss_chunk = 32
    c.optimizer.warmup_steps = 0
    return c


def train(cfg: ConfigDict, steps: int) -> list[dict]:
    """`steps` steps of the one training loop (no workdir, no checkpoints); per-step metrics."""
    from lvlm_jax.train import input_pipeline, loop

    batches, model_cfg, size = input_pipeline.make_input(cfg)
    setup = loop.build(cfg, model_cfg, dataset_size=size)
    _, history = loop.run_steps(setup, batches, steps)
    return history


if __name__ == "__main__":
    for record in train(get_config(), steps=2):
        print(f"loss {record['loss']:.4f}  nll {record['nll']:.4f}")
