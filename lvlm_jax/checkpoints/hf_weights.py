"""Which HF tensor is which of our parameters, and how each is laid out on either side.

Names are first made canonical, whatever the file's layout: `vision.<rest>` for the tower
(`vision_tower.`, `model.vision_tower.`, optionally followed by `vision_model.`), `text.<rest>`
for the decoder (`language_model.model.`, `model.language_model.`), `lm_head.weight`,
`projector.<rest>` and LLaVA-NeXT's `image_newline`. The spec then pairs each canonical name with
an unscanned parameter path (`decoder/stack/layers_0/...`) and a transform kind:

  dense_in   torch Linear [out, in] <-> kernel [in, *out_axes] (q/k/v: [embed, heads, head_dim])
  dense_out  torch Linear [out, in] <-> kernel [*in_axes, out] (o_proj: [heads, head_dim, embed])
  vec        a bias or norm weight, reshaped (q/k/v biases are [heads, head_dim] here)
  copy       the same array on both sides (embeddings, CLS token, SigLIP's probe)
  conv       torch Conv2d [out, in, kh, kw] <-> flax Conv [kh, kw, in, out]

SigLIP's attention-pooling head packs q, k and v into one `in_proj_weight`; its entries carry
`part` (0, 1, 2) of 3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from lvlm_jax.models.language import LanguageConfig
from lvlm_jax.models.vision import VisionConfig


class Entry(NamedTuple):
    hf: str  # canonical HF name
    ours: str  # '/'-joined unscanned path below the "params" collection
    kind: str
    part: int = 0
    parts: int = 1


# (pattern, canonical prefix) per checkpoint family; the first match wins.
_LAYOUTS = {
    "vlm": [
        (r"(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
        (r"(?:model\.)?multi_modal_projector\.", "projector."),
        (r"(?:language_model\.)?lm_head\.", "lm_head."),
        (r"(?:model\.)?language_model\.(?:model\.)?", "text."),
        (r"(?:model\.)?(?=image_newline$)", ""),  # LLaVA-NeXT / OneVision
    ],
    "deepseek_vl": [
        (r"(?:model\.)?vision_model\.(?:vision_model\.)?", "vision."),
        (r"(?:model\.)?aligner\.", "projector."),
        (r"lm_head\.", "lm_head."),
        (r"(?:model\.)?language_model\.(?:model\.)?", "text."),
    ],
    "vision": [(r"vision_model\.", "vision."), (r"(?=embeddings\.|encoder\.|pre_layrnorm\.|"
                                                r"post_layernorm\.|head\.)", "vision.")],
    "language": [(r"lm_head\.", "lm_head."), (r"model\.", "text.")],
}
# Tensors a checkpoint may carry that no model of ours has: buffers, and the other half of a
# CLIP/SigLIP dual encoder.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|position_ids)$|(text_model|text_projection|"
                      r"visual_projection|logit_scale|logit_bias)(\.|$)")
# Where our export writes each canonical prefix: the hub layout, which transformers 4.x and
# 5.x both load.
EXPORT_PREFIX = {"vision.": "vision_tower.vision_model.", "projector.": "multi_modal_projector.",
                 "lm_head.": "language_model.lm_head.", "text.": "language_model.model.",
                 "image_newline": "image_newline"}
EXPORT_PREFIXES = {"llava": EXPORT_PREFIX, "paligemma": EXPORT_PREFIX,
                   "deepseek_vl": {"vision.": "model.vision_model.", "projector.": "model.aligner.",
                                   "lm_head.": "lm_head.", "text.": "model.language_model."}}


def canonical_names(names: Iterable[str], family: str) -> dict[str, str]:
    """Canonical name -> the file's name; ValueError on unknown or doubled tensors."""
    layout = _LAYOUTS["vlm" if family in ("llava", "paligemma") else family]
    out: dict[str, str] = {}
    unknown = []
    for name in sorted(names):
        for pattern, prefix in layout:
            m = re.match(pattern, name)
            if m:
                canon = prefix + name[m.end():]
                if canon in out:
                    raise ValueError(f"tensors {out[canon]!r} and {name!r} are the same "
                                     "parameter in two key layouts")
                out[canon] = name
                break
        else:
            if not _IGNORED.match(name):
                unknown.append(name)
    if unknown:
        raise ValueError(f"{len(unknown)} tensors of the checkpoint have no place in a "
                         f"{family} model, e.g. {unknown[:5]}")
    return out


def _attention(hf: str, ours: str, out: str, bias: bool) -> list[Entry]:
    entries = []
    for p in ("q_proj", "k_proj", "v_proj"):
        entries.append(Entry(f"{hf}.{p}.weight", f"{ours}/{p}/kernel", "dense_in"))
        if bias:
            entries.append(Entry(f"{hf}.{p}.bias", f"{ours}/{p}/bias", "vec"))
    entries.append(Entry(f"{hf}.{out}.weight", f"{ours}/{out}/kernel", "dense_out"))
    if bias:
        entries.append(Entry(f"{hf}.{out}.bias", f"{ours}/{out}/bias", "vec"))
    return entries


def _layer_norm(hf: str, ours: str) -> list[Entry]:
    return [Entry(f"{hf}.weight", f"{ours}/scale", "vec"),
            Entry(f"{hf}.bias", f"{ours}/bias", "vec")]


def _linear(hf: str, ours: str, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", f"{ours}/kernel", "dense_in")]
    return out + ([Entry(f"{hf}.bias", f"{ours}/bias", "vec")] if bias else [])


def vision_spec(v: VisionConfig) -> list[Entry]:
    e = [Entry("vision.embeddings.patch_embedding.weight", "vision/patch_embedding/kernel",
               "conv"),
         Entry("vision.embeddings.position_embedding.weight", "vision/position_embedding",
               "copy")]
    if v.patch_bias:
        e.append(Entry("vision.embeddings.patch_embedding.bias", "vision/patch_embedding/bias",
                       "vec"))
    if v.cls_token:
        e.append(Entry("vision.embeddings.class_embedding", "vision/class_embedding", "copy"))
    if v.pre_norm:
        e += _layer_norm("vision.pre_layrnorm", "vision/pre_layernorm")  # sic: HF's spelling
    if v.post_norm or v.cls_token:
        e += _layer_norm("vision.post_layernorm", "vision/post_layernorm")
    for i in range(v.depth):
        hf, ours = f"vision.encoder.layers.{i}", f"vision/layers_{i}"
        e += _layer_norm(f"{hf}.layer_norm1", f"{ours}/layer_norm1")
        e += _layer_norm(f"{hf}.layer_norm2", f"{ours}/layer_norm2")
        e += _attention(f"{hf}.self_attn", f"{ours}/self_attn", "out_proj", bias=True)
        e += _linear(f"{hf}.mlp.fc1", f"{ours}/mlp/fc1") + _linear(f"{hf}.mlp.fc2",
                                                                    f"{ours}/mlp/fc2")
    if v.pool == "map":
        hf, ours = "vision.head", "vision/head"
        e.append(Entry(f"{hf}.probe", f"{ours}/probe", "copy"))
        for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
            e.append(Entry(f"{hf}.attention.in_proj_weight", f"{ours}/attention/{p}/kernel",
                           "dense_in", j, 3))
            e.append(Entry(f"{hf}.attention.in_proj_bias", f"{ours}/attention/{p}/bias", "vec",
                           j, 3))
        e += [Entry(f"{hf}.attention.out_proj.weight", f"{ours}/attention/out_proj/kernel",
                    "dense_out"),
              Entry(f"{hf}.attention.out_proj.bias", f"{ours}/attention/out_proj/bias", "vec")]
        e += _layer_norm(f"{hf}.layernorm", f"{ours}/layernorm")
        e += _linear(f"{hf}.mlp.fc1", f"{ours}/mlp/fc1") + _linear(f"{hf}.mlp.fc2",
                                                                    f"{ours}/mlp/fc2")
    return e


def language_spec(t: LanguageConfig) -> list[Entry]:
    e = [Entry("text.embed_tokens.weight", "decoder/embed_tokens/embedding", "copy"),
         Entry("text.norm.weight", "decoder/final_norm/scale", "vec")]
    if not t.tie_embeddings:
        e.append(Entry("lm_head.weight", "decoder/lm_head/kernel", "dense_in"))
    for i in range(t.num_layers):
        hf, ours = f"text.layers.{i}", f"decoder/stack/layers_{i}"
        e.append(Entry(f"{hf}.input_layernorm.weight", f"{ours}/input_norm/scale", "vec"))
        e.append(Entry(f"{hf}.post_attention_layernorm.weight",
                       f"{ours}/post_attention_norm/scale", "vec"))
        e += _attention(f"{hf}.self_attn", f"{ours}/self_attn", "o_proj", bias=False)
        if t.qkv_bias:
            e += [Entry(f"{hf}.self_attn.{p}.bias", f"{ours}/self_attn/{p}/bias", "vec")
                  for p in ("q_proj", "k_proj", "v_proj")]
        for p in ("gate_proj", "up_proj", "down_proj"):
            e.append(Entry(f"{hf}.mlp.{p}.weight", f"{ours}/mlp/{p}/kernel", "dense_in"))
    return e


def projector_spec(family: str, bias: bool) -> list[Entry]:
    if family == "paligemma":
        return _linear("projector.linear", "connector/linear_1", bias)
    if family == "deepseek_vl":
        return (_linear("projector.linear1", "connector/linear_1", bias)
                + _linear("projector.linear2", "connector/linear_2", bias))
    return (_linear("projector.linear_1", "connector/linear_1", bias)
            + _linear("projector.linear_2", "connector/linear_2", bias))


def to_ours(a: np.ndarray, entry: Entry, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor (already sliced to its part) -> our parameter of `shape`."""
    if entry.kind in ("dense_in", "dense_out"):
        if a.ndim != 2:
            raise ValueError(f"{entry.hf}: expected a 2-d Linear weight, got shape {a.shape}")
        a = a.T
    elif entry.kind == "conv":
        if a.ndim != 4:
            raise ValueError(f"{entry.hf}: expected a 4-d Conv2d weight, got shape {a.shape}")
        a = a.transpose(2, 3, 1, 0)
    if a.size != int(np.prod(shape)) or (entry.kind in ("copy", "conv") and a.shape != shape):
        raise ValueError(f"{entry.hf} has shape {a.shape}; {entry.ours} needs {shape}")
    return a.reshape(shape)


def to_hf(a: np.ndarray, entry: Entry) -> np.ndarray:
    """Our parameter -> its HF tensor (one part of it, for packed tensors)."""
    if entry.kind == "dense_in":
        return a.reshape(a.shape[0], -1).T
    if entry.kind == "dense_out":
        return a.reshape(-1, a.shape[-1]).T
    if entry.kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if entry.kind == "vec":
        return a.reshape(-1)
    return a
