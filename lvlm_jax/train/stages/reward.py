"""Reward modelling: the LVLM's hidden state at the last real token of a response, through a
scalar head, trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.train.stages.base import (
    PREFERENCE_FIELDS,
    LossContext,
    Stage,
    last_token_index,
    model_inputs,
    model_variables,
    pair_hidden,
    pair_rows,
)

Array = jax.Array
HEAD = "reward_head"


def init_head(rng: Array, model_cfg: Any) -> dict[str, Any]:
    """{"reward_head": {"kernel": [embed, 1], "bias": [1]}}, float32 and replicated (tiny)."""
    d = model_cfg.language.embed_dim
    kernel = jax.random.normal(rng, (d, 1), jnp.float32) / math.sqrt(d)
    return {HEAD: {"kernel": kernel, "bias": jnp.zeros((1,), jnp.float32)}}


def head_scores(params: Any, hidden: Array, segment_ids: Array) -> Array:
    """hidden [b, T, D] -> the scalar reward of each row [b], read at its last real token."""
    last = jnp.maximum(last_token_index(segment_ids), 0)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    head = params[HEAD]
    return (h.astype(jnp.float32) @ head["kernel"])[:, 0] + head["bias"][0]


def score(ctx: LossContext, params: Any, inputs: Mapping[str, Array]) -> Array:
    """Rewards [b] of single sequences (input_ids, segment_ids, positions, pixel_values and,
    optionally, the loss_mask marking the response), e.g. a reward model scoring rollouts."""
    hidden, _ = ctx.model.apply(model_variables(params), **model_inputs(ctx, inputs),
                                return_hidden=True)
    return head_scores(params, hidden, inputs["segment_ids"])


def bradley_terry(r_chosen: Array, r_rejected: Array, valid: Array
                  ) -> tuple[Array, Array, dict[str, Array]]:
    """(sum of -log sigmoid(r_c - r_r), number of pairs, metric sums) over the valid pairs."""
    valid = valid.astype(jnp.float32)
    margin = r_chosen - r_rejected
    metrics = {
        "reward_accuracy": jnp.sum((margin > 0) * valid),
        "reward_margin": jnp.sum(margin * valid),
        "chosen_reward": jnp.sum(r_chosen * valid),
        "rejected_reward": jnp.sum(r_rejected * valid),
    }
    return jnp.sum(-jax.nn.log_sigmoid(margin) * valid), jnp.sum(valid), metrics


def reward_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    del rng
    segments = pair_rows(batch, "segment_ids")
    rewards = head_scores(params, pair_hidden(ctx, params, batch), segments).reshape(-1, 2)
    valid = jnp.all((last_token_index(segments) >= 0).reshape(-1, 2), axis=1)
    return bradley_terry(rewards[:, 0], rewards[:, 1], valid)


# loss_mask stays: it marks where the prompt ends (prefix-LM prefix, resampler instruction).
REWARD_FIELDS = tuple(f for f in PREFERENCE_FIELDS if not f.endswith("_targets"))

STAGE = Stage(
    name="reward",
    loss=reward_loss,
    fields=REWARD_FIELDS,
    default_freeze=(r"vision/.*",),
    description="Bradley-Terry loss of a scalar head on the last token of chosen vs rejected",
    extra_params=init_head,
)
