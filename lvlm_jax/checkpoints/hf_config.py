"""Hugging Face config.json <-> our model-config dicts: LLaVA (with LLaVA-NeXT, LLaVA-NeXT-Video and
LLaVA-OneVision), PaliGemma, DeepSeek-VL and single towers.

A config.json written by transformers may leave out any value equal to its class default (older
versions saved only the differences), so each supported model type carries its defaults here,
copied from transformers 5.x; a missing LLaVA/PaliGemma sub-config takes the defaults those
classes give it. No transformers import: reading a checkpoint needs only numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lvlm_jax.checkpoints.hf_anyres import anyres_from_hf, anyres_to_hf
from lvlm_jax.models.vlm import VLMConfig

# HF class name -> model_type, for configs that name only their architecture.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "PaliGemmaForConditionalGeneration": "paligemma",
    "DeepseekVLForConditionalGeneration": "deepseek_vl",
    "CLIPVisionModel": "clip_vision_model", "CLIPModel": "clip",
    "SiglipVisionModel": "siglip_vision_model", "SiglipModel": "siglip",
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "GemmaForCausalLM": "gemma",
}
# The any-res LLaVAs share LLaVA's weights, plus the learned image_newline.
FAMILIES = {"llava": "llava", "llava_next": "llava", "llava_next_video": "llava",
            "llava_onevision": "llava", "paligemma": "paligemma", "deepseek_vl": "deepseek_vl",
            "clip_vision_model": "vision",
            "clip": "vision", "siglip_vision_model": "vision", "siglip": "vision",
            "llama": "language", "mistral": "language", "qwen2": "language", "gemma": "language"}

_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, num_channels=3, image_size=224)
VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(_VISION, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(_VISION, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
}
_TEXT = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=None, head_dim=None, hidden_act="silu", rms_norm_eps=1e-6,
             rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
             mlp_bias=False, sliding_window=None)
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_TEXT, intermediate_size=11008, max_position_embeddings=2048),
    "mistral": dict(_TEXT, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(_TEXT, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096),
    "gemma": dict(_TEXT, vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                  tie_word_embeddings=True),
}
# What LlavaConfig / PaliGemmaConfig build when a sub-config is absent altogether.
LLAVA_VISION = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                    patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16)
ONEVISION_VISION = dict(model_type="siglip_vision_model", hidden_size=1152,
                        intermediate_size=4304, patch_size=14, image_size=384,
                        num_hidden_layers=26, num_attention_heads=16, vision_use_head=False)
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# Per LLaVA model_type: what its config class fills in for absent keys (transformers 5.x).
LLAVA_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava": dict(vision=LLAVA_VISION, text="llama", image_token_index=32000,
                  vision_feature_layer=-2, vision_feature_select_strategy="default"),
    "llava_next": dict(vision=LLAVA_VISION, text="llama", image_token_index=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_grid_pinpoints=_NEXT_PINPOINTS),
    "llava_next_video": dict(vision=LLAVA_VISION, text="llama", image_token_index=32001,
                             video_token_index=32000, vision_feature_layer=-2,
                             vision_feature_select_strategy="default",
                             image_grid_pinpoints=_NEXT_PINPOINTS, spatial_pool_mode="average",
                             spatial_pool_stride=2),
    "llava_onevision": dict(vision=ONEVISION_VISION, text="qwen2", image_token_index=151646,
                            video_token_index=151647, vision_feature_layer=-1,
                            vision_feature_select_strategy="full",
                            image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7)
                                                  for j in range(1, 7)],
                            vision_aspect_ratio="anyres_max_9"),
}
PALIGEMMA_VISION = dict(model_type="siglip_vision_model", intermediate_size=4096,
                        hidden_size=1152, patch_size=14, image_size=224, num_hidden_layers=27,
                        num_attention_heads=16, vision_use_head=False)
PALIGEMMA_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                      intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                      vocab_size=257152)

# HF activation names -> ours. "gelu_fast" and "gelu_new" are the tanh approximation too.
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "silu": "silu",
                "swish": "silu", "relu": "relu"}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                   "silu": "silu", "relu": "relu"}


def supported_architectures() -> str:
    return ", ".join(ARCHITECTURES)


def hf_model_type(hf: Mapping[str, Any]) -> tuple[str, str]:
    """(model_type, family) of a config.json; ValueError naming an unsupported architecture."""
    archs = list(hf.get("architectures") or [])
    model_type = hf.get("model_type")
    if model_type is None and archs:
        model_type = ARCHITECTURES.get(archs[0])
    known_arch = not archs or any(a in ARCHITECTURES for a in archs)
    if model_type not in FAMILIES or not known_arch:
        name = ", ".join(archs) or model_type or "(no architectures or model_type)"
        raise ValueError(f"unsupported architecture {name!r} (model_type {model_type!r}); "
                         f"supported: {supported_architectures()}")
    return model_type, FAMILIES[model_type]


def _filled(sub: Mapping[str, Any] | None, absent: Mapping[str, Any], where: str,
            table: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A sub-config with its class defaults filled in, and its model_type."""
    sub = dict(absent if sub is None else sub)
    model_type = sub.get("model_type", absent.get("model_type"))
    if model_type not in table:
        raise ValueError(f"unsupported {where} model_type {model_type!r}; supported: "
                         f"{', '.join(table)}")
    return model_type, {**table[model_type], **sub}


def _activation(name: str, where: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported {where} activation {name!r}; supported: "
                         f"{', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _square(value: Any, what: str) -> int:
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {value} is not supported")
        value = value[0]
    return int(value)


def vision_from_hf(sub: Mapping[str, Any] | None, absent: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """A CLIP or SigLIP vision config -> our `model.vision` dict (the tower's final output)."""
    model_type, c = _filled(sub, absent or {}, "vision", VISION_DEFAULTS)
    if int(c["num_channels"]) != 3:
        raise ValueError(f"vision towers with {c['num_channels']} channels are not supported")
    out = dict(image_size=_square(c["image_size"], "image_size"),
               patch_size=_square(c["patch_size"], "patch_size"),
               width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]),
               mlp_dim=int(c["intermediate_size"]), num_heads=int(c["num_attention_heads"]),
               activation=_activation(c["hidden_act"], "vision"),
               norm_eps=float(c["layer_norm_eps"]))
    if model_type == "clip_vision_model":
        out.update(cls_token=True, patch_bias=False, pre_norm=True, post_norm=False)
    else:
        out.update(cls_token=False, patch_bias=True, pre_norm=False, post_norm=True,
                   pool="map" if c.get("vision_use_head", True) else "none")
    return out


def language_from_hf(sub: Mapping[str, Any] | None, absent: Mapping[str, Any] | None = None,
                     bidirectional_ok: bool = False) -> dict[str, Any]:
    """A Llama / Mistral / Qwen2 / Gemma config -> our `model.language` dict.

    Sliding-window attention (Mistral-v0.1, Qwen2 with use_sliding_window) caps `max_length` at
    the window: within it, full attention is the same computation. PaliGemma's decoder
    (`bidirectional_ok`) attends bidirectionally only where no mask says otherwise: the prefix.
    """
    model_type, c = _filled(sub, absent or {}, "text", TEXT_DEFAULTS)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r} (only 'default' RoPE)")
    if c.get("use_bidirectional_attention") and not bidirectional_ok:
        raise ValueError(f"{model_type} with use_bidirectional_attention is not supported "
                         "outside PaliGemma")
    if c["attention_bias"] or c["mlp_bias"]:
        raise ValueError(f"{model_type} with attention_bias/mlp_bias is not supported")
    heads = int(c["num_attention_heads"])
    act = c.get("hidden_activation") or c["hidden_act"]
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy "gelu" as the tanh form
    max_length = int(c["max_position_embeddings"])
    window = c["sliding_window"]
    if window and (model_type == "mistral" or c.get("use_sliding_window")):
        max_length = min(max_length, int(window))
    out = dict(vocab_size=int(c["vocab_size"]), embed_dim=int(c["hidden_size"]),
               num_layers=int(c["num_hidden_layers"]), num_heads=heads,
               num_kv_heads=int(c["num_key_value_heads"] or heads),
               head_dim=int(c["head_dim"] or int(c["hidden_size"]) // heads),
               mlp_dim=int(c["intermediate_size"]), activation=_activation(act, "text"),
               norm_eps=float(c["rms_norm_eps"]),
               rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
               qkv_bias=model_type == "qwen2", tie_embeddings=bool(c["tie_word_embeddings"]),
               max_length=max_length)
    if model_type == "gemma":
        out.update(norm_offset=1.0, scale_embeddings=True)
    return out


def config_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """config.json -> a `vlm_config`-compatible dict.

    LLaVA and PaliGemma give a whole model config; a vision tower gives `{"vision": ...}` and a
    causal LM `{"language": ...}`, fragments to merge into a VLM config.
    """
    model_type, family = hf_model_type(hf)
    if family == "vision":
        sub = hf.get("vision_config") if model_type in ("clip", "siglip") else hf
        absent = {"model_type": f"{model_type.removesuffix('_vision_model')}_vision_model"}
        return {"vision": vision_from_hf(sub, absent)}
    if family == "language":
        return {"language": language_from_hf(hf, {"model_type": model_type})}
    if family == "paligemma":
        text = hf.get("text_config")
        if text is not None and text.get("model_type", "gemma") != "gemma":
            raise ValueError(f"PaliGemma with a {text.get('model_type')!r} decoder (PaliGemma 2) "
                             "is not supported; supported: gemma")
        vision = vision_from_hf(hf.get("vision_config"), PALIGEMMA_VISION)
        language = language_from_hf(text, PALIGEMMA_TEXT, bidirectional_ok=True)
        projection = int((hf.get("vision_config") or {}).get(
            "projection_dim", hf.get("projection_dim", 2048)))
        if projection != language["embed_dim"]:
            raise ValueError(f"PaliGemma projection_dim {projection} differs from the text "
                             f"hidden_size {language['embed_dim']}")
        language["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
        # PaliGemma reads the tower's final (post-layernorm) sequence.
        return dict(vision=vision, language=language, prefix_lm=True,
                    image_token_id=int(hf.get("image_token_index",
                                              hf.get("image_token_id", 256000))),
                    connector=dict(kind="projector", projector="linear", projector_bias=True,
                                   scale_by_inverse_sqrt_embed=True))
    if family == "deepseek_vl":
        # SigLIP's final (post-layernormed) sequence through a 2-layer GELU MLP with biases.
        vision = vision_from_hf(hf.get("vision_config"), {"model_type": "siglip_vision_model"})
        language = language_from_hf(hf.get("text_config"), {"model_type": "llama"})
        language["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
        return dict(vision=vision, language=language, prefix_lm=False,
                    image_token_id=int(hf.get("image_token_id", 100015)),
                    connector=dict(kind="projector", projector="mlp2x_gelu",
                                   projector_bias=True))
    # LLaVA and its any-res / video successors
    d = LLAVA_DEFAULTS[model_type]
    vision = vision_from_hf(hf.get("vision_config"), d["vision"])
    language = language_from_hf(hf.get("text_config"), {"model_type": d["text"]})
    language["tie_embeddings"] |= bool(hf.get("tie_word_embeddings", False))
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported LLaVA projector_hidden_act {act!r}; supported: gelu")
    layer = hf.get("vision_feature_layer", d["vision_feature_layer"])
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single int layer is supported")
    strategy = hf.get("vision_feature_select_strategy", d["vision_feature_select_strategy"])
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    if strategy == "default" and not vision["cls_token"]:
        # transformers then drops the first *patch* token, which our tower cannot express.
        raise ValueError("vision_feature_select_strategy 'default' with a SigLIP tower (no CLS "
                         "token) is not supported; use 'full'")
    vision.update(feature_layer=layer, drop_cls=strategy == "default")
    out = dict(vision=vision, language=language, prefix_lm=False,
               image_token_id=int(hf.get("image_token_index",
                                         hf.get("image_token_id", d["image_token_index"]))),
               connector=dict(kind="projector", projector="mlp2x_gelu",
                              projector_bias=bool(hf.get("multimodal_projector_bias", True))))
    if model_type != "llava":
        out.update(anyres_from_hf(hf, model_type, d))
    return out


def _vision_to_hf(cfg: VLMConfig) -> dict[str, Any]:
    v = cfg.vision
    common = dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                  num_attention_heads=v.num_heads, num_channels=3, image_size=v.image_size,
                  patch_size=v.patch_size, hidden_act=_HF_ACTIVATIONS[v.activation],
                  layer_norm_eps=v.norm_eps)
    if v.cls_token and not v.patch_bias and v.pre_norm and not v.post_norm and v.pool == "none":
        return dict(common, model_type="clip_vision_model")
    if not v.cls_token and v.patch_bias and not v.pre_norm and v.post_norm:
        return dict(common, model_type="siglip_vision_model", vision_use_head=v.pool == "map")
    raise ValueError("the vision tower is neither CLIP- nor SigLIP-shaped; no HF equivalent")


def _text_to_hf(cfg: VLMConfig) -> dict[str, Any]:
    t = cfg.language
    if t.cross_attention_every:
        raise ValueError("a decoder with gated cross-attention has no HF LLaVA/PaliGemma form")
    common = dict(vocab_size=t.vocab_size, hidden_size=t.embed_dim,
                  intermediate_size=t.mlp_dim, num_hidden_layers=t.num_layers,
                  num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                  head_dim=t.resolved_head_dim, hidden_act=_HF_ACTIVATIONS[t.activation],
                  rms_norm_eps=t.norm_eps, max_position_embeddings=t.max_length,
                  tie_word_embeddings=t.tie_embeddings,
                  # Both spellings: transformers 5.x reads the first, 4.x the second.
                  rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
                  rope_theta=t.rope_theta)
    gemma = t.norm_offset == 1.0 and t.scale_embeddings and t.activation == "gelu_tanh"
    plain = t.norm_offset == 0.0 and not t.scale_embeddings and t.activation == "silu"
    if gemma and not t.qkv_bias:
        return dict(common, model_type="gemma")
    if plain and t.qkv_bias:
        return dict(common, model_type="qwen2", use_sliding_window=False)
    if plain:
        return dict(common, model_type="llama", attention_bias=False, mlp_bias=False)
    raise ValueError("the decoder is none of Llama, Qwen2 or Gemma; no HF equivalent")


def config_to_hf(cfg: VLMConfig, dtype: str = "float32") -> tuple[dict[str, Any], str]:
    """Our VLMConfig -> (config.json dict, family 'llava', 'paligemma' or 'deepseek_vl')."""
    c = cfg.connector
    if c.kind != "projector":
        raise ValueError(f"a {c.kind!r} connector has no HF LLaVA/PaliGemma form")
    vision, text = _vision_to_hf(cfg), _text_to_hf(cfg)
    siglip = vision["model_type"] == "siglip_vision_model"
    d = cfg.language.embed_dim
    if cfg.prefix_lm:
        if not (c.projector == "linear" and c.projector_bias and c.scale_by_inverse_sqrt_embed
                and siglip and cfg.vision.feature_layer is None
                and text["model_type"] == "gemma"):
            raise ValueError("a prefix-LM exports as PaliGemma, which needs a SigLIP tower's "
                             "final output, a linear projector with bias and "
                             "scale_by_inverse_sqrt_embed, and a Gemma decoder")
        text["num_image_tokens"] = cfg.vision.num_tokens
        vision["projection_dim"] = d
        return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                    image_token_index=cfg.image_token_id, projection_dim=d, hidden_size=d,
                    vocab_size=cfg.language.vocab_size,
                    tie_word_embeddings=cfg.language.tie_embeddings, dtype=dtype,
                    text_config=text, vision_config=vision), "paligemma"
    if c.projector != "mlp2x_gelu" or c.scale_by_inverse_sqrt_embed:
        raise ValueError(f"projector {c.projector!r} (scale_by_inverse_sqrt_embed="
                         f"{c.scale_by_inverse_sqrt_embed}) has no HF LLaVA form; LLaVA needs "
                         "'mlp2x_gelu'")
    layer = cfg.vision.feature_layer
    if layer is None and siglip:
        # LLaVA reads a hidden state, never SigLIP's post-layernormed output; DeepSeek-VL reads
        # exactly that output, through the same 2-layer GELU MLP (with biases).
        if not c.projector_bias:
            raise ValueError("a SigLIP tower's final output through an MLP projector exports "
                             "as DeepSeek-VL, whose aligner has biases: set "
                             "model.connector.projector_bias=True, or "
                             "model.vision.feature_layer for LLaVA")
        text["tie_word_embeddings"] = cfg.language.tie_embeddings
        return dict(architectures=["DeepseekVLForConditionalGeneration"],
                    model_type="deepseek_vl", image_token_id=cfg.image_token_id,
                    tie_word_embeddings=cfg.language.tie_embeddings, dtype=dtype,
                    text_config=text, vision_config=vision), "deepseek_vl"
    if layer is None:
        layer = -1  # CLIP's final output is its last hidden state
    strategy = "default" if cfg.vision.cls_token and cfg.vision.drop_cls else "full"
    out = dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
               image_token_index=cfg.image_token_id, image_seq_length=cfg.vision.num_tokens,
               projector_hidden_act="gelu", multimodal_projector_bias=c.projector_bias,
               vision_feature_layer=layer, vision_feature_select_strategy=strategy,
               tie_word_embeddings=cfg.language.tie_embeddings, dtype=dtype,
               text_config=text, vision_config=vision)
    return {**out, **anyres_to_hf(cfg)}, "llava"
