"""GRPO: `group_size` responses sampled per prompt, each scored by a rule and/or a reward model,
advantages normalised within the group (no value head), and the clipped policy loss plus
kl_coef * the k3 KL estimate against the frozen reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.train.rl_math import (
    grpo_advantages,
    kl_k3,
    masked_mean,
    ppo_policy_loss,
    response_log_probs,
)
from lvlm_jax.train.rollout import Rollout, option, stage_fields
from lvlm_jax.train.stages.base import LossContext
from lvlm_jax.train.stages.ppo import RolloutStage

Array = jax.Array
DEFAULTS = {"kl_coef": 0.04, "clip_eps": 0.2, "group_size": 4, "temperature": 1.0}


def _opt(cfg: Any, key: str) -> Any:
    return option(cfg, "grpo", key, DEFAULTS[key])


@dataclasses.dataclass(frozen=True)
class GroupAdvantages:
    """Score -> advantages normalised within each prompt's group of samples."""

    group_size: int

    def __call__(self, sampled: Mapping[str, Array], score: Array):
        mask = sampled["response_mask"]
        fields = {f: sampled[f] for f in STAGE.fields if f in sampled}
        fields["advantages"] = grpo_advantages(score[:, 0], mask, self.group_size)
        groups = score[:, 0].reshape(-1, self.group_size)
        # A group whose samples all scored the same carries no learning signal.
        return fields, {"reward_std_in_group": jnp.mean(jnp.std(groups, axis=1)),
                        "solved_groups": jnp.mean(jnp.max(groups, axis=1) > 0)}


def make_rollout(setup: Any, tokenizer: Any = None) -> Rollout:
    group = int(_opt(setup.cfg, "group_size"))
    return Rollout(setup, "grpo", GroupAdvantages(group), tokenizer=tokenizer, group_size=group)


def grpo_loss(ctx: LossContext, params: Any, batch: Mapping[str, Array], rng: Array):
    """(sum over response tokens of clipped policy + kl_coef * k3 KL, their count, metrics)."""
    del rng
    cfg = ctx.config
    mask = batch["response_mask"]
    logp, _ = response_log_probs(ctx.model, params, batch, ctx.pixels(batch), mask.shape[1],
                                 ctx.loss_chunk, float(_opt(cfg, "temperature")))
    policy, clip_fraction = ppo_policy_loss(logp, batch["old_log_probs"], batch["advantages"],
                                            mask, float(_opt(cfg, "clip_eps")))
    kl = masked_mean(kl_k3(logp, batch["ref_log_probs"]), mask)
    count = jnp.sum(mask)
    means = {"policy_loss": policy, "kl": kl, "clip_fraction": clip_fraction}
    total = (policy + float(_opt(cfg, "kl_coef")) * kl) * count
    return total, count, {k: v * count for k, v in means.items()}


STAGE = RolloutStage(
    name="grpo",
    loss=grpo_loss,
    fields=stage_fields(("ref_log_probs", "advantages")),
    default_freeze=(r"vision/.*",),
    description="GRPO: group-normalised rewards of sampled responses, clipped loss + KL",
    uses_reference=True,
    make_rollout=make_rollout,
)
