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
  "splash" the Pallas splash-attention kernel on TPU (causal, segment ids, prefix-LM), under
           shard_map over the model's mesh: models/splash.py.
  "splash_interpret"  the same kernel in the Pallas interpreter: any backend, slow (tests).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from lvlm_jax.models import layers, splash

Array = jax.Array
IMPLEMENTATIONS = ("xla", "xla_autodiff", "jax", "cudnn", "splash", "splash_interpret")


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
    # True when the caller guarantees one sample a row, right-padded (no packing, no left
    # padding) with positions = arange on its tokens, as the loader's unpacked training rows
    # are (stages/base.py, `plain_causal_rows`): "jax"/"cudnn" then use the kernel's built-in
    # causal mask instead of a dense one, "splash" no segment ids. Ignored with a prefix or when
    # q and kv lengths differ.
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
    if (mask is not None and mask.plain_causal and mask.q_prefix is None
            and q.shape[1] == k.shape[1]):
        # The kernel's own causal mask, no [b, 1, t, s] array. No per-row lengths either: with
        # right padding a real query's causal window holds only real keys, and a padding mask
        # would leave a row of padding only (length 0) with no key at all.
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation=implementation)
    dense = None if mask is None else mask.dense()
    return jax.nn.dot_product_attention(q, k, v, mask=dense, scale=scale,
                                        implementation=implementation)


def _splash_attention(q, k, v, mask: MaskInfo | None, scale: float, interpret: bool = False):
    if mask is None:
        return splash.splash_attention(q, k, v, scale=scale, interpret=interpret)
    if q.shape[1] != k.shape[1]:
        # The kernel's causal mask is by index, so a query block at an offset into a longer
        # KV cache (decoding) would be masked wrongly; its positions need the reference.
        return _xla_attention(q, k, v, mask, scale, None)
    if mask.plain_causal and mask.q_prefix is None:  # the causal mask alone (see MaskInfo)
        return splash.splash_attention(q, k, v, scale=scale, causal=True, interpret=interpret)
    return splash.splash_attention(
        q, k, v, scale=scale, q_segment=mask.q_segment, kv_segment=mask.kv_segment,
        q_prefix=mask.q_prefix, kv_prefix=mask.kv_prefix, causal=mask.causal,
        interpret=interpret)


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
    return _splash_attention(q, k, v, mask, scale,
                             interpret=implementation == "splash_interpret")


splash_attention_interpret = functools.partial(_splash_attention, interpret=True)
