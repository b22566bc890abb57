"""Visual instruction tuning (LLaVA stage 2): loss on assistant turns; the vision tower frozen."""

from lvlm_jax.train.stages.base import LM_FIELDS, Stage, next_token_loss

STAGE = Stage(
    name="sft",
    loss=next_token_loss,
    fields=LM_FIELDS,
    default_freeze=(r"vision/.*",),
    description="loss on assistant turns of multi-turn, multi-image conversations",
)
