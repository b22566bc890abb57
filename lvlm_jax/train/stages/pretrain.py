"""Image-text alignment pretraining (LLaVA stage 1): caption loss, only the connector trains."""

from lvlm_jax.train.stages.base import LM_FIELDS, Stage, next_token_loss

STAGE = Stage(
    name="pretrain",
    loss=next_token_loss,
    fields=LM_FIELDS,
    default_freeze=(r"vision/.*", r"decoder/.*"),
    description="caption loss on image-text pairs; the vision tower and the LM are frozen",
)
