"""Direct preference optimisation: the policy's log-likelihood margin of chosen over rejected
responses, relative to the frozen reference model's, through -log sigmoid(beta * ...); with
`dpo.sft_weight` > 0, plus that weight times the chosen responses' per-token NLL (as in RPO,
Pang et al. 2024), which keeps DPO from lowering the likelihood of the chosen answers."""

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
DEFAULT_SFT_WEIGHT = 0.0


def pair_log_probs(ctx: LossContext, params: Any, batch: Mapping[str, Array]) -> Array:
    """Summed log-probabilities of the response tokens [B, 2]: (chosen, rejected) per pair."""
    hidden = pair_hidden(ctx, params, batch)
    lp = sequence_log_probs(ctx, params, hidden, pair_rows(batch, "targets"),
                            pair_rows(batch, "loss_mask"))
    return lp.reshape(-1, 2)


def dpo_terms(policy: Array, reference: Array, beta: float, valid: Array,
              sft_weight: float = 0.0, chosen_tokens: Array | None = None
              ) -> tuple[Array, Array, dict[str, Array]]:
    """policy, reference [B, 2] log-probs -> (sum of losses, number of pairs, metric sums).

    With `sft_weight`, each pair's loss adds sft_weight * -policy_chosen / chosen_tokens [B]."""
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
    losses = -jax.nn.log_sigmoid(margin)
    if sft_weight:
        nll = -policy[:, 0] / jnp.maximum(chosen_tokens, 1.0)
        metrics["chosen_nll"] = jnp.sum(nll * valid)
        losses = losses + sft_weight * nll
    return jnp.sum(losses * valid), jnp.sum(valid), metrics


def dpo_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    del rng
    beta = float(STAGE.option(ctx, "beta", DEFAULT_BETA))
    sft_weight = float(STAGE.option(ctx, "sft_weight", DEFAULT_SFT_WEIGHT))
    policy = pair_log_probs(ctx, params, batch)
    reference = pair_log_probs(ctx, reference_params(ctx), batch)
    # A pair whose response was cut away entirely carries no preference.
    mask = pair_rows(batch, "loss_mask").reshape(policy.shape[0], 2, -1)
    valid = jnp.all((mask > 0).any(axis=-1), axis=1)
    chosen_tokens = jnp.sum(mask[:, 0] > 0, axis=-1).astype(jnp.float32)
    return dpo_terms(policy, jax.lax.stop_gradient(reference), beta, valid, sft_weight,
                     chosen_tokens)


STAGE = Stage(
    name="dpo",
    loss=dpo_loss,
    fields=PREFERENCE_FIELDS,
    default_freeze=(r"vision/.*",),
    description="DPO on chosen/rejected pairs against the frozen starting policy",
    uses_reference=True,
)
