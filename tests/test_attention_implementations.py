"""Every attention implementation agrees with the XLA reference, and the reference with numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax.models.attention import (
    MaskInfo,
    dot_product_attention,
    splash_attention_interpret,
)

B, T, HEADS, KV_HEADS, HEAD_DIM = 2, 128, 8, 2, 32  # the splash kernel works in 128-token blocks
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}
BF16_TOL = {"atol": 2e-2, "rtol": 1e-2}  # bf16 keeps 8 mantissa bits; outputs here reach ~4


def _positions(segments: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 at the first token of every segment."""
    pos = np.zeros_like(segments)
    for b, row in enumerate(segments):
        for i in range(1, len(row)):
            pos[b, i] = 0 if row[i] != row[i - 1] else pos[b, i - 1] + 1
    return pos


def _case(name: str):
    """(segment ids, positions, prefix flags or None, causal, plain_causal) for a mask case."""
    ones = np.ones((B, T), np.int32)
    if name == "causal":
        return ones, _positions(ones), None, True, True
    if name == "padded":  # right padding in row 0, left padding in row 1
        seg = ones.copy()
        seg[0, 100:] = 0
        seg[1, :20] = 0
        return seg, _positions(seg), None, True, False
    if name == "packed":  # two samples per row, then padding
        seg = ones.copy()
        seg[0, 50:110], seg[0, 110:] = 2, 0
        seg[1, 70:] = 2
        return seg, _positions(seg), None, True, False
    if name == "prefix_lm":  # image + prompt prefix seen bidirectionally, then the suffix
        seg = ones.copy()
        seg[1, 90:] = 0
        prefix = np.zeros((B, T), bool)
        prefix[0, :64], prefix[1, :40] = True, True
        return seg, _positions(seg), prefix, True, False
    if name == "bidirectional":  # the vision tower's mask: padding only, no causality
        seg = ones.copy()
        seg[0, 96:] = 0
        return seg, _positions(seg), None, False, False
    raise ValueError(name)


CASES = ("causal", "padded", "packed", "prefix_lm", "bidirectional")


def _qkv(dtype, t=T, s=T, heads=HEADS, kv_heads=KV_HEADS, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, heads, HEAD_DIM))
    k = rng.normal(size=(B, s, kv_heads, HEAD_DIM))
    v = rng.normal(size=(B, s, kv_heads, HEAD_DIM))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _mask(seg, pos, prefix, causal, plain_causal):
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    prefix = None if prefix is None else jnp.asarray(prefix)
    return MaskInfo(seg, seg, pos, pos, prefix, prefix, causal, plain_causal)


def _naive_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_prefix, kv_prefix, causal):
    """Softmax attention one (row, head, query) at a time, the mask rules spelled out in numpy.

    Padding queries (segment 0) are left as NaN: no implementation defines their output.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.full(q.shape, np.nan)
    for r in range(b):
        for head in range(h):
            kv_head = head // group  # query heads share kv heads in contiguous groups
            for i in range(t):
                if q_seg[r, i] == 0:
                    continue
                keys = [j for j in range(k.shape[1])
                        if kv_seg[r, j] == q_seg[r, i] and (
                            not causal or kv_pos[r, j] <= q_pos[r, i]
                            or (q_prefix is not None and q_prefix[r, i] and kv_prefix[r, j]))]
                scores = np.array([q[r, i, head] @ k[r, j, kv_head] for j in keys]) / d ** 0.5
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[r, i, head] = p @ v[r, keys, kv_head]
    return out


def _assert_close_on_valid_queries(actual, expected, q_seg, tol):
    valid = np.asarray(q_seg) != 0
    np.testing.assert_allclose(np.asarray(actual, np.float32)[valid],
                               np.asarray(expected, np.float32)[valid], **tol)


def _run(implementation, q, k, v, mask):
    if implementation == "splash":
        return splash_attention_interpret(q, k, v, mask, q.shape[-1] ** -0.5)
    return dot_product_attention(q, k, v, mask, implementation=implementation)


def _skip_unsupported(implementation, case, dtype):
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            pytest.skip("cuDNN flash attention needs an NVIDIA GPU")
        if dtype == jnp.float32:
            pytest.skip("cuDNN flash attention takes only fp16/bf16 inputs")


@pytest.mark.parametrize("case", ("causal", "packed", "prefix_lm"))
@pytest.mark.parametrize("kv_heads", (HEADS, KV_HEADS))
def test_xla_reference_matches_naive_numpy_attention(case, kv_heads):
    seg, pos, prefix, causal, plain = _case(case)
    q, k, v = _qkv(jnp.float32, kv_heads=kv_heads)
    out = dot_product_attention(q, k, v, _mask(seg, pos, prefix, causal, plain))
    expected = _naive_attention(q, k, v, seg, seg, pos, pos, prefix, prefix, causal)
    _assert_close_on_valid_queries(out, expected, seg, FP32_TOL)


def test_xla_reference_without_mask_matches_naive_numpy_attention():
    q, k, v = _qkv(jnp.float32, t=16, s=48, kv_heads=KV_HEADS)
    out = dot_product_attention(q, k, v, None)
    seg_q, seg_kv = np.ones((B, 16), int), np.ones((B, 48), int)
    expected = _naive_attention(q, k, v, seg_q, seg_kv, None, None, None, None, causal=False)
    _assert_close_on_valid_queries(out, expected, seg_q, FP32_TOL)


def test_xla_reference_masks_a_decode_step_by_positions_into_the_cache():
    # Three new tokens written at cache slots 5..7 of a 16-slot cache; slots 8.. are empty.
    kv_seg = np.zeros((B, 16), np.int32)
    kv_seg[:, :8] = 1
    kv_pos = np.broadcast_to(np.arange(16), (B, 16)).astype(np.int32)
    q_seg, q_pos = np.ones((B, 3), np.int32), kv_pos[:, 5:8].copy()
    q, k, v = _qkv(jnp.float32, t=3, s=16)
    mask = MaskInfo(*(jnp.asarray(a) for a in (q_seg, kv_seg, q_pos, kv_pos)))
    out = dot_product_attention(q, k, v, mask)
    expected = _naive_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, None, None, causal=True)
    _assert_close_on_valid_queries(out, expected, q_seg, FP32_TOL)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", ("jax", "cudnn", "splash"))
def test_implementation_matches_xla_reference(implementation, case, dtype):
    _skip_unsupported(implementation, case, dtype)
    seg, pos, prefix, causal, plain = _case(case)
    mask = _mask(seg, pos, prefix, causal, plain)
    q, k, v = _qkv(dtype)
    out = _run(implementation, q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype
    # bf16 results are held to the fp32 reference of the same (bf16-rounded) inputs.
    expected = dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    _assert_close_on_valid_queries(out, expected, seg, FP32_TOL if dtype == jnp.float32
                                   else BF16_TOL)


@pytest.mark.parametrize("case", CASES)
def test_xla_reference_in_bf16_stays_within_bf16_tolerance_of_fp32(case):
    seg, pos, prefix, causal, plain = _case(case)
    mask = _mask(seg, pos, prefix, causal, plain)
    q, k, v = _qkv(jnp.bfloat16)
    out = dot_product_attention(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    expected = dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    _assert_close_on_valid_queries(out, expected, seg, BF16_TOL)


@pytest.mark.parametrize("implementation", ("jax", "cudnn", "splash"))
def test_implementation_without_mask_matches_xla_reference(implementation):
    _skip_unsupported(implementation, "none", jnp.bfloat16)
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    q, k, v = _qkv(dtype, heads=HEADS, kv_heads=HEADS)
    out = _run(implementation, q, k, v, None)
    expected = dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), None)
    tol = BF16_TOL if dtype == jnp.bfloat16 else FP32_TOL
    _assert_close_on_valid_queries(out, expected, np.ones((B, T)), tol)


def test_splash_pads_lengths_that_are_not_multiples_of_its_block():
    # 72 query tokens (a packed row and a padded row) and a 72 x 200 cross-attention.
    seg = np.ones((B, 72), np.int32)
    seg[0, 30:] = 2
    seg[1, 60:] = 0
    mask = _mask(seg, _positions(seg), None, True, False)
    q, k, v = _qkv(jnp.float32, t=72, s=72)
    _assert_close_on_valid_queries(splash_attention_interpret(q, k, v, mask, HEAD_DIM ** -0.5),
                                   dot_product_attention(q, k, v, mask), seg, FP32_TOL)
    q, k, v = _qkv(jnp.float32, t=72, s=200)
    _assert_close_on_valid_queries(splash_attention_interpret(q, k, v, None, HEAD_DIM ** -0.5),
                                   dot_product_attention(q, k, v, None), seg * 0 + 1, FP32_TOL)


def test_splash_decode_step_matches_xla_reference():
    kv_seg = np.zeros((B, T), np.int32)
    kv_seg[:, :40] = 1
    kv_pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
    q_seg, q_pos = np.ones((B, 1), np.int32), kv_pos[:, 39:40].copy()
    mask = MaskInfo(*(jnp.asarray(a) for a in (q_seg, kv_seg, q_pos, kv_pos)))
    q, k, v = _qkv(jnp.float32, t=1, s=T)
    _assert_close_on_valid_queries(splash_attention_interpret(q, k, v, mask, HEAD_DIM ** -0.5),
                                   dot_product_attention(q, k, v, mask), q_seg, FP32_TOL)


def _packed_prefix_rows():
    """Four rows of prefix-LM samples: two packed samples then right padding (each sample's
    prefix leads it), left padding, a row that is all prefix (HF's default without token
    types), and a row of padding only (no real key at all)."""
    seg = np.ones((4, T), np.int32)
    seg[0, 60:110], seg[0, 110:] = 2, 0
    seg[1, :10] = 0
    seg[3] = 0
    prefix = np.zeros((4, T), bool)
    prefix[0, :20], prefix[0, 60:90], prefix[1, 10:50], prefix[2] = True, True, True, True
    return seg, _positions(seg), prefix


def _loss_and_grads(implementation, q, k, v, mask, valid):
    """sum(out * w) over the real queries, and its gradients by q, k and v."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), q.dtype)

    def loss(q, k, v):
        out = dot_product_attention(q, k, v, mask, implementation=implementation)
        return jnp.sum(jnp.where(valid[:, :, None, None], out * w, 0.0)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def test_splash_prefix_lm_and_segments_match_xla_reference_forward_and_gradients():
    seg, pos, prefix = _packed_prefix_rows()
    mask = _mask(seg, pos, prefix, True, False)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(4, T, h, HEAD_DIM)), jnp.float32)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    valid = jnp.asarray(seg != 0)
    (loss, out), grads = _loss_and_grads("splash_interpret", q, k, v, mask, valid)
    (ref_loss, ref_out), ref_grads = _loss_and_grads("xla", q, k, v, mask, valid)
    _assert_close_on_valid_queries(out, ref_out, seg, FP32_TOL)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # Every gradient is finite, the padding row's included: the discarded branch of each
    # query and the row with no real key bring no NaN.
    for g, ref in zip(grads, ref_grads, strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, ref, **FP32_TOL)
    assert np.abs(np.asarray(grads[1])[3]).max() == 0  # no real query reads row 3's keys


def test_splash_refuses_a_matmul_precision_mosaic_cannot_compile():
    q, k, v = _qkv(jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        with pytest.raises(ValueError, match="bfloat16 inputs cannot run at "
                                             "jax_default_matmul_precision='highest'"):
            jax.eval_shape(functools.partial(dot_product_attention, implementation="splash"),
                           q, k, v, None)
        # fp32 inputs at "highest", and the interpreter at any precision, are fine.
        q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
        jax.eval_shape(functools.partial(dot_product_attention, implementation="splash"),
                       q32, k32, v32, None)
        jax.eval_shape(functools.partial(dot_product_attention,
                                         implementation="splash_interpret"), q, k, v, None)


def test_unknown_implementation_and_bad_head_counts_are_rejected():
    q, k, v = _qkv(jnp.float32, t=4, s=4)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dot_product_attention(q, k, v, None, implementation="flash")
    q3, k3, v3 = _qkv(jnp.float32, t=4, s=4, heads=8, kv_heads=3)
    with pytest.raises(ValueError, match="not a multiple"):
        dot_product_attention(q3, k3, v3, None)


@pytest.mark.parametrize("packing", ("none", "first_fit"))
def test_cudnn_gets_the_causal_flag_for_unpacked_rows_and_a_dense_mask_otherwise(monkeypatch,
                                                                                 packing):
    """What the train step hands jax.nn.dot_product_attention with attention="cudnn": the
    loader's unpacked rows (one right-padded sample each) get is_causal and no mask; packed
    rows the dense [b, 1, t, t] mask. cuDNN itself needs an NVIDIA GPU: the spy passes the
    arguments on to XLA's implementation, and this checks the trace, not the kernel."""
    from training_utils import tiny_config

    from lvlm_jax.train import loop

    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, bias=None, mask=None, *, implementation=None, **kw):
        calls.append((implementation, kw.get("is_causal", False),
                      None if mask is None else mask.shape))
        return real(q, k, v, bias, mask, **kw)

    cfg = tiny_config(**{"data.packing": packing})
    cfg.model.language = {**cfg.model.language, "attention": "cudnn"}
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    setup = loop.plan(cfg)
    calls.clear()  # the step's calls, not those of the model's init
    jax.eval_shape(setup.step_fn, setup.abstract_state, setup.abstract_batch())
    b, t = cfg.data.batch_size, cfg.data.seq_len
    expected = ("cudnn", True, None) if packing == "none" else ("cudnn", False, (b, 1, t, t))
    assert calls and set(calls) == {expected}


def test_plain_causal_is_ignored_where_the_kernels_causal_mask_would_be_wrong(monkeypatch):
    """A prefix (PaliGemma) or a query block into a longer KV cache keeps the dense mask."""
    calls = []

    def spy(q, k, v, mask=None, *, is_causal=False, **kw):
        calls.append((is_causal, None if mask is None else mask.shape))
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    q, k, v = _qkv(jnp.bfloat16)
    seg, pos, prefix, causal, _ = _case("prefix_lm")
    dot_product_attention(q, k, v, _mask(seg, pos, prefix, causal, True), implementation="cudnn")
    seg, pos = (jnp.asarray(a) for a in _case("causal")[:2])
    decode = MaskInfo(seg[:, -1:], seg, pos[:, -1:], pos, plain_causal=True)
    dot_product_attention(q[:, -1:], k, v, decode, implementation="cudnn")
    dot_product_attention(q, k, v, MaskInfo.for_sequence(seg, pos, plain_causal=True),
                          implementation="cudnn")
    assert calls == [(False, (B, 1, T, T)), (False, (B, 1, 1, T)), (True, None)]
