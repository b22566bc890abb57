"""PPO: responses sampled from the policy, scored by a rule and/or a trained reward model, a
per-token KL penalty against the frozen reference folded into the rewards, GAE advantages from a
value head on the policy's hidden states, then the clipped policy and value losses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.train.rl_math import (
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    response_log_probs,
)
from lvlm_jax.train.rollout import Rollout, option, stage_fields
from lvlm_jax.train.stages.base import LossContext, Stage

Array = jax.Array
HEAD = "value_head"
DEFAULTS = {"kl_coef": 0.05, "clip_eps": 0.2, "value_clip_eps": 0.2, "vf_coef": 0.1,
            "gamma": 1.0, "lam": 0.95, "whiten_advantages": True,
            # False: the value loss trains the value head only. Its gradient through the
            # shared trunk moves the policy by the critic's error, which early in a run (a head
            # that has seen a few batches) is mostly noise.
            "value_grad_to_trunk": False, "temperature": 1.0}


@dataclasses.dataclass(frozen=True)
class RolloutStage(Stage):
    """A stage whose batch a rollout makes: the loop calls `make_rollout(setup)` once, then the
    rollout on every prompt batch before the jitted step (see train/rollout.py)."""

    make_rollout: Callable[[Any], Rollout] | None = None


def init_value_head(rng: Array, model_cfg: Any) -> dict[str, Any]:
    """{"value_head": {"kernel": [embed, 1], "bias": [1]}}, float32 and replicated (tiny).

    Zeros: a fresh head values every state at 0, so the first advantages are the (whitened)
    returns, a policy gradient with the batch mean as baseline. A random head would add values
    of spread ~1 to 0/1 rewards, and the advantages of the first steps would be mostly its
    noise."""
    del rng
    d = model_cfg.language.embed_dim
    return {HEAD: {"kernel": jnp.zeros((d, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}}


def values(params: Any, hidden: Array) -> Array:
    """Hidden states [b, n, D] -> the value of each state [b, n]."""
    head = params[HEAD]
    return (hidden.astype(jnp.float32) @ head["kernel"])[..., 0] + head["bias"][0]


def kl_penalised_rewards(score: Array, log_probs: Array, ref_log_probs: Array, mask: Array,
                         kl_coef: float) -> Array:
    """Per-token rewards [b, n]: -kl_coef * (log p - log p_ref) on every response token, plus
    the sequence's score [b] on its last token."""
    mask = mask.astype(jnp.float32)
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
    at_last = jax.nn.one_hot(last, mask.shape[1], dtype=jnp.float32) * mask
    return (-kl_coef * kl_k1(log_probs, ref_log_probs) + score[:, None] * at_last) * mask


def _opt(cfg: Any, key: str) -> Any:
    return option(cfg, "ppo", key, DEFAULTS[key])


@dataclasses.dataclass(frozen=True)
class PPOAdvantages:
    """Score -> KL-penalised per-token rewards -> GAE advantages (whitened) and returns."""

    kl_coef: float
    gamma: float
    lam: float
    whiten: bool

    def __call__(self, sampled: Mapping[str, Array], score: Array):
        mask = sampled["response_mask"]
        rewards = kl_penalised_rewards(score[:, 0], sampled["old_log_probs"],
                                       sampled["ref_log_probs"], mask, self.kl_coef)
        adv, returns = gae(rewards, sampled["old_values"], mask, self.gamma, self.lam)
        if self.whiten:
            adv = masked_whiten(adv, mask)
        fields = {f: sampled[f] for f in STAGE.fields if f in sampled}
        fields.update(advantages=adv, returns=returns)
        return fields, {"value_mean": masked_mean(sampled["old_values"], mask),
                        "return_mean": masked_mean(returns, mask)}


def make_rollout(setup: Any, tokenizer: Any = None) -> Rollout:
    cfg = setup.cfg
    advantages = PPOAdvantages(*(float(_opt(cfg, k)) for k in ("kl_coef", "gamma", "lam")),
                               whiten=bool(_opt(cfg, "whiten_advantages")))
    return Rollout(setup, "ppo", advantages, values=values, tokenizer=tokenizer)


def ppo_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    """(sum over response tokens of policy + vf_coef * value loss, their count, metric sums)."""
    del rng
    cfg = ctx.config
    mask = batch["response_mask"]
    n = mask.shape[1]
    logp, hidden = response_log_probs(ctx.model, params, batch, ctx.pixels(batch), n,
                                      ctx.loss_chunk, float(_opt(cfg, "temperature")))
    policy, clip_fraction = ppo_policy_loss(logp, batch["old_log_probs"], batch["advantages"],
                                            mask, float(_opt(cfg, "clip_eps")))
    if not bool(_opt(cfg, "value_grad_to_trunk")):
        hidden = jax.lax.stop_gradient(hidden)
    value, value_clip = ppo_value_loss(values(params, hidden), batch["old_values"],
                                       batch["returns"], mask, float(_opt(cfg, "value_clip_eps")))
    count = jnp.sum(mask)
    means = {"policy_loss": policy, "value_loss": value, "clip_fraction": clip_fraction,
             "value_clip_fraction": value_clip,
             # how far this step's policy has moved from the one that sampled
             "approx_kl": masked_mean(kl_k3(logp, batch["old_log_probs"]), mask)}
    total = (policy + float(_opt(cfg, "vf_coef")) * value) * count
    return total, count, {k: v * count for k, v in means.items()}


STAGE = RolloutStage(
    name="ppo",
    loss=ppo_loss,
    fields=stage_fields(("old_values", "advantages", "returns")),
    default_freeze=(r"vision/.*",),
    description="PPO on sampled responses: clipped policy + value loss, KL-penalised rewards",
    uses_reference=True,
    extra_params=init_value_head,
    make_rollout=make_rollout,
)
