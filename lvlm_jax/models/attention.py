"""One attention function with interchangeable implementations, and the masks it understands.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] (grouped-query
attention when kv_heads < heads). Masks are described, not materialised, by `MaskInfo`: segment
ids (0 = padding; tokens attend only within their segment, which is how packed rows stay
separate), integer positions (causality is `kv_pos <= q_pos`, so left padding and packing need no
special case) and an optional prefix flag (PaliGemma's prefix-LM: prefix tokens see each other
bidirectionally).

Implementations, chosen by config:
  "xla"    the reference einsum + softmax, in float32 logits, with a hand-written backward
           (under jax.jvp, which no custom VJP supports, it runs as "xla_autodiff").
  "xla_autodiff"  the same forward, differentiated by JAX (forward-over-reverse, Hessians).
  "jax"    jax.nn.dot_product_attention with XLA's own choice of kernel.
  "cudnn"  jax.nn.dot_product_attention(implementation="cudnn"): flash attention on NVIDIA GPUs.
  "splash" the Pallas splash-attention kernel on TPU (causal + segment ids).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from lvlm_jax.models import layers

Array = jax.Array
IMPLEMENTATIONS = ("xla", "xla_autodiff", "jax", "cudnn", "splash")


@flax.struct.dataclass
class MaskInfo:
    """What each query may attend to; see the module docstring."""

    q_segment: Array
    kv_segment: Array
    q_positions: Array
    kv_positions: Array
    q_prefix: Array | None = None
    kv_prefix: Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=True)
    # True when the caller guarantees no padding, no packing, no prefix and positions = arange:
    # fused kernels can then use their built-in causal mask instead of a dense one.
    plain_causal: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def for_sequence(cls, segment_ids: Array, positions: Array, prefix: Array | None = None,
                     causal: bool = True, plain_causal: bool = False) -> MaskInfo:
        return cls(segment_ids, segment_ids, positions, positions, prefix, prefix, causal,
                   plain_causal)

    def dense(self) -> Array:
        """The boolean mask [batch, 1, q_len, kv_len]."""
        same = self.q_segment[:, :, None] == self.kv_segment[:, None, :]
        ok = same & (self.kv_segment[:, None, :] != 0)
        if self.causal:
            visible = self.kv_positions[:, None, :] <= self.q_positions[:, :, None]
            if self.q_prefix is not None:
                visible |= self.q_prefix[:, :, None] & self.kv_prefix[:, None, :]
            ok &= visible
        return ok[:, None]


def _xla_attention(q, k, v, mask: MaskInfo | None, scale: float, softcap: float | None):
    if softcap or layers.forward_mode(q, k, v):
        return _xla_attention_autodiff(q, k, v, mask, scale, softcap)
    bias = None
    if mask is not None:  # additive, so its backward is the identity (no select on [b,h,t,s])
        bias = jnp.where(mask.dense()[:, :, None], 0.0, jnp.finfo(jnp.float32).min)
    return _attention(q, k, v, bias, scale)


def _xla_attention_autodiff(q, k, v, mask: MaskInfo | None, scale: float,
                            softcap: float | None):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    if mask is not None:
        m = mask.dense()[:, :, None]  # [b, 1, 1, t, s]
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, h, d)


_HI = jax.lax.Precision.HIGHEST


def cached_attention(q: Array, k: Array, v: Array, mask: MaskInfo, scale: float | None = None
                     ) -> Array:
    """The "xla" reference over a head-major KV cache: k, v [batch * kv_heads, kv_len, head_dim].

    Same numbers as `dot_product_attention`, but both einsums are plain batched matmuls over
    (batch, kv head): XLA:CPU runs "btkgd,bskd->bkgts" on the token-major layout as a slow
    generic contraction (10.7 ms vs 0.48 ms per layer in a batch-16 decode step).
    """
    b, t, h, d = q.shape
    kvh = k.shape[0] // b
    g = h // kvh
    scale = d ** -0.5 if scale is None else scale
    qh = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b * kvh, g * t, d)
    logits = jnp.einsum("nqd,nsd->nqs", qh, k, preferred_element_type=jnp.float32,
                        precision=_HI) * scale
    bias = jnp.where(mask.dense(), 0.0, jnp.finfo(jnp.float32).min)  # [b, 1, t, s]
    logits = logits.reshape(b, kvh, g, t, -1) + bias[:, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b * kvh, g * t, -1)
    out = jnp.einsum("nqs,nsd->nqd", probs, v, precision=_HI)
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v with a hand-written backward: the softmax term comes from
    sum(dout * out) over head_dim instead of a reduction over [b, h, t, s], and no mask select."""
    return _attention_fwd(q, k, v, bias, scale)[0]


def _attention_fwd(q, k, v, bias, scale):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                        precision=_HI) * scale
    if bias is not None:
        logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, precision=_HI)
    out = out.reshape(b, t, h, d)
    return out, (q, k, v, probs, out, bias)


def _attention_bwd(scale, res, dout):
    q, k, v, probs, out, bias = res
    b, t, h, d = q.shape
    kvh = k.shape[2]
    split = lambda x: x.reshape(b, t, kvh, h // kvh, d)  # noqa: E731
    g = split(dout)
    dv = jnp.einsum("bkgts,btkgd->bskd", probs.astype(g.dtype), g, precision=_HI)
    if bias is not None:
        # A query that sees no key (padding) has uniform probs whatever its logits: it passes
        # no gradient to q or k, as autodiff of the masked softmax gives. Zeroing its rows of
        # dout here costs [b, t] work instead of a select on [b, h, t, s].
        sees = jnp.broadcast_to(jnp.max(bias, axis=-1) == 0, (b, 1, 1, t))
        g = g * sees.reshape(b, t)[:, :, None, None, None].astype(g.dtype)
    dprobs = jnp.einsum("btkgd,bskd->bkgts", g, v, preferred_element_type=jnp.float32,
                        precision=_HI)
    delta = jnp.einsum("btkgd,btkgd->bkgt", g.astype(jnp.float32),
                       split(out).astype(jnp.float32), precision=_HI)
    dlogits = (probs * (dprobs - delta[..., None]) * scale).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", dlogits, k, precision=_HI).reshape(b, t, h, d)
    dk = jnp.einsum("bkgts,btkgd->bskd", dlogits, split(q), precision=_HI)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), (
        None if bias is None else jnp.zeros_like(bias))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _jax_attention(q, k, v, mask: MaskInfo | None, scale: float, implementation: str | None):
    if mask is not None and mask.plain_causal:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation=implementation)
    dense = None if mask is None else mask.dense()
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale,
                                        implementation=implementation)


def _splash_attention(q, k, v, mask: MaskInfo | None, scale: float, interpret: bool = False):
    # Imported lazily: the Pallas TPU kernels are only needed on TPU (or in interpret mode).
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )

    if mask is not None and mask.q_prefix is not None:
        raise NotImplementedError("splash attention does not take a prefix-LM mask; use 'xla'")
    b, t, h, d = q.shape
    s = k.shape[1]
    if mask is not None and t != s:
        # The kernel's causal mask is by index, so a query block at an offset into a longer
        # KV cache (decoding) would be masked wrongly; its positions need the reference.
        return _xla_attention(q, k, v, mask, scale, None)
    # The kernel needs lengths that are multiples of its 128-token blocks (CLIP's 577 tokens,
    # a 600-token LLaVA row): pad, and mark the pads as padding (segment 0).
    block = 128
    tp, sp = -(-t // block) * block, -(-s // block) * block
    if mask is not None:
        q_seg, kv_seg = mask.q_segment, mask.kv_segment
    else:  # ones everywhere: every query sees every real key
        q_seg, kv_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    if mask is None and (tp, sp) == (t, s):
        seg = None
    else:
        pad_q = 1 if mask is None else 0  # pad queries must see some key, or they give NaN
        seg = sk.SegmentIds(
            q=jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=pad_q),
            kv=jnp.pad(kv_seg, ((0, 0), (0, sp - s))))
        q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    if mask is not None and mask.causal:
        head_mask = sm.CausalMask((tp, sp))
    else:
        head_mask = sm.FullMask((tp, sp))
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([head_mask] * (h // k.shape[2])),
                                              interpret=interpret)
    kvh = k.shape[2]
    # [b, kvh, group, t, d] queries against [b, kvh, s, d] keys: one MQA kernel per kv head.
    qh = (q * scale).reshape(b, tp, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if seg is not None:
        fn = jax.vmap(jax.vmap(kernel, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))
        out = fn(qh, kh, vh, seg)
    else:
        fn = jax.vmap(jax.vmap(kernel, in_axes=(0, 0, 0)), in_axes=(0, 0, 0))
        out = fn(qh, kh, vh)
    out = out[:, :, :, :t]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: MaskInfo | None,
    *,
    implementation: str = "xla",
    scale: float | None = None,
    softcap: float | None = None,
) -> Array:
    """Attention of q over (k, v) under `mask` (None = every query sees every key)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; "
            f"expected one of {IMPLEMENTATIONS}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "xla" or softcap:
        return _xla_attention(q, k, v, mask, scale, softcap)
    if implementation == "xla_autodiff":
        return _xla_attention_autodiff(q, k, v, mask, scale, None)
    if implementation == "jax":
        return _jax_attention(q, k, v, mask, scale, None)
    if implementation == "cudnn":
        return _jax_attention(q, k, v, mask, scale, "cudnn")
    return _splash_attention(q, k, v, mask, scale)


splash_attention_interpret = functools.partial(_splash_attention, interpret=True)
