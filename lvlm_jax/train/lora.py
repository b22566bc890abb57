"""LoRA: low-rank adapters trained on a frozen base, merged into the kernels before the model runs.

Each targeted kernel W (selected by `lora.targets`, regexes over '/'-joined parameter paths) gets
A [in, r] (random normal, std 1/sqrt(in)) and B [r, out] (zeros), stored in the params tree under
a top-level "lora" key that mirrors W's path:

    params["decoder"]["stack"]["layers"]["self_attn"]["q_proj"]["kernel"]           W
    params["lora"]["decoder"]["stack"]["layers"]["self_attn"]["q_proj"]["kernel"]   {"a", "b"}
    params["lora"]["alpha"]                                                         a scalar

With LoRA on, the model's own weights are frozen (no optimizer state, no weight decay) except
those `lora.trainable` names; parameters a stage adds beside the model (a reward head) train.
`merge(params)` returns the plain params with W + (alpha / r) * A @ B in place of every targeted
kernel and no "lora" key; the loss, evals and export all go through it, so the model code never
knows about adapters. Kernels with more than two axes (q_proj [embed, heads, head_dim], o_proj
[heads, head_dim, embed]) are adapted as the 2-D matrix DenseGeneral contracts with; scanned
kernels keep their leading `layers` axes on A and B. Keeping alpha in the tree makes a LoRA
checkpoint self-describing: export and `from_pretrained` need no config to merge it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvlm_jax.param_paths import compile_patterns, matches, path_of

LORA = "lora"
ALPHA = "alpha"
# The model's own weights are frozen, and so is the (constant) alpha; parameters a stage adds
# beside them (a reward or value head) still train.
MODEL_PARAMS = r"(?:vision|connector|decoder)/.*"
DEFAULT_TARGETS = (r"decoder/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",)
_SEED_SALT = 0x10FA  # adapters draw from their own stream: the base init is the same as without


def enabled(cfg: Any) -> bool:
    """Whether a run config asks for LoRA (`lora.rank` > 0)."""
    section = cfg.get("lora") if hasattr(cfg, "get") else None
    return bool(section and section.get("rank"))


def check_config(lora_cfg: Mapping[str, Any]) -> None:
    """One clear error for a LoRA section that cannot work."""
    rank, alpha = lora_cfg.get("rank", 0), lora_cfg.get("alpha", 0)
    if not isinstance(rank, int) or rank < 0:
        raise ValueError(f"lora.rank must be a non-negative integer, got {rank!r}")
    if not alpha or float(alpha) <= 0:
        raise ValueError(f"lora.alpha must be positive, got {alpha!r}")
    compile_patterns(lora_cfg.get("trainable"))
    if not lora_cfg.get("targets"):
        raise ValueError("lora.targets is empty: name the kernels to adapt by regex, e.g. "
                         f"{DEFAULT_TARGETS[0]!r}")
    if float(lora_cfg.get("dropout") or 0.0):
        raise ValueError("lora.dropout > 0 is not supported: adapters are merged into the "
                         "kernels before the model runs, so no adapter-only activation exists "
                         "to drop; set lora.dropout=0")


def _layout(names: tuple | None, ndim: int) -> tuple[int, int]:
    """(leading scan axes, input axes) of a kernel; the rest are output axes.

    Output axes: (heads, head_dim) when the kernel ends with head_dim (q/k/v projections), else
    the last axis (o_proj's [heads, head_dim, embed], MLPs, convolutions)."""
    names = tuple(names or (None,) * ndim)
    lead = 0
    while lead < ndim and names[lead] == "layers":
        lead += 1
    n_out = 2 if (names[-1] or "").endswith("head_dim") and ndim - lead >= 3 else 1
    return lead, ndim - lead - n_out


def add_adapters(params: Any, lora_cfg: Mapping[str, Any], rng: jax.Array) -> Any:
    """`params` (flax-boxed or plain, as model.init returns them) plus a "lora" subtree of fresh
    adapters, boxed with logical names so that they shard like their kernels' in/out axes."""
    check_config(lora_cfg)
    rank, patterns = int(lora_cfg["rank"]), compile_patterns(lora_cfg["targets"])
    is_box = lambda x: isinstance(x, nn.Partitioned)
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
    adapters: dict = {}
    for i, (kp, leaf) in enumerate(leaves):
        path = path_of(kp)
        if not matches(path, patterns):
            continue
        value, names = (leaf.value, leaf.names) if is_box(leaf) else (leaf, None)
        lead, n_in = _layout(names, value.ndim)
        if n_in < 1 or value.ndim - lead - n_in < 1:
            raise ValueError(f"lora.targets selects {path} of shape {value.shape}, which is not "
                             "a kernel (a LoRA target needs input and output axes)")
        shape = value.shape
        d_in, d_out = math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:])
        key = jax.random.fold_in(rng, i)
        a = jax.random.normal(key, (*shape[:lead], d_in, rank), value.dtype) / math.sqrt(d_in)
        b = jnp.zeros((*shape[:lead], rank, d_out), value.dtype)
        if names is not None:
            layer_names = tuple(names[:lead])
            a = nn.Partitioned(a, names=(*layer_names, names[lead], None))
            b = nn.Partitioned(b, names=(*layer_names, None, names[lead + n_in]))
        node = adapters
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(a=a, b=b)
    for field, pats in (("targets", patterns),
                        ("trainable", compile_patterns(lora_cfg.get("trainable")))):
        unmatched = [p.pattern for p in pats if not any(
            matches(path_of(kp), [p]) for kp, _ in leaves)]
        if unmatched:
            raise ValueError(f"lora.{field} pattern {unmatched[0]!r} matches no parameter")
    return {**params, LORA: {**adapters, ALPHA: jnp.asarray(float(lora_cfg["alpha"]),
                                                            jnp.float32)}}


def init_with_adapters(init_fn: Any, lora_cfg: Mapping[str, Any]) -> Any:
    """rng -> params: `init_fn`'s base (unchanged for the same rng) plus fresh adapters."""
    return lambda rng: add_adapters(init_fn(rng), lora_cfg, jax.random.fold_in(rng, _SEED_SALT))


def _adapter_pairs(tree: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """'{kernel path}' -> (A, B) for every adapter in the "lora" subtree."""
    out = {}
    for k, v in tree.items():
        if not isinstance(v, Mapping):
            continue
        if set(v) == {"a", "b"}:
            out[prefix + k] = (v["a"], v["b"])
        else:
            out.update(_adapter_pairs(v, f"{prefix}{k}/"))
    return out


def merge(params: Any) -> Any:
    """Plain params with every adapter folded into its kernel: W + (alpha / r) * A @ B.

    Params without a "lora" key come back unchanged, so calling it twice is harmless."""
    if not isinstance(params, Mapping) or LORA not in params:
        return params
    adapters = dict(params[LORA])
    alpha = adapters.pop(ALPHA)
    pairs = _adapter_pairs(adapters)
    base = {k: v for k, v in params.items() if k != LORA}

    def fold(kp, w):
        pair = pairs.get(path_of(kp))
        if pair is None:
            return w
        a, b = pair
        scale = jnp.asarray(alpha, jnp.float32) / a.shape[-1]
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)

    merged = jax.tree_util.tree_map_with_path(fold, base)
    found = {path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(base)[0]}
    missing = sorted(set(pairs) - found)
    if missing:
        raise ValueError(f"LoRA adapter for {missing[0]} has no kernel in the params")
    return merged


def merging_stage(stage: Any) -> Any:
    """The stage with its loss applied to merged params; gradients reach A and B through it."""
    loss = stage.loss
    return dataclasses.replace(stage, loss=lambda ctx, params, batch, rng: loss(
        ctx, merge(params), batch, rng))


def optimizer_freeze(freeze: Any, lora_cfg: Mapping[str, Any]) -> list[str]:
    """The freeze rules of a LoRA run: whatever was frozen, plus the model's own weights except
    those `lora.trainable` names (LLaVA's LoRA recipe trains the projector in full)."""
    from lvlm_jax.param_paths import as_patterns

    keep = "|".join(f"(?:{p})" for p in as_patterns(lora_cfg.get("trainable")))
    model = f"(?!(?:{keep})$){MODEL_PARAMS}" if keep else MODEL_PARAMS
    return [*as_patterns(freeze), model, f"{LORA}/{ALPHA}"]


def carry_over(loaded: Any, fresh: Any) -> Any:
    """Another run's params as the start of this one: a LoRA source contributes its merged
    weights, and a LoRA run keeps its own fresh adapters on top of them."""
    base = merge(loaded)
    if isinstance(fresh, Mapping) and LORA in fresh and isinstance(base, Mapping):
        base = {**base, LORA: fresh[LORA]}
    return base
