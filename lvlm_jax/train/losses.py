"""Token losses. The LM head and log-softmax over a large vocabulary dominate a small LVLM's
step (half of it on CPU), so cross-entropy is computed chunk by chunk over the sequence, only on
chunks holding supervised tokens, with each chunk's gradient formed in the forward pass: the full
[batch, length, vocab] logits never exist and the LM head is never recomputed."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax.models.layers import forward_mode, forward_mode_scope

Array = jax.Array


def cross_entropy_sum(logits: Array, targets: Array, weights: Array) -> Array:
    """sum_i weights_i * -log softmax(logits_i)[targets_i], in float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * weights)


def token_log_probs(logits: Array, targets: Array) -> Array:
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def chunked_cross_entropy_sum(hidden: Array, head: Callable[[Array], Array], targets: Array,
                              weights: Array, chunk: int = 128) -> Array:
    """cross_entropy_sum(head(hidden), ...) without materialising all logits at once.

    hidden [b, t, d]; head maps [b, c, d] -> [b, c, vocab]. t need not divide by chunk.
    Supervised tokens (weight != 0) are gathered to the front of each row first, and a chunk
    with none is skipped, so image and prompt tokens cost no LM-head work. The gradient is
    computed chunk by chunk in the forward pass (no second LM-head matmul in the backward);
    the weights' gradient is exact only where weight != 0.

    chunk <= 0: the plain unchunked loss, autodiff's backward. Under `jax.jvp` (no custom VJP
    has a forward-mode rule) the chunks go through autodiff, with the same numbers.
    """
    if chunk <= 0:
        return cross_entropy_sum(head(hidden), targets, weights)
    b, t, d = hidden.shape
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets = jnp.take_along_axis(targets, order, axis=1)
    weights = jnp.take_along_axis(weights, order, axis=1)
    chunk = t if chunk <= 0 or chunk > t else chunk
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ws = weights.reshape(b, n, chunk).swapaxes(0, 1)
    # The head's parameters become explicit arguments, so the custom VJP can return their grads.
    head_fn, consts = jax.closure_convert(head, hs[0])
    if forward_mode(hs, consts):
        per_chunk = jax.checkpoint(lambda xs: cross_entropy_sum(head(xs[0]), xs[1], xs[2]))
        with forward_mode_scope(True):  # the head inside the map's body, too
            return jnp.sum(jax.lax.map(per_chunk, (hs, ts, ws)))
    return _fused_ce(head_fn, hs, ts, ws, list(consts))


def _chunk_ce(head_fn, consts, h, tgt, w):
    """Per-token losses of one chunk and the gradients of their weighted sum."""
    logits, vjp = jax.vjp(head_fn, h, *consts)
    lf = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(lf, axis=-1)
    tok = lse - jnp.take_along_axis(lf, tgt[..., None], axis=-1)[..., 0]
    onehot = jax.lax.broadcasted_iota(jnp.int32, lf.shape, lf.ndim - 1) == tgt[..., None]
    dlogits = (jnp.exp(lf - lse[..., None]) - onehot) * w[..., None]
    dh, *dconsts = vjp(dlogits.astype(logits.dtype))
    return tok, dh, dconsts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_ce(head_fn, hs, ts, ws, consts):
    def body(total, xs):
        h, tgt, w = xs

        def compute():
            return cross_entropy_sum(head_fn(h, *consts), tgt, w)

        return total + jax.lax.cond(jnp.any(w != 0), compute,
                                    lambda: jnp.zeros((), jnp.float32)), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ws))[0]


def _fused_ce_fwd(head_fn, hs, ts, ws, consts):
    zeros = [jnp.zeros_like(c) for c in consts]

    def body(carry, xs):
        total, acc = carry
        h, tgt, w = xs
        tok, dh, dconsts = jax.lax.cond(
            jnp.any(w != 0), lambda: _chunk_ce(head_fn, consts, h, tgt, w),
            lambda: (jnp.zeros(tgt.shape, jnp.float32), jnp.zeros_like(h), zeros))
        acc = [a + g for a, g in zip(acc, dconsts, strict=True)]
        return (total + jnp.sum(tok * w), acc), (dh, tok)

    (total, dconsts), (dhs, toks) = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (hs, ts, ws))
    return total, (dhs, toks, dconsts, ts)


def _fused_ce_bwd(head_fn, res, g):
    dhs, toks, dconsts, ts = res
    return (dhs * g.astype(dhs.dtype), np.zeros(ts.shape, jax.dtypes.float0),
            (toks * g).astype(jnp.float32), [d * g.astype(d.dtype) for d in dconsts])


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def chunked_token_log_probs(hidden: Array, head: Callable[[Array], Array], targets: Array,
                            chunk: int = 128) -> Array:
    """Per-token log p(target) [b, t], chunked like `chunked_cross_entropy_sum`."""
    b, t, d = hidden.shape
    if chunk <= 0 or chunk >= t:
        return token_log_probs(head(hidden), targets)
    pad = (-t) % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    one = jax.checkpoint(lambda h, tgt: token_log_probs(head(h), tgt))
    out = jax.lax.map(lambda xs: one(*xs), (hs, ts))
    return out.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
