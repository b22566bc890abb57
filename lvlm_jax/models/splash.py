"""Splash attention (the Pallas TPU kernel) under the model's mesh, with segment ids and the
prefix-LM mask.

Sharding. A Pallas kernel cannot be partitioned by XLA, so on a mesh of several devices the
kernel runs under `jax.shard_map` over the mesh that `layers.activation_mesh` holds while the
model is traced (the one `layers.constrain` puts activations on; no mesh: one plain call):

    q [b, t, h, d]        P(batch, None, heads, None)
    k, v [b, s, kvh', d]  P(batch, None, heads, None)
    segment ids, prefix   P(batch, None)
    out                   as q

`batch` is what the logical rules map `act_batch` to (data and fsdp), `heads` what they map
`act_heads` to (tensor); an axis that does not divide its dimension is dropped (replicated), as
the rule table's fallback does. Every shard holds whole rows: `act_len` (the `sequence` axis)
is gathered here, since a query needs every key of its row.

Grouped-query attention. Each shard needs the kv heads of its own query heads. With T tensor
shards and kvh kv heads, every kv head is repeated T / gcd(kvh, T) times (once, i.e. not at
all, when T divides kvh): the repeated heads then split over T in the order the query heads
do. E.g. Gemma's one kv head on tensor=4 becomes four copies, one a shard. Query heads that
do not divide over the tensor axis leave every head on every shard.

Prefix-LM (PaliGemma). A prefix query sees every prefix key of its segment, both ways; a suffix
query sees its segment causally. The prefix length varies by row, which a static splash mask
cannot express, so the kernel runs twice: causally with the segment ids as they are, and
non-causally with segment ids that hide the suffix (prefix tokens keep their segment, suffix
tokens get 0, the padding id), and each query takes the output of its kind. In both calls
every query sees at least its own key, so the output it discards is finite and its zero
cotangent brings no NaN into the gradients. Prefix tokens must lead their segment (image and
prompt, then the suffix, as PaliGemma lays rows out): a prefix query gets the prefix keys only,
not also a suffix key before it. The prefix call costs a full (non-causal) pass.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lvlm_jax.models import layers

Array = jax.Array
BLOCK = 128  # the kernel's default block: lengths are padded up to a multiple of it


def splash_attention(q: Array, k: Array, v: Array, *, scale: float,
                     q_segment: Array | None = None, kv_segment: Array | None = None,
                     q_prefix: Array | None = None, kv_prefix: Array | None = None,
                     causal: bool = False, interpret: bool = False) -> Array:
    """Attention of q [b, t, h, d] over k, v [b, s, kvh, d] by the splash kernel.

    Segment ids (0 = padding) keep packed samples apart; `causal` masks by index within the
    row (positions that count up within a segment, as the loader's do); the prefix flags
    apply with `causal` only. No segment ids: every query sees every key. `interpret` runs the
    kernel in the Pallas interpreter (any backend, slowly)."""
    _check_precision(q.dtype, interpret)
    masks = {name: x for name, x in (("q_segment", q_segment), ("kv_segment", kv_segment),
                                     ("q_prefix", q_prefix), ("kv_prefix", kv_prefix))
             if x is not None and (causal or "prefix" not in name)}
    local = functools.partial(_local_attention, scale=scale, causal=causal, interpret=interpret)
    mesh = layers.current_activation_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v, masks)
    batch = _mesh_axes(mesh, "act_batch", q.shape[0])
    heads = _mesh_axes(mesh, "act_heads", q.shape[2])
    if heads is not None:
        shards = math.prod(mesh.shape[a] for a in heads)
        repeats = shards // math.gcd(k.shape[2], shards)
        k, v = jnp.repeat(k, repeats, axis=2), jnp.repeat(v, repeats, axis=2)
    qkv_spec = P(batch, None, heads, None)
    row_spec = P(batch, None)
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, {n: row_spec for n in masks}),
        out_specs=qkv_spec, check_vma=False)
    return sharded(q, k, v, masks)


def _check_precision(dtype, interpret: bool) -> None:
    """Mosaic compiles the kernel's matmuls at the default precision, or at "highest" for fp32
    inputs: refuse the rest here, in words, rather than in the TPU compiler ("Bad lhs type")."""
    precision = jax.config.jax_default_matmul_precision
    if interpret or precision in (None, "default", "bfloat16", "fastest") or (
            dtype == jnp.float32 and precision in ("highest", "float32")):
        return
    raise ValueError(f"splash attention on {jnp.dtype(dtype).name} inputs cannot run at "
                     f"jax_default_matmul_precision={precision!r} (Mosaic has no such matmul); "
                     "leave it unset, or use fp32 compute with 'highest'")


def _mesh_axes(mesh, logical: str, size: int) -> tuple[str, ...] | None:
    """The mesh axes the activation rules map `logical` to, if they divide `size`."""
    rules = nn.get_logical_axis_rules()
    axes = nn.logical_to_mesh_axes((logical,), rules)[0] if rules else None
    if axes is None:
        return None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes)
                 if a in mesh.shape and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _local_attention(q, k, v, masks, *, scale, causal, interpret):
    """The kernel on one device's rows and heads (see the module docstring)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    tp, sp = _round_up(t), _round_up(s)
    # CLIP's 577 tokens, a 600-token row: pad to whole blocks, the pads marked as padding
    # (segment 0). Pad queries must see some key, or they give NaN: without segment ids they
    # take segment 1 and see every real key; with them they see the (segment 0) pad keys.
    if "q_segment" in masks:
        q_seg, kv_seg, pad_q = masks["q_segment"], masks["kv_segment"], 0
    else:
        q_seg, kv_seg, pad_q = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32), 1
    seg = None
    if "q_segment" in masks or (tp, sp) != (t, s):
        seg = (jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=pad_q),
               jnp.pad(kv_seg, ((0, 0), (0, sp - s))))
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    # [b, kvh, group, t, d] queries against [b, kvh, s, d] keys: one MQA kernel per kv head.
    qh = (pad(q, tp) * scale).reshape(b, tp, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    kh, vh = pad(k, sp).transpose(0, 2, 1, 3), pad(v, sp).transpose(0, 2, 1, 3)
    run = functools.partial(_run_kernel, qh, kh, vh, group=h // kvh, interpret=interpret)
    if "q_prefix" in masks:
        q_pre = jnp.pad(masks["q_prefix"], ((0, 0), (0, tp - t)))
        kv_pre = jnp.pad(masks["kv_prefix"], ((0, 0), (0, sp - s)))
        # Suffix tokens take segment 0: a prefix query sees its segment's prefix keys, and a
        # suffix query (whose output here is discarded) sees at least its own key.
        prefix_seg = (jnp.where(q_pre, seg[0], 0), jnp.where(kv_pre, seg[1], 0))
        out = jnp.where(q_pre[:, None, None, :, None], run(prefix_seg, causal=False),
                        run(seg, causal=True))
    else:
        out = run(seg, causal=causal)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _run_kernel(qh, kh, vh, seg, *, causal, group, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )

    kernel = _kernel(causal, qh.shape[3], kh.shape[2], group, interpret)
    if seg is None:
        return jax.vmap(jax.vmap(kernel))(qh, kh, vh)
    seg = sk.SegmentIds(q=seg[0], kv=seg[1])
    per_row = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads, one row's ids
    return jax.vmap(per_row)(qh, kh, vh, seg)


@functools.lru_cache(maxsize=64)
def _kernel(causal: bool, t: int, s: int, group: int, interpret: bool):
    """The kernel for one kv head's `group` query heads. Its block tables come from the static
    mask, once per shape, as concrete arrays: built inside a trace (a remat, a scan) they would
    be that trace's values, and leak from the cache into the next."""
    # Imported here: the Pallas TPU kernels are needed only on TPU or in interpret mode.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    head_mask = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(sm.MultiHeadMask([head_mask] * group),
                                                interpret=interpret)
