"""The training stages, by name. Each is a loss plus the batch it needs; see base.Stage."""

from lvlm_jax.train.stages import dpo, grpo, ppo, pretrain, reward, sft
from lvlm_jax.train.stages.base import LossContext, Stage

STAGES: dict[str, Stage] = {"pretrain": pretrain.STAGE, "sft": sft.STAGE,
                            "reward": reward.STAGE, "dpo": dpo.STAGE, "ppo": ppo.STAGE,
                            "grpo": grpo.STAGE}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    return STAGES[name]


__all__ = ["STAGES", "LossContext", "Stage", "get_stage"]
