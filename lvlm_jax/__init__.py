"""lvlm_jax: train large vision-language models in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import lvlm_jax` stays light; the HF loader pulls in jax and the models on first use.
    if name == "from_pretrained":
        from lvlm_jax.api import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'lvlm_jax' has no attribute {name!r}")
