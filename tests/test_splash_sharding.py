"""Splash attention under a mesh: the kernel runs in shard_map over the model's mesh (batch over
data x fsdp, heads over tensor, GQA's kv heads repeated to the tensor axis), and the tiny LLaVA
with splash attention (Pallas interpret mode on this CPU) gives the "xla" model's logits and
loss."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax import config as config_lib
from lvlm_jax import sharding
from lvlm_jax.models import build_model, vlm_config
from lvlm_jax.models.attention import MaskInfo, dot_product_attention
from lvlm_jax.train.stages.base import LossContext, next_token_loss

LLAVA15 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "llava15.py")
B, T, HEADS, HEAD_DIM = 4, 128, 4, 32
IMG = 3


def _positions(seg: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at the first token of every segment."""
    pos = np.zeros_like(seg)
    for i in range(1, seg.shape[1]):
        pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
    return pos


def _rows() -> tuple[np.ndarray, np.ndarray]:
    """Segment ids and prefix flags: packed samples, right and left padding, an all-prefix row."""
    seg = np.ones((B, T), np.int32)
    seg[0, 60:] = 2
    seg[1, 100:] = 0
    seg[2, :10] = 0
    prefix = np.zeros((B, T), bool)
    prefix[0, :20], prefix[0, 60:90], prefix[1, :40], prefix[2, 10:50], prefix[3] = (True,) * 5
    return seg, prefix


def _loss_and_grads(implementation, q, k, v, mask, valid):
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), q.dtype)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(jnp.where(valid[:, :, None, None], out * w, 0.0)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def test_splash_under_a_cpu_mesh_runs_in_shard_map_and_equals_the_reference():
    """data=2 x fsdp=2 x tensor=2 over the 8 fake devices; 4 query heads on one kv head, so
    each tensor shard gets its own copy of the kv head."""
    seg, prefix = _rows()
    pos = _positions(seg)
    mask = MaskInfo.for_sequence(jnp.asarray(seg), jnp.asarray(pos), jnp.asarray(prefix))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, h, HEAD_DIM)), jnp.float32)
               for h in (HEADS, 1, 1))
    valid = jnp.asarray(seg != 0)
    (ref_loss, ref_out), ref_grads = _loss_and_grads("xla", q, k, v, mask, valid)(q, k, v)
    mesh = sharding.make_mesh({"ici": {"data": 2, "fsdp": 2, "tensor": 2}})
    rules = sharding.flax_rules(sharding.rules_from_config("fsdp_tp"))
    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        fn = _loss_and_grads("splash_interpret", q, k, v, mask, valid)
        jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
        (loss, out), grads = fn(q, k, v)
    # One shard_map a kernel call: forward causal and prefix, each differentiated.
    assert "shard_map" in jaxpr and "P(('data', 'fsdp'), None, 'tensor', None)" in jaxpr
    np.testing.assert_allclose(np.asarray(out)[seg != 0], np.asarray(ref_out)[seg != 0],
                               atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=2e-5, rtol=2e-5)


def _tiny_llava(attention: str, prefix_lm: bool):
    """experiments/llava15.py:tiny's model in fp32, with `attention` in the decoder."""
    cfg = config_lib.load(f"{LLAVA15}:tiny").model.to_dict()
    cfg["vision"]["dtype"] = "float32"
    cfg["language"] = dict(cfg["language"], attention=attention, dtype="float32")
    cfg.update(image_token_id=IMG, prefix_lm=prefix_lm)
    return build_model(vlm_config(cfg), platform="cpu")


def _batch(model):
    """Two rows: two packed samples, and one sample with right padding; one image each."""
    rng = np.random.default_rng(0)
    n_img = model.cfg.image_tokens
    ids = rng.integers(8, model.cfg.language.vocab_size, size=(2, T)).astype(np.int32)
    ids[:, 1:1 + n_img] = IMG
    seg = np.ones((2, T), np.int32)
    seg[0, 80:] = 2
    seg[1, 100:] = 0
    targets = np.concatenate([ids[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
    loss_mask = ((np.arange(T) > n_img) & (seg > 0)).astype(np.float32)
    size = model.cfg.vision.image_size
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets),
            "loss_mask": jnp.asarray(loss_mask), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(_positions(seg)),
            "pixel_values": jnp.asarray(rng.integers(0, 256, (2, 1, size, size, 3), np.uint8))}


@pytest.fixture(scope="module")
def tiny_params():
    """The tiny LLaVA's initial params (the same for either attention or mask) and a batch."""
    model = _tiny_llava("xla", False)
    batch = _batch(model)
    init = jax.jit(model.init)(jax.random.PRNGKey(0), batch["input_ids"],
                               batch["pixel_values"].astype(jnp.float32))
    return init["params"], batch


@pytest.mark.parametrize("prefix_lm", (False, True), ids=("causal", "prefix_lm"))
def test_tiny_llava_with_splash_gives_the_xla_models_logits_and_loss(tiny_params, prefix_lm):
    """On a 1-device mesh (fsdp=1), fp32: logits and next-token loss to 1e-5. prefix_lm: the
    prompt (each row's tokens before its first supervised one) is PaliGemma's prefix."""
    params, batch = tiny_params
    mesh = sharding.make_mesh({"ici": {"fsdp": 1}}, jax.devices()[:1])
    rules = sharding.flax_rules(sharding.rules_from_config("fsdp_tp"))

    @functools.partial(jax.jit, static_argnums=2)
    def logits_and_loss(params, batch, attention):
        model = _tiny_llava(attention, prefix_lm)
        ctx = LossContext(model=model, loss_chunk=64)
        inputs = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
        if prefix_lm:  # as the loss derives it from the loss mask
            inputs["prefix_mask"] = (jnp.cumsum(batch["loss_mask"], axis=1) == 0) & (
                batch["segment_ids"] > 0)
        logits, _ = model.apply({"params": params}, batch["input_ids"], ctx.pixels(batch),
                                **inputs)
        total, weight, _ = next_token_loss(ctx, params, batch, None)
        return logits, total / weight

    with sharding.mesh_context(mesh), nn.logical_axis_rules(rules):
        logits, loss = logits_and_loss(params, batch, "splash_interpret")
        ref_logits, ref_loss = logits_and_loss(params, batch, "xla")
    real = np.asarray(batch["segment_ids"]) != 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(ref_logits)[real],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert 5 < float(loss) < 7  # about log(512): the untrained model's cross-entropy
