"""Pure Flax modules of the LVLM: vision tower, decoder LM, connectors and the assembled model."""

from lvlm_jax.models.connectors import ConnectorConfig, connector_config
from lvlm_jax.models.language import Decoder, LanguageConfig, init_cache, language_config
from lvlm_jax.models.vision import VisionConfig, VisionEncoder, vision_config
from lvlm_jax.models.vlm import (
    VLM,
    VLMConfig,
    build_model,
    dummy_inputs,
    for_platform,
    vlm_config,
)

__all__ = [
    "ConnectorConfig", "connector_config", "Decoder", "LanguageConfig", "init_cache",
    "language_config", "VisionConfig", "VisionEncoder", "vision_config", "VLM", "VLMConfig",
    "build_model", "dummy_inputs", "for_platform", "vlm_config",
]
