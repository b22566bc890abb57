"""Mesh from config, logical-axis rules, and the shardings of parameter and batch pytrees.

Three layers, as in MaxText: physical mesh axes (`data`, `fsdp`, `tensor`, optional `sequence`,
each with an in-slice ICI degree and an across-slice DCN degree), logical axis names carried by
every parameter and block-boundary activation, and a rule table mapping one to the other. A rule
lists candidate mesh axes in order; a dimension takes the first candidate that is still unused in
that array and divides its size, and is replicated when none does (the fallback).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lvlm_jax import compile_cache

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

# logical name -> candidate mesh axes (each candidate a mesh axis or a tuple of them), in order.
FSDP_TP_RULES: dict[str, list[Any]] = {
    "act_batch": [("data", "fsdp")],
    "act_len": ["sequence"],
    "act_embed": [],
    "act_heads": ["tensor"],
    "act_mlp": ["tensor"],
    "act_vocab": ["tensor"],
    "act_kv_heads": ["tensor"],  # the KV cache's heads (models/language.py)
    "embed": ["fsdp"],
    "mlp": ["tensor", "fsdp"],
    "heads": ["tensor", "fsdp"],
    "kv_heads": ["tensor"],
    "head_dim": [],
    "vocab": ["tensor", "fsdp"],
    "layers": [],
    "vision_embed": ["fsdp"],
    "vision_mlp": ["tensor", "fsdp"],
    "vision_heads": ["tensor", "fsdp"],
    "vision_head_dim": [],
}
RULE_PRESETS: dict[str, dict[str, list[Any]]] = {
    "fsdp_tp": FSDP_TP_RULES,
    "fsdp": {k: [c for c in v if c != "tensor"] for k, v in FSDP_TP_RULES.items()},
    "dp": {k: ([("data", "fsdp")] if k == "act_batch" else []) for k in FSDP_TP_RULES},
}


def resolve_mesh_shape(ici: Mapping[str, int], dcn: Mapping[str, int] | None,
                       num_devices: int, num_slices: int = 1) -> tuple[dict, dict]:
    """Fills the one -1 of the ICI degrees so that the mesh covers every device."""
    ici = {a: int(ici.get(a, 1)) for a in MESH_AXES}
    dcn = {a: int((dcn or {}).get(a, 1)) for a in MESH_AXES}
    for name, degrees, total in (("ici", ici, num_devices // num_slices),
                                 ("dcn", dcn, num_slices)):
        unknown = [a for a, d in degrees.items() if d == -1]
        if len(unknown) > 1:
            raise ValueError(f"mesh.{name} has more than one -1 ({', '.join(unknown)})")
        known = math.prod(d for d in degrees.values() if d != -1)
        if unknown:
            if total % known:
                raise ValueError(f"mesh.{name} degrees {degrees} do not divide {total} devices")
            degrees[unknown[0]] = total // known
        if math.prod(degrees.values()) != total:
            raise ValueError(
                f"mesh.{name} degrees {degrees} make {math.prod(degrees.values())} devices, "
                f"but there are {total}" + (" per slice" if name == "ici" else " slices"))
    return ici, dcn


def mesh_platform(mesh: Mesh) -> str:
    """The platform ("cpu", "tpu", "gpu") of the devices a mesh's programs run on."""
    return mesh.devices.flat[0].platform


def make_mesh(mesh_cfg: Mapping[str, Any] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes data, fsdp, tensor, sequence.

    mesh_cfg: {"ici": {axis: degree}, "dcn": {axis: degree}}, one -1 per level filled in; with
    more than one slice (multi-slice TPU), a hybrid ICI x DCN device mesh is built.
    """
    mesh_cfg = dict(mesh_cfg or {})
    devices = list(devices if devices is not None else jax.devices())
    compile_cache.guard(devices)  # programs over this mesh must not be loaded from the cache
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = resolve_mesh_shape(mesh_cfg.get("ici", {"fsdp": -1}), mesh_cfg.get("dcn"),
                                  len(devices), num_slices)
    shape = [ici[a] * dcn[a] for a in MESH_AXES]
    if num_slices > 1:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES],
                                                   [dcn[a] for a in MESH_AXES], devices)
    elif devices[0].platform in ("tpu", "gpu", "cuda") and len(devices) > 1:
        from jax.experimental import mesh_utils

        try:
            arr = mesh_utils.create_device_mesh(shape, devices)
        except NotImplementedError:
            # e.g. fsdp=128 x tensor=2 on a 16x16 v5e: an axis must span parts of two
            # physical axes, which mesh_utils only does when asked.
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        arr = np.array(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: str | Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """A preset name ('fsdp_tp', 'fsdp', 'dp') or a mapping that overrides the default table."""
    if rules is None:
        return dict(FSDP_TP_RULES)
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ValueError(f"unknown sharding rules preset {rules!r}; "
                             f"expected one of {sorted(RULE_PRESETS)}")
        return dict(RULE_PRESETS[rules])
    table = dict(FSDP_TP_RULES)
    for name, cands in dict(rules).items():
        cands = [cands] if isinstance(cands, str) or cands is None else list(cands)
        table[name] = [tuple(c) if isinstance(c, list) else c for c in cands if c is not None]
    return table


def _axes_size(mesh: Mesh, axes: Any) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, list[Any]]) -> PartitionSpec:
    """The PartitionSpec of one array with logical axis `names` under the rule table."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        chosen = None
        if name is not None:
            if name not in rules:
                raise ValueError(f"logical axis {name!r} has no sharding rule")
            for cand in rules[name]:
                axes = (cand,) if isinstance(cand, str) else tuple(cand)
                axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
                if not axes:
                    continue
                if dim % _axes_size(mesh, axes) == 0:
                    chosen = axes[0] if len(axes) == 1 else axes
                    used.update(axes)
                    break
        spec.append(chosen)
    return PartitionSpec(*spec)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Mapping[str, list[Any]]) -> Any:
    """NamedShardings for a tree of (abstract) arrays boxed in flax `nn.Partitioned`."""

    def one(x):
        if isinstance(x, nn.Partitioned):
            spec = logical_to_spec(x.names, x.value.shape, mesh, rules)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def flax_rules(rules: Mapping[str, list[Any]]) -> list[tuple[str, Any]]:
    """The first candidate of each rule, in flax's format, for activation constraints."""
    out = []
    for name, cands in rules.items():
        out.append((name, cands[0] if cands else None))
    return out


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays: leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_axis_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = batch_axis_size(mesh)
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the data axes of the "
                         f"mesh (data x fsdp = {n})")
    if batch_size % jax.process_count():
        raise ValueError(f"batch size {batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")


def to_global(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays sharded on the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
            for k, v in local_batch.items()}


def shardings_following_params(tree: Any, abstract_params: Any, param_shardings: Any,
                               mesh: Mesh) -> Any:
    """Shardings for a tree that embeds parameter-shaped parts (optimizer state): a leaf whose
    path ends with a parameter's path and has that parameter's shape is sharded like it;
    anything else (counts, factored statistics) is replicated."""
    from lvlm_jax.param_paths import flat_paths, path_of

    shapes = {p: x.shape for p, x in flat_paths(abstract_params).items()}
    shards = flat_paths(param_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(kp, leaf):
        path = path_of(kp)
        parts = path.split("/")
        for i in range(len(parts)):
            suffix = "/".join(parts[i:])
            if suffix in shapes and tuple(shapes[suffix]) == tuple(leaf.shape):
                return shards[suffix]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
    """The mesh as the ambient one while tracing: the legacy `with mesh:` context (bare
    PartitionSpecs), and the mesh `layers.constrain` puts activations on. Not jax.set_mesh:
    under it flax constrains its scanned parameter slices too, which fails.
    """
    from lvlm_jax.models import layers  # the models import nothing of this module's users

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*context manager has been deprecated",
                                category=DeprecationWarning)
        with mesh, layers.activation_mesh(mesh):
            yield
