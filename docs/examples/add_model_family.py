"""docs/add_model_family.md's worked example: a decoder preset registered from user code, a tiny
VLM built from it, and the HF key map that `lvlm import` would use for it.

    python docs/examples/add_model_family.py   # prints the logits' shape and a few HF names

tests/test_docs.py runs it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lvlm_jax.checkpoints.hf import export_hf, import_hf
from lvlm_jax.checkpoints.hf_weights import language_spec
from lvlm_jax.models import build_model, dummy_inputs, language, vlm_config
from lvlm_jax.param_paths import flat_paths

# A Qwen2-style decoder at toy sizes: grouped-query attention, biases on q/k/v, tied embeddings.
language.PRESETS["toy_qwen2"] = dict(
    vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
    qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, max_length=256)

MODEL = {
    # 32 px, patch 8: 16 image tokens; LLaVA reads a hidden state (here the last layer's).
    "vision": {"preset": "tiny", "feature_layer": -1},
    "language": {"preset": "toy_qwen2"},  # what `config.model.language` would say
    "connector": {"kind": "projector", "projector": "mlp2x_gelu"},
    "image_token_id": 5,
}


def inputs(cfg, batch: int = 2, length: int = 24) -> tuple[jax.Array, jax.Array]:
    """Token ids with one image's placeholder block at position 1, and random pixels."""
    ids = jnp.full((batch, length), 7, jnp.int32)
    ids = ids.at[:, 1:1 + cfg.image_tokens].set(cfg.image_token_id)
    size = cfg.vision.image_size
    return ids, jax.random.uniform(jax.random.PRNGKey(1), (batch, 1, size, size, 3))


def build(scan_layers: bool = True):
    """(model, params, logits) of a VLM whose decoder is the preset's."""
    values = {**MODEL, "language": {**MODEL["language"], "scan_layers": scan_layers}}
    cfg = vlm_config(values)  # resolves the preset, then applies the other keys over it
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), **dummy_inputs(cfg))["params"]
    logits, _ = jax.jit(model.apply)({"params": params}, *inputs(cfg))
    return model, params, logits


def hf_key_map() -> dict[str, str]:
    """Our '/'-joined parameter path -> the canonical HF tensor name (`text.` stands for the
    checkpoint's `language_model.model.` or `model.` prefix), for the unscanned model."""
    cfg = vlm_config({**MODEL, "language": {**MODEL["language"], "scan_layers": False}})
    return {entry.ours: entry.hf for entry in language_spec(cfg.language)}


def hf_round_trip(out_dir: str) -> tuple[jax.Array, jax.Array]:
    """Exports the model as an HF LLaVA folder (a `qwen2` text_config) and imports it back:
    (logits before, logits of the imported model) on the same inputs."""
    model, params, logits = build(scan_layers=False)
    export_hf(model.cfg, params, out_dir)
    cfg, imported = import_hf(out_dir, scan_layers=False)  # the preset's fields, spelled out
    imported_model = build_model(cfg)
    again, _ = jax.jit(imported_model.apply)({"params": imported}, *inputs(imported_model.cfg))
    return logits, again


def decoder_paths(params: Any) -> list[str]:
    return sorted("decoder/" + p for p in flat_paths(params["decoder"]))


if __name__ == "__main__":
    _, params, logits = build()
    print("logits", logits.shape)  # (2, 24, 256)
    for path, hf in list(hf_key_map().items())[:6]:
        print(f"{path:45s} <- {hf}")
