"""LoRA: low-rank adapters trained on a frozen base, applied beside the kernels they adapt.

Each targeted kernel W (selected by `lora.targets`, regexes over '/'-joined parameter paths) gets
A [in, r] (random normal, std 1/sqrt(in)) and B [r, out] (zeros), stored in the params tree under
a top-level "lora" key that mirrors W's path:

    params["decoder"]["stack"]["layers"]["self_attn"]["q_proj"]["kernel"]           W
    params["lora"]["decoder"]["stack"]["layers"]["self_attn"]["q_proj"]["kernel"]   {"a", "b"}
    params["lora"]["alpha"]                                                         a scalar

How the model runs them. `model_variables(params)` hands the model two variable collections:
"params" (its own weights) and "lora" (every adapter, B scaled by alpha / r, at its kernel's
path). Each dense layer (`models/layers.py` `Dense`) looks in "lora" under its own path and, if
it finds an adapter there, returns x W + (x A) B: W is never copied, and the backward pass
makes gradients for the thin A and B only, not a full-size dW per adapted kernel as merging
W + A B inside the step did. Scanned stacks scan the "lora" collection with their params, so a
scanned kernel's [layers, ...] adapter is sliced layer by layer like the kernel. We chose a
variable collection over flax method interception because the model code then says what
happens: the one layer class that uses adapters reads them, and a reader can follow a
parameter from config to matmul without knowing an interceptor is installed. Only dense layers
take adapters; a target that is not a dense layer's kernel (an embedding, a convolution, a
stage's head) fails at init. Kernels with more than two axes (q_proj [embed, heads, head_dim],
o_proj [heads, head_dim, embed]) are adapted as the 2-D matrix DenseGeneral contracts with.

`merge(params)` folds the adapters in (W + (alpha / r) A @ B, no "lora" key): export, chaining
into another run (`carry_over`), generation (PPO/GRPO sampling) and evals merge once, outside
the train step. `lora.merge_on_forward=True` restores the old train step that merges on every
forward (kept to measure against, bench/lora_aot_memory.py).

With LoRA on, the model's own weights are frozen (no optimizer state, no weight decay) except
those `lora.trainable` names; parameters a stage adds beside the model (a reward head) train.
The reference model of DPO/PPO/GRPO is the policy's own base with no adapters (`reference`):
`TrainState.reference` holds only the starting values of base weights that train in full
(`lora.trainable`), or nothing, instead of a second copy of the model. Keeping alpha in the
tree makes a LoRA checkpoint self-describing: export and `from_pretrained` need no config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvlm_jax.models.layers import ADAPTERS
from lvlm_jax.param_paths import as_patterns, compile_patterns, matches, path_of

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
        raise ValueError("lora.dropout > 0 is not implemented (the dense layers would need a "
                         "dropout rng for the adapters' input); set lora.dropout=0")


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


def add_adapters(params: Any, lora_cfg: Mapping[str, Any], rng: jax.Array,
                 dense_kernels: set[str] | None = None) -> Any:
    """`params` (flax-boxed or plain, as model.init returns them) plus a "lora" subtree of fresh
    adapters, boxed with logical names so that they shard like their kernels' in/out axes.
    `dense_kernels`: the kernel paths of the model's dense layers; a target outside them fails."""
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
        if dense_kernels is not None and path not in dense_kernels:
            raise ValueError(f"lora.targets selects {path}, which is not a dense layer's kernel: "
                             "adapters run inside the model's dense layers (embeddings, "
                             "convolutions and a stage's heads take none)")
        shape = value.shape
        d_in, d_out = math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:])
        key = jax.random.fold_in(rng, i)
        a = jax.random.normal(key, (*shape[:lead], d_in, rank), value.dtype) / math.sqrt(d_in)
        b = jnp.zeros((*shape[:lead], rank, d_out), value.dtype)
        if names is not None:
            layer_names = tuple(names[:lead])
            a = nn.Partitioned(a, names=(*layer_names, names[lead], None))
            b = nn.Partitioned(b, names=(*layer_names, None, names[lead + n_in]))
        _put(adapters, path, {"a": a, "b": b})
    for field, pats in (("targets", patterns),
                        ("trainable", compile_patterns(lora_cfg.get("trainable")))):
        unmatched = [p.pattern for p in pats if not any(
            matches(path_of(kp), [p]) for kp, _ in leaves)]
        if unmatched:
            raise ValueError(f"lora.{field} pattern {unmatched[0]!r} matches no parameter")
    return {**params, LORA: {**adapters, ALPHA: jnp.asarray(float(lora_cfg["alpha"]),
                                                            jnp.float32)}}


def init_with_adapters(init_fn: Any, lora_cfg: Mapping[str, Any]) -> Any:
    """rng -> params: `init_fn`'s base (unchanged for the same rng) plus fresh adapters on the
    targeted kernels of the dense layers that init ran."""

    def init(rng):
        dense: set[str] = set()

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.DenseGeneral) and context.method_name == "__call__":
                dense.add("/".join(context.module.path) + "/kernel")
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            params = init_fn(rng)
        return add_adapters(params, lora_cfg, jax.random.fold_in(rng, _SEED_SALT), dense)

    return init


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


def _put(tree: dict, path: str, value: Any) -> None:
    """tree[p0][p1]...[pn] = value for path 'p0/p1/.../pn', making the dicts on the way."""
    *parents, name = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[name] = value


def _scale(alpha: Any, a: Any) -> Any:
    """alpha / r, in float32 (r: A's last axis)."""
    return jnp.asarray(alpha, jnp.float32) / a.shape[-1]


def _split(params: Any) -> tuple[Any, dict, Any]:
    """(the params without "lora", {kernel path: (A, B)}, alpha)."""
    adapters = dict(params[LORA])
    alpha = adapters.pop(ALPHA)
    return {k: v for k, v in params.items() if k != LORA}, _adapter_pairs(adapters), alpha


def model_variables(params: Any) -> dict[str, Any]:
    """The variables `model.apply` takes for `params`: {"params": the model's own weights}, plus
    for a LoRA tree the ADAPTERS collection, each adapter {"a": A, "b": (alpha / r) B} at its
    kernel's path, which the dense layers read (models/layers.py `Dense`)."""
    if not isinstance(params, Mapping) or LORA not in params:
        return {"params": params}
    base, pairs, alpha = _split(params)
    adapters: dict = {}
    for path, (a, b) in pairs.items():
        _put(adapters, path, {"a": a, "b": b * _scale(alpha, a).astype(b.dtype)})
    return {"params": base, ADAPTERS: adapters}


def merge(params: Any) -> Any:
    """Plain params with every adapter folded into its kernel: W + (alpha / r) * A @ B.

    Params without a "lora" key come back unchanged, so calling it twice is harmless."""
    if not isinstance(params, Mapping) or LORA not in params:
        return params
    base, pairs, alpha = _split(params)

    def fold(kp, w):
        pair = pairs.get(path_of(kp))
        if pair is None:
            return w
        a, b = pair
        delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        return (w.astype(jnp.float32) + _scale(alpha, a) * delta.reshape(w.shape)).astype(w.dtype)

    merged = jax.tree_util.tree_map_with_path(fold, base)
    found = {path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(base)[0]}
    missing = sorted(set(pairs) - found)
    if missing:
        raise ValueError(f"LoRA adapter for {missing[0]} has no kernel in the params")
    return merged


def reference(params: Any, saved: Any) -> Any:
    """The reference model's params (DPO/PPO/GRPO), from the policy's `params` and what
    `TrainState.reference` holds (`saved`).

    A plain run saved a whole frozen copy: that is the reference. A LoRA run's reference is its
    own base with no adapters (frozen, so the starting model bit for bit, and no second copy),
    with `saved` the starting values of the base weights that train in full, if any."""
    if not isinstance(params, Mapping) or LORA not in params:
        if saved is None:
            raise ValueError("this stage needs TrainState.reference (the frozen starting "
                             "params); build the state with loop.plan/materialize")
        return saved
    base = {k: v for k, v in params.items() if k != LORA}
    return base if saved is None else _overlay(base, saved)


def _overlay(tree: Any, part: Any) -> Any:
    """`tree` with the leaves that `part` (a subtree of the same nesting) holds replaced."""
    if not isinstance(part, Mapping):
        return part
    return {k: _overlay(v, part[k]) if k in part else v for k, v in tree.items()}


def saved_reference(tree: Any, trainable: Any) -> Any:
    """What a LoRA run keeps in `TrainState.reference` of `tree` (its starting params, or their
    shardings): the model's own weights that train in full (`lora.trainable`), as a tree of just
    those, or None (the usual case: the reference is then the frozen base alone)."""
    model = compile_patterns([MODEL_PARAMS])
    keep = {path_of(kp) for kp, on in jax.tree_util.tree_flatten_with_path(trainable)[0]
            if on and matches(path_of(kp), model)}
    out: dict = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path_of(kp) in keep:
            _put(out, path_of(kp), leaf)
    return out or None


def select_like(template: Any, tree: Any) -> Any:
    """The part of `tree` at `template`'s keys: new starting params cut to the shape of the
    reference the state keeps (all of them for a plain run)."""
    if not isinstance(template, Mapping):
        return tree
    return {k: select_like(v, tree[k]) for k, v in template.items()}


def adapted_stage(stage: Any, lora_cfg: Mapping[str, Any]) -> Any:
    """`stage` as a LoRA run trains it: its loss gets the params with their adapters (the dense
    layers apply them; merged into the kernels first with `lora.merge_on_forward`), and, for a
    stage with a reference, `ctx.reference` built from the policy's base (see `reference`)."""
    loss, merge_first = stage.loss, bool(lora_cfg.get("merge_on_forward"))

    def adapted(ctx, params, batch, rng):
        if stage.uses_reference:
            ctx = dataclasses.replace(ctx, reference=reference(params, ctx.reference))
        return loss(ctx, merge(params) if merge_first else params, batch, rng)

    return dataclasses.replace(stage, loss=adapted)


def optimizer_freeze(freeze: Any, lora_cfg: Mapping[str, Any]) -> list[str]:
    """The freeze rules of a LoRA run: whatever was frozen, plus the model's own weights except
    those `lora.trainable` names (LLaVA's LoRA recipe trains the projector in full)."""
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
