"""Token losses. The LM head and log-softmax over a large vocabulary dominate a small LVLM's
step (half of it on CPU), so cross-entropy is computed chunk by chunk over the sequence, each
chunk rematerialised in the backward pass: the full [batch, length, vocab] logits never exist."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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
    """
    b, t, d = hidden.shape
    if chunk <= 0 or chunk >= t:
        return cross_entropy_sum(head(hidden), targets, weights)
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ws = weights.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, tgt, w):
        return cross_entropy_sum(head(h), tgt, w)

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ws))
    return total


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
