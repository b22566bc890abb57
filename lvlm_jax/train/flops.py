"""Model FLOPs per training step (vision tower, connector, decoder, attention) and MFU against a
table of accelerator peaks (dense bf16)."""

from __future__ import annotations

from typing import Any

import jax

from lvlm_jax.param_paths import flat_paths

# Peak dense bf16 FLOP/s per chip.
PEAK_FLOPS: dict[str, float] = {
    "v4": 275e12,
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


def chip_name(device_kind: str) -> str | None:
    k = device_kind.lower()
    if "tpu" in k:
        if "v6" in k:
            return "v6e"
        if "v5 lite" in k or "v5e" in k:
            return "v5e"
        if "v5" in k:  # "TPU v5" / "TPU v5p"
            return "v5p"
        if "v4" in k:
            return "v4"
    for gpu in ("h200", "h100", "a100"):
        if gpu in k:
            return gpu
    return None


def device_peak(device: jax.Device | None = None) -> float | None:
    device = device or jax.devices()[0]
    name = chip_name(getattr(device, "device_kind", ""))
    return PEAK_FLOPS.get(name) if name else None


def _matmul_params(params: Any, prefix: str) -> int:
    n = 0
    for path, x in flat_paths(params).items():
        if path.startswith(prefix) and path.endswith("kernel") and len(x.shape) >= 2:
            n += int(x.size)
    return n


def train_flops_per_example(cfg: Any, params: Any, seq_len: int, images: int,
                            trainable_vision: bool = False, trainable_language: bool = True
                            ) -> float:
    """6 x matmul params x tokens (+ attention) for the decoder and connector; the vision tower
    counts 2x (forward only) when frozen, 6x when trained; a frozen decoder 4x (its forward and
    the input gradient that reaches the connector, no weight gradient). Follows the
    PaLM/MaxText convention."""
    params = params.get("params", params)
    v, lm = cfg.vision, cfg.decoder_config
    patches = v.grid ** 2 + (1 if v.cls_token else 0)
    vis_mult = 6 if trainable_vision else 2
    vision = vis_mult * _matmul_params(params, "vision/") * patches * images
    vision += vis_mult * 2 * v.depth * patches * patches * v.width * images
    connector = 6 * _matmul_params(params, "connector/") * max(cfg.image_tokens, 1) * images
    lm_matmul = _matmul_params(params, "decoder/")
    if lm.tie_embeddings:
        lm_matmul += lm.vocab_size * lm.embed_dim
    lm_mult = 6 if trainable_language else 4
    decoder = lm_mult * lm_matmul * seq_len
    decoder += lm_mult * 2 * lm.num_layers * seq_len * seq_len * lm.num_heads * lm.resolved_head_dim
    return float(vision + connector + decoder)


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak: float | None) -> float | None:
    if not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * num_devices)
