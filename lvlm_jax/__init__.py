"""lvlm_jax: train large vision-language models in JAX/Flax."""

__version__ = "0.1.0"
