"""Kernel choices follow the devices a program runs on, never the tracing host's backend: a TPU
program AOT-compiled on this CPU host holds no CPU-only path, the CPU program still takes it;
and forward-mode autodiff (`jax.jvp`) runs through the model and the loss."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_utils import random_batches, tiny_config
from xla_env import without_cpu_only

from lvlm_jax import sharding
from lvlm_jax.generate import generate_tokens, params_platform
from lvlm_jax.models import layers
from lvlm_jax.train import loop
from lvlm_jax.train.stages.base import next_token_loss


def lowered_step(cfg, devices=None, compile_it=False) -> str:
    setup = loop.plan(cfg, devices=devices)
    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        lowered = setup.step_fn.lower(setup.abstract_state, setup.abstract_batch())
    if compile_it:
        return setup, lowered.compile().as_text()
    return setup, lowered.as_text(debug_info=True)


@pytest.fixture
def no_default_backend(monkeypatch):
    """Any call of jax.default_backend() while building or tracing fails the test."""
    def refuse():
        raise AssertionError("jax.default_backend() picked a code path")

    monkeypatch.setattr(jax, "default_backend", refuse)


def test_tpu_train_step_has_no_cpu_only_path_and_the_cpu_step_has(no_default_backend):
    pytest.importorskip("libtpu", reason="AOT compiles for TPU need the `tpu` extra")
    from lvlm_jax import aot

    cfg = tiny_config()
    setup, cpu_hlo = lowered_step(cfg, compile_it=True)
    assert setup.model.cfg.language.dense_kernel == "cpu"
    assert setup.model.cfg.vision.dense_kernel == "cpu"
    assert layers.CPU_DENSE_SCOPE in cpu_hlo
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = without_cpu_only(flags)  # libtpu aborts on XLA:CPU's flags
    try:
        devices = aot.tpu_devices(aot.parse_topology("v5e-8"))
        setup, tpu_hlo = lowered_step(cfg, devices=devices, compile_it=True)
        assert sharding.mesh_platform(setup.mesh) == "tpu"
        assert setup.model.cfg.language.dense_kernel == "xla"
        assert "dot" in tpu_hlo and layers.CPU_DENSE_SCOPE not in tpu_hlo
        # An explicit choice is the user's: kept for any target (traced, not compiled here).
        cfg.model.language = {**cfg.model.language, "dense_kernel": "cpu"}
        setup, text = lowered_step(cfg, devices=devices)
        assert setup.model.cfg.language.dense_kernel == "cpu"
        assert layers.CPU_DENSE_SCOPE in text
    finally:
        os.environ["XLA_FLAGS"] = flags


def test_generation_choices_follow_the_params_devices(no_default_backend):
    setup = loop.plan(tiny_config())
    params = setup.init_state(0).params
    assert params_platform(params) == "cpu"
    ids = jnp.full((2, 8), 9, jnp.int32).at[:, 1:5].set(5)
    pixels = jnp.zeros((2, 1, 16, 16, 3))
    runs = [generate_tokens(setup.model, params, ids, jnp.ones_like(ids), pixels,
                            jax.random.PRNGKey(0), max_new_tokens=4, fuse_projections=fuse)
            for fuse in (None, False)]
    np.testing.assert_array_equal(runs[0]["tokens"], runs[1]["tokens"])
    np.testing.assert_allclose(runs[0]["log_probs"], runs[1]["log_probs"], rtol=1e-5, atol=1e-6)


# ---- forward mode ----------------------------------------------------------------------------
def _reference(cfg):
    """The same model with every plain autodiff path chosen explicitly."""
    cfg.model.language = {**cfg.model.language, "dense_kernel": "xla",
                          "attention": "xla_autodiff"}
    cfg.model.vision = {**cfg.model.vision, "dense_kernel": "xla",
                        "attention": "xla_autodiff"}
    cfg.train.loss_chunk = 0
    return cfg


def _loss_fn(cfg):
    setup = loop.plan(cfg)
    ctx = loop.LossContext(model=setup.model, loss_chunk=cfg.train.loss_chunk)
    batch = next(random_batches(cfg))

    def loss(p):
        total, weight, _ = next_token_loss(ctx, p, batch, jax.random.PRNGKey(0))
        return total / weight

    def logits(p):
        return setup.model.apply({"params": p}, batch["input_ids"],
                                 ctx.pixels(batch), segment_ids=batch["segment_ids"])[0]

    return setup, loss, logits


def test_jvp_through_model_apply_and_the_loss_equals_the_autodiff_paths():
    cfg = tiny_config()
    setup, loss, logits = _loss_fn(cfg)
    assert setup.model.cfg.language.dense_kernel == "cpu"  # custom VJPs in the program
    _, ref_loss, ref_logits = _loss_fn(_reference(tiny_config()))
    params = jax.device_get(setup.init_state(0).params)
    tangent = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).normal(
        size=x.shape), x.dtype), params)
    for f, ref in ((loss, ref_loss), (logits, ref_logits)):
        out, dout = jax.jit(lambda p, t, f=f: jax.jvp(f, (p,), (t,)))(params, tangent)
        want, dwant = jax.jvp(ref, (params,), (tangent,))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dout, dwant, rtol=1e-4, atol=1e-5)
        assert float(jnp.max(jnp.abs(dwant))) > 0
    # The directional derivative is the loss's: a central difference agrees.
    eps = 1e-4
    shifted = [loss(jax.tree.map(lambda p, t, s=s: p + s * eps * t, params, tangent))
               for s in (1, -1)]
    _, dloss = jax.jvp(loss, (params,), (tangent,))
    np.testing.assert_allclose((shifted[0] - shifted[1]) / (2 * eps), dloss, rtol=2e-2)


def test_hessian_vector_products_take_the_autodiff_paths():
    """Forward-over-reverse runs a custom VJP's backward under jvp, which JAX refuses; the
    documented way (layers.forward_mode) is the plain paths, chosen by config."""
    setup, loss, _ = _loss_fn(_reference(tiny_config()))
    params = jax.device_get(setup.init_state(0).params)
    tangent = jax.tree.map(jnp.ones_like, params)
    _, hvp = jax.jvp(jax.grad(loss), (params,), (tangent,))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(hvp))
    _, custom_loss, _ = _loss_fn(tiny_config())
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(jax.grad(custom_loss), (params,), (tangent,))


def test_activation_sharding_constraints_reach_the_lowered_step():
    """layers.constrain's constraints are in the program (flax's with_logical_constraint was a
    silent no-op under the loop's `with mesh:`; bench/results/sharding_audit.md), and outside
    a mesh context a model runs unconstrained."""
    cfg = tiny_config()
    _, text = lowered_step(cfg)
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    # One per constrain call site traced: decoder and vision layers, MLP hidden, logits.
    assert len(constraints) >= 4
    assert any('"fsdp"' in line for line in constraints)  # the batch axis, on the fsdp axis
    x = jnp.ones((8, 4, 16))
    assert layers.constrain(x, ("act_batch", None, "act_embed")) is x
