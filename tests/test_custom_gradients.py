"""Every hand-written backward pass equals jax.grad of its plain autodiff reference: attention's,
the CPU dense's and the chunked cross-entropy's, on random inputs, unsharded and sharded over
fsdp x tensor, with packing masks, with tied embeddings, and under bf16 compute.

Tolerances are relative to the largest gradient entry of each array (see assert_close): 1e-5
in fp32; 2e-2 under bf16 compute, whose 8-bit mantissa (3e-3 relative per rounding) is
compounded over a few ops that the two backward passes round differently. The whole model's
bf16 gradient is checked for accuracy against the fp32 one instead (its own docstring).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from training_utils import tiny_config

from lvlm_jax import sharding
from lvlm_jax.models import layers
from lvlm_jax.models.attention import MaskInfo, dot_product_attention
from lvlm_jax.train import loop, losses
from lvlm_jax.train.stages.base import next_token_loss

FP32_RTOL, BF16_RTOL = 1e-5, 2e-2


def assert_close(got, want, rtol, floor=1e-3):
    """Each array within rtol x its largest reference entry; an array whose gradient is zero in
    exact arithmetic (a key bias: softmax ignores a constant added to a row's logits) holds
    only rounding noise, measured against `floor` x the largest entry of the whole gradient."""
    overall = max(float(np.max(np.abs(np.asarray(w, np.float32))))
                  for w in jax.tree.leaves(want))
    assert overall > 0, "the reference gradient is all zero"
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = max(float(np.max(np.abs(w))), floor * overall)
        err = float(np.max(np.abs(g - w)))
        assert err <= rtol * scale, (f"{jax.tree_util.keystr(path)}: max |diff| {err:.3e} > "
                                     f"{rtol} x max |grad| {scale:.3e}")


def packed_mask(b: int, t: int, seed: int = 0) -> MaskInfo:
    """Rows of 2-3 packed segments and right padding (segment 0), positions restarting."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(2, t - 2), size=2, replace=False))
        end = t - int(rng.integers(0, 4))
        for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end], strict=True), start=1):
            seg[r, lo:hi] = s
            pos[r, lo:hi] = np.arange(hi - lo)
    return MaskInfo.for_sequence(jnp.asarray(seg), jnp.asarray(pos))


MESH_FSDP_TP = {"ici": {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}}


def fsdp_tp_mesh():
    return sharding.make_mesh(MESH_FSDP_TP)


# ---- attention ------------------------------------------------------------------------------
def attention_inputs(dtype, b=4, t=24, h=4, kvh=2, d=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, t, kvh, d), dtype)
    dout = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
    return q, k, v, dout


def attention_grads(implementation, q, k, v, dout, mask):
    def f(q, k, v):
        out = dot_product_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * dout)

    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, FP32_RTOL), (jnp.bfloat16, BF16_RTOL)])
@pytest.mark.parametrize("masked", ["packed", "none"])
def test_attention_backward_equals_autodiff(dtype, rtol, masked):
    q, k, v, dout = attention_inputs(dtype)
    mask = packed_mask(q.shape[0], q.shape[1]) if masked == "packed" else None
    got = attention_grads("xla", q, k, v, dout, mask)
    want = attention_grads("xla_autodiff", q, k, v, dout, mask)
    assert_close(got, want, rtol)


def test_attention_backward_equals_autodiff_sharded_over_fsdp_and_tensor():
    q, k, v, dout = attention_inputs(jnp.float32, b=8)
    mask = packed_mask(8, q.shape[1])
    mesh = fsdp_tp_mesh()
    heads = NamedSharding(mesh, P("fsdp", None, "tensor", None))
    q, k, v, dout = (jax.device_put(x, heads) for x in (q, k, v, dout))
    got = attention_grads("xla", q, k, v, dout, mask)
    want = attention_grads("xla_autodiff", *jax.device_get((q, k, v, dout)), mask)
    assert got[0].sharding.spec == heads.spec  # it ran sharded, not gathered
    assert_close(got, want, FP32_RTOL)


# ---- the CPU dense --------------------------------------------------------------------------
def dense_grads(kernel, x, dout, dtype, features=(3, 8), axis=-1):
    mod = layers.dense(features, ("embed", "heads", "head_dim"), axis=axis, use_bias=True,
                       dtype=dtype, kernel=kernel)
    params = nn.meta.unbox(mod.init(jax.random.PRNGKey(1), x))["params"]

    def f(p, x):
        return jnp.sum(mod.apply({"params": p}, x).astype(jnp.float32) * dout)

    return jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, FP32_RTOL), (jnp.bfloat16, BF16_RTOL)])
def test_cpu_dense_backward_equals_autodiff(dtype, rtol):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 10, 16), dtype)
    dout = jax.random.normal(jax.random.PRNGKey(2), (4, 10, 3, 8))
    assert_close(dense_grads("cpu", x, dout, dtype), dense_grads("xla", x, dout, dtype), rtol)


def test_cpu_dense_backward_equals_autodiff_over_two_contracted_axes_sharded():
    mesh = fsdp_tp_mesh()
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 4, 4))  # [b, t, heads, head_dim]
    dout = jax.random.normal(jax.random.PRNGKey(2), (8, 6, 16))
    xs = jax.device_put(x, NamedSharding(mesh, P("fsdp", None, "tensor", None)))
    got = dense_grads("cpu", xs, dout, jnp.float32, features=16, axis=(-2, -1))
    want = dense_grads("xla", x, dout, jnp.float32, features=16, axis=(-2, -1))
    assert_close(got, want, FP32_RTOL)


# ---- the chunked cross-entropy --------------------------------------------------------------
def ce_case(dtype, tied: bool, b=4, t=37, d=16, vocab=50, seed=0):
    """(params, tokens, targets, weights, loss(params, chunk)): a tiny embed -> mix -> LM head
    whose head is the embedding (tied) or its own matrix; weights with zeros (prompt, padding)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    params = {"embed": jax.random.normal(ks[0], (vocab, d)) * 0.3,
              "mix": jax.random.normal(ks[1], (d, d)) * 0.3}
    if not tied:
        params["head"] = jax.random.normal(ks[2], (d, vocab)) * 0.3
    tokens = jax.random.randint(ks[3], (b, t), 0, vocab)
    targets = jnp.roll(tokens, -1, axis=1)
    rng = np.random.default_rng(seed)
    weights = jnp.asarray((rng.random((b, t)) > 0.4) * (np.arange(t)[None] > 5), jnp.float32)

    def loss(p, chunk):
        hidden = jnp.tanh(p["embed"][tokens].astype(dtype) @ p["mix"].astype(dtype))
        w = p["embed"].T if tied else p["head"]
        head = lambda h: h @ w.astype(dtype)  # noqa: E731
        return losses.chunked_cross_entropy_sum(hidden, head, targets, weights, chunk)

    return params, loss


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, FP32_RTOL), (jnp.bfloat16, BF16_RTOL)])
def test_chunked_cross_entropy_backward_equals_autodiff(tied, dtype, rtol):
    params, loss = ce_case(dtype, tied)
    got = jax.jit(jax.grad(lambda p: loss(p, 8)))(params)  # 5 chunks, the last one padded
    want = jax.jit(jax.grad(lambda p: loss(p, 0)))(params)  # the plain unchunked loss
    np.testing.assert_allclose(loss(params, 8), loss(params, 0), rtol=rtol)
    assert_close(got, want, rtol)


# ---- the whole train loss, every custom path at once -----------------------------------------
def loss_grads(cfg, params, batch):
    setup = loop.plan(cfg)
    ctx = loop.LossContext(model=setup.model, loss_chunk=cfg.train.loss_chunk)

    def f(p):
        total, weight, _ = next_token_loss(ctx, p, batch, jax.random.PRNGKey(0))
        return total / weight

    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        params = jax.device_put(params, setup.state_shardings.params)
        batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in batch.items()}
        return setup, jax.jit(jax.grad(f))(params)


def packed_batch(cfg, seed=0):
    b, t, size = cfg.data.batch_size, cfg.data.seq_len, cfg.data.image_size
    rng = np.random.default_rng(seed)
    mask = packed_mask(b, t, seed)
    seg = np.asarray(mask.q_segment)
    ids = rng.integers(8, 128, size=(b, t)).astype(np.int32) * (seg > 0)
    ids[:, 1:5] = 5  # one image block (image_token_id 5) at the start of each row
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    same = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros((b, 1), bool)], axis=1)
    return {"input_ids": ids, "targets": targets,
            "loss_mask": ((targets > 5) & same & (seg > 0)).astype(np.float32),
            "segment_ids": seg, "positions": np.asarray(mask.q_positions),
            "pixel_values": rng.integers(0, 256, size=(b, 1, size, size, 3), dtype=np.uint8)}


def model_config(dtype: str, reference: bool):
    """Tied embeddings, sharded fsdp=4 x tensor=2; the custom backward passes (the CPU dense,
    attention's, the chunked cross-entropy's) or their references (dense_kernel=xla,
    attention=xla_autodiff, loss_chunk=0)."""
    tower = {"dense_kernel": "xla" if reference else "cpu", "dtype": dtype,
             "attention": "xla_autodiff" if reference else "xla"}
    c = tiny_config(seq=32)
    c.model.language = {"preset": "tiny", "vocab_size": 128, "num_layers": 2,
                        "tie_embeddings": True, **tower}
    c.model.vision = {**c.model.vision, **tower}
    c.mesh.ici = MESH_FSDP_TP["ici"]
    c.train.loss_chunk = 0 if reference else 8
    return c


@pytest.fixture(scope="module")
def model_case():
    """(params, a packed batch, the fp32 autodiff gradient of the train loss)."""
    batch = packed_batch(model_config("float32", False))
    params = jax.device_get(loop.plan(model_config("float32", False)).init_state(0).params)
    setup, want = loss_grads(model_config("float32", True), params, batch)
    assert setup.model.cfg.language.dense_kernel == "xla"
    return params, batch, want


def test_train_loss_gradient_with_every_custom_backward_equals_autodiff(model_case):
    params, batch, want = model_case
    setup, got = loss_grads(model_config("float32", False), params, batch)
    assert setup.model.cfg.language.dense_kernel == "cpu"
    assert setup.mesh.shape["fsdp"] == 4 and setup.mesh.shape["tensor"] == 2
    assert_close(got, want, FP32_RTOL)


def test_train_loss_gradient_under_bf16_is_as_accurate_as_autodiffs(model_case):
    """Under bf16 compute both gradients are 1.5-6% (per array) from the fp32 one, bf16's own
    error over two layers a tower; the custom passes add none: their relative L2 error over
    the whole gradient is within 1.25x autodiff's, and each array within 8% of autodiff's
    (a key bias's noise: within 8% of 1e-2 x the largest entry)."""
    params, batch, f32 = model_case
    _, custom = loss_grads(model_config("bfloat16", False), params, batch)
    _, auto = loss_grads(model_config("bfloat16", True), params, batch)

    def rel_l2(g):
        num = sum(float(np.sum((np.asarray(a, np.float32) - np.asarray(b)) ** 2))
                  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(f32), strict=True))
        return (num / sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(f32))) ** .5

    err_custom, err_auto = rel_l2(custom), rel_l2(auto)
    assert 0 < err_auto < 0.1
    assert err_custom <= 1.25 * err_auto, (err_custom, err_auto)
    assert_close(custom, auto, 0.08, floor=1e-2)
