"""Hugging Face interop: import LLaVA (-NeXT, -NeXT-Video, -OneVision), PaliGemma, DeepSeek-VL and
single towers; export the VLMs.

    cfg, params = import_hf("llava-1.5-7b-hf")     # numpy params, scanned layout by default
    model = build_model(cfg); model.apply({"params": params}, ids, pixels)
    export_hf(cfg, params, "out/")                 # config.json + model.safetensors

Reading needs only numpy (no torch, no transformers). Both key layouts load: what transformers
5.x writes (`vision_tower.*`, `language_model.model.*`) and the hub's older and newer ones
(`vision_tower.vision_model.*`, `model.language_model.*`, `model.vision_tower.*`). Export writes
the hub layout, which transformers 4.x and 5.x both load.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax.checkpoints.hf_config import config_from_hf, config_to_hf, hf_model_type
from lvlm_jax.checkpoints.hf_safetensors import open_checkpoint, write_safetensors
from lvlm_jax.checkpoints.hf_weights import (
    EXPORT_PREFIXES,
    Entry,
    canonical_names,
    language_spec,
    projector_spec,
    to_hf,
    to_ours,
    vision_spec,
)
from lvlm_jax.models import layers
from lvlm_jax.models.language import Decoder, language_config
from lvlm_jax.models.scan_utils import stack_layers, unstack_layers
from lvlm_jax.models.vision import VisionEncoder, vision_config
from lvlm_jax.models.vlm import VLMConfig, build_model, dummy_inputs, vlm_config
from lvlm_jax.param_paths import flat_paths

__all__ = ["config_from_hf", "export_hf", "import_hf", "read_hf_config"]


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    """config.json of an HF checkpoint folder; a clear error when the folder is not one."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir} is not a directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face checkpoint: it has no "
                                "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is not a JSON object")
    return hf


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = [os.path.join(hf_dir, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{index} names shard {f}, which does not exist")
        return files
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        other = glob.glob(os.path.join(hf_dir, "*.bin")) + glob.glob(
            os.path.join(hf_dir, "*.pth"))
        hint = " (it has PyTorch .bin/.pth weights: re-save them as safetensors)" if other else ""
        raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights{hint}")
    return files


def _spec(cfg: Mapping[str, Any], family: str) -> list[Entry]:
    spec = []
    if "vision" in cfg:
        spec += vision_spec(vision_config(**cfg["vision"]))
    if "language" in cfg:
        spec += language_spec(language_config(**cfg["language"]))
    if "connector" in cfg:
        spec += projector_spec(family, cfg["connector"].get("projector_bias", True))
    if cfg.get("image_newline"):
        spec.append(Entry("image_newline", "image_newline", "copy"))
    return spec


def _expected_shapes(cfg: Mapping[str, Any], family: str) -> dict[str, tuple[int, ...]]:
    """Unscanned parameter path -> shape, from tracing init (nothing is allocated)."""
    unscanned = {k: dict(v, scan_layers=False) if k in ("vision", "language") else v
                 for k, v in cfg.items()}
    rng = jax.random.PRNGKey(0)
    if family == "vision":
        v = vision_config(**unscanned["vision"])
        shapes = jax.eval_shape(VisionEncoder(v).init, rng, jnp.zeros(
            (1, v.image_size, v.image_size, 3)))
        prefix = "vision/"
    elif family == "language":
        t = language_config(**unscanned["language"])
        ids = jnp.zeros((1, 2), jnp.int32)
        # Through embed() as well: the embedding table is only created when used.
        shapes = jax.eval_shape(functools.partial(
            Decoder(t).init, method=lambda m, i: m(m.embed(i), i, i + 1)), rng, ids)
        prefix = "decoder/"
    else:
        model = build_model(unscanned)
        shapes = jax.eval_shape(model.init, rng, **dummy_inputs(model.cfg))
        prefix = ""
    flat = flat_paths(nn.meta.unbox(shapes)["params"])
    return {prefix + k: tuple(v.shape) for k, v in flat.items()}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _check_spec(spec: list[Entry], shapes: Mapping[str, Any]) -> None:
    # Every parameter of the model must come from somewhere: a gap is a bug in the spec.
    mapped = {e.ours for e in spec}
    if mapped != set(shapes):
        raise AssertionError(f"HF weight spec out of sync with the model: unmapped "
                             f"{sorted(set(shapes) - mapped)[:5]}, unknown "
                             f"{sorted(mapped - set(shapes))[:5]}")


def import_hf(hf_dir: str, *, scan_layers: bool = True, param_dtype: str = "float32"
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """An HF checkpoint folder -> (model config dict, params below the "params" collection).

    LLaVA (-NeXT, -NeXT-Video, -OneVision), PaliGemma and DeepSeek-VL give a whole VLM. A single
    tower gives a fragment under the same names as in a VLM, to merge into one: `({"vision":
    ...}, {"vision": params})` for a CLIP/SigLIP vision model, `({"language": ...}, {"decoder":
    params})` for a causal LM. Params are numpy arrays of `param_dtype`, with layers stacked on
    a leading axis when `scan_layers`.
    """
    hf = read_hf_config(hf_dir)
    _, family = hf_model_type(hf)
    cfg = config_from_hf(hf)
    for key in ("vision", "language"):
        if key in cfg:
            cfg[key].update(scan_layers=scan_layers, param_dtype=param_dtype)
    tensors = open_checkpoint(_weight_files(hf_dir))
    names = canonical_names(tensors, family)
    spec = _spec(cfg, family)
    shapes = _expected_shapes(cfg, family)
    _check_spec(spec, shapes)
    missing = sorted({e.hf for e in spec} - set(names))
    if missing:
        raise ValueError(f"{hf_dir}: {len(missing)} tensors of a {family} model are missing "
                         f"from the checkpoint, e.g. {missing[:5]} (canonical "
                         "names)")
    tied = "language" in cfg and cfg["language"]["tie_embeddings"]
    unused = sorted(set(names) - {e.hf for e in spec} - ({"lm_head.weight"} if tied else set()))
    if unused:
        raise ValueError(f"{hf_dir}: {len(unused)} tensors have no place in the model, e.g. "
                         f"{[names[u] for u in unused[:5]]}")
    dtype = np.dtype(layers.to_dtype(param_dtype))
    flat = {}
    for e in spec:
        name = names[e.hf]
        a = tensors[name][name]
        if e.parts > 1:
            if a.shape[0] % e.parts:
                raise ValueError(f"{name} of shape {a.shape} does not split into {e.parts}")
            a = np.split(a, e.parts, axis=0)[e.part]
        flat[e.ours] = np.ascontiguousarray(to_ours(a.astype(dtype), e, shapes[e.ours]))
    params = _nest(flat)
    return cfg, stack_layers(params) if scan_layers else params


def _host_params(params: Any) -> dict[str, Any]:
    params = flax.core.unfreeze(nn.meta.unbox(params))
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return unstack_layers(jax.tree.map(np.asarray, params))


def export_hf(model_cfg: VLMConfig | Mapping[str, Any], params: Any, out_dir: str, *,
              extra_config: Mapping[str, Any] | None = None) -> str:
    """Writes config.json + model.safetensors that transformers' LlavaForConditionalGeneration
    (LlavaNext-, LlavaNextVideo- or LlavaOnevisionForConditionalGeneration for a model with
    image_newline and grid pinpoints), PaliGemmaForConditionalGeneration or (a SigLIP tower's
    final output through an MLP, as the demo's model) DeepseekVLForConditionalGeneration
    loads. `extra_config` entries (token ids,
    ...) are merged into config.json. Never touches an existing non-empty `out_dir`; returns
    its path.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not empty; export_hf never "
                              "overwrites: choose a new directory")
    cfg = model_cfg if isinstance(model_cfg, VLMConfig) else vlm_config(model_cfg)
    flat = flat_paths(_host_params(params))
    dtypes = {a.dtype for a in flat.values()}
    if len(dtypes) != 1:
        raise ValueError(f"parameters of mixed dtypes {sorted(map(str, dtypes))}; cast them "
                         "to one first")
    dtype = str(dtypes.pop())
    hf, family = config_to_hf(cfg, dtype)
    hf.update(extra_config or {})
    # The exported model is scan-agnostic; compare against the unscanned layout.
    cfg_dict = dataclasses.asdict(cfg)
    spec = _spec(cfg_dict, family)
    shapes = _expected_shapes(cfg_dict, family)
    _check_spec(spec, shapes)
    wrong = sorted(set(flat) ^ set(shapes))
    if wrong:
        raise ValueError(f"the parameters do not fit the config: {len(wrong)} paths differ, "
                         f"e.g. {wrong[:5]}")
    for path, shape in shapes.items():
        if flat[path].shape != shape:
            raise ValueError(f"parameter {path} has shape {flat[path].shape}; the config "
                             f"needs {shape}")
    parts: dict[str, list[np.ndarray]] = {}
    for e in spec:
        parts.setdefault(e.hf, [None] * e.parts)[e.part] = to_hf(flat[e.ours], e)
    tensors = {}
    for canon, pieces in parts.items():
        prefixes = EXPORT_PREFIXES[family]
        prefix = next(p for p in prefixes if canon.startswith(p))
        name = prefixes[prefix] + canon[len(prefix):]
        tensors[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)

    # Write next to the target and rename at the end: an interrupted export leaves no
    # half-written checkpoint at out_dir.
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above; rmdir refuses if that changed since
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
