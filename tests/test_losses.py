"""The chunked cross-entropy equals the plain one, in value and in gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax.train import losses


@pytest.mark.parametrize("chunk", [0, 7, 16, 64])
def test_chunked_cross_entropy_matches_plain_in_value_and_grads(chunk):
    rng = np.random.default_rng(chunk)
    b, t, d, vocab = 3, 37, 8, 50
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((d, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32)
    weights = (rng.random((b, t)) > 0.5).astype(np.float32)
    weights[:, :10] = 0.0  # an unsupervised prefix (the image tokens)
    weights[2] = 0.0  # a row with no supervised token
    weights = jnp.asarray(weights)

    def plain(h, w):
        return losses.cross_entropy_sum(h @ w, targets, weights)

    def chunked(h, w):
        return losses.chunked_cross_entropy_sum(h, lambda x: x @ w, targets, weights, chunk)

    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(hidden, kernel)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.jit(chunked)(hidden, kernel), want, rtol=1e-5)
