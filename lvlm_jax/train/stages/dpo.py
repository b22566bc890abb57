"""Direct preference optimisation: the policy's log-likelihood margin of chosen over rejected
responses, relative to the frozen reference model's, through -log sigmoid(beta * ...)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.train.stages.base import (
    PREFERENCE_FIELDS,
    LossContext,
    Stage,
    pair_hidden,
    pair_rows,
    reference_params,
    sequence_log_probs,
)

Array = jax.Array
DEFAULT_BETA = 0.1


def pair_log_probs(ctx: LossContext, params: Any, batch: Mapping[str, Array]) -> Array:
    """Summed log-probabilities of the response tokens [B, 2]: (chosen, rejected) per pair."""
    hidden = pair_hidden(ctx, params, batch)
    lp = sequence_log_probs(ctx, params, hidden, pair_rows(batch, "targets"),
                            pair_rows(batch, "loss_mask"))
    return lp.reshape(-1, 2)


def dpo_terms(policy: Array, reference: Array, beta: float, valid: Array
              ) -> tuple[Array, Array, dict[str, Array]]:
    """policy, reference [B, 2] log-probs -> (sum of losses, number of pairs, metric sums)."""
    valid = valid.astype(jnp.float32)
    rewards = beta * (policy - reference)  # the implicit rewards of chosen and rejected
    margin = rewards[:, 0] - rewards[:, 1]
    metrics = {
        "reward_accuracy": jnp.sum((margin > 0) * valid),
        "reward_margin": jnp.sum(margin * valid),
        "chosen_reward": jnp.sum(rewards[:, 0] * valid),
        "rejected_reward": jnp.sum(rewards[:, 1] * valid),
        "chosen_logp": jnp.sum(policy[:, 0] * valid),
        "rejected_logp": jnp.sum(policy[:, 1] * valid),
    }
    return jnp.sum(-jax.nn.log_sigmoid(margin) * valid), jnp.sum(valid), metrics


def dpo_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    del rng
    beta = float(STAGE.option(ctx, "beta", DEFAULT_BETA))
    policy = pair_log_probs(ctx, params, batch)
    reference = pair_log_probs(ctx, reference_params(ctx), batch)
    # A pair whose response was cut away entirely carries no preference.
    valid = jnp.all((pair_rows(batch, "loss_mask") > 0).any(axis=-1).reshape(-1, 2), axis=1)
    return dpo_terms(policy, jax.lax.stop_gradient(reference), beta, valid)


STAGE = Stage(
    name="dpo",
    loss=dpo_loss,
    fields=PREFERENCE_FIELDS,
    default_freeze=(r"vision/.*",),
    description="DPO on chosen/rejected pairs against the frozen starting policy",
    uses_reference=True,
)
