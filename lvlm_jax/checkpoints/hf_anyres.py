"""LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision config.json fields <-> our VLMConfig's any-res
and video fields (image_newline, image_grid_pinpoints, max_num_patches, video_token_id,
video_pool, video_pool_stride). hf_config.py maps the rest, which they share with LLaVA."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lvlm_jax.models.vlm import VLMConfig


def anyres_from_hf(hf: Mapping[str, Any], model_type: str, d: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """LLaVA-NeXT(-Video) / OneVision's fields of our VLMConfig; `d` holds the defaults that
    `model_type`'s config class fills in (hf_config.LLAVA_DEFAULTS)."""
    pinpoints = hf.get("image_grid_pinpoints") or d["image_grid_pinpoints"]
    if not all(isinstance(p, list | tuple) and len(p) == 2 for p in pinpoints):
        raise ValueError(f"image_grid_pinpoints must be [height, width] pairs, got {pinpoints}")
    out = dict(image_newline=True, image_grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints])
    if model_type == "llava_next":
        return out
    out["video_token_id"] = int(hf.get("video_token_index", hf.get("video_token_id",
                                                                   d["video_token_index"])))
    if model_type == "llava_next_video":
        mode = hf.get("spatial_pool_mode", d["spatial_pool_mode"])
        if mode != "average":
            # "max" pools differently and "conv" has weights (vision_resampler.pool.*).
            raise ValueError(f"LLaVA-NeXT-Video spatial_pool_mode {mode!r} is not supported; "
                             "supported: 'average'")
        return dict(out, video_pool="average",
                    video_pool_stride=int(hf.get("spatial_pool_stride",
                                                 d["spatial_pool_stride"])))
    ratio = str(hf.get("vision_aspect_ratio", d["vision_aspect_ratio"]))
    m = re.fullmatch(r"anyres_max_(\d+)", ratio)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"LLaVA-OneVision vision_aspect_ratio {ratio!r} is not supported; "
                         "supported: 'anyres_max_N' with N >= 1")
    return dict(out, video_pool="bilinear", max_num_patches=int(m.group(1)))


def anyres_to_hf(cfg: VLMConfig) -> dict[str, Any]:
    """The LLaVA-NeXT / -Video / OneVision form of a projector LLaVA's any-res and video fields
    ({} for plain LLaVA): the model type follows from the video pooling and the tile cap."""
    anyres = (cfg.image_newline, bool(cfg.image_grid_pinpoints), cfg.max_num_patches > 0,
              cfg.video_token_id >= 0, cfg.video_pool != "none")
    if not any(anyres):
        return {}
    if not (cfg.image_newline and cfg.image_grid_pinpoints):
        raise ValueError("an HF LLaVA-NeXT / OneVision model needs both model.image_newline and "
                         "model.image_grid_pinpoints; plain LLaVA has neither")
    out = dict(image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])
    if cfg.video_pool == "bilinear" or cfg.max_num_patches:
        if cfg.video_pool != "bilinear" or not cfg.max_num_patches or cfg.video_token_id < 0:
            raise ValueError("LLaVA-OneVision needs model.max_num_patches > 0, "
                             "model.video_pool='bilinear' and a model.video_token_id together")
        return dict(out, architectures=["LlavaOnevisionForConditionalGeneration"],
                    model_type="llava_onevision", video_token_index=cfg.video_token_id,
                    vision_aspect_ratio=f"anyres_max_{cfg.max_num_patches}")
    if cfg.video_pool == "average":
        if cfg.video_token_id < 0:
            raise ValueError("LLaVA-NeXT-Video needs a model.video_token_id")
        side = cfg.vision.grid // cfg.video_pool_stride
        return dict(out, architectures=["LlavaNextVideoForConditionalGeneration"],
                    model_type="llava_next_video", video_token_index=cfg.video_token_id,
                    spatial_pool_mode="average", spatial_pool_stride=cfg.video_pool_stride,
                    video_seq_length=side * side)
    if cfg.video_token_id >= 0:
        raise ValueError("a video token without video pooling has no HF form; LLaVA-NeXT-Video "
                         "pools 'average', OneVision 'bilinear'")
    return dict(out, architectures=["LlavaNextForConditionalGeneration"],
                model_type="llava_next")
