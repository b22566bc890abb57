"""KV-cache generation under jit: greedy equals the argmax of full forwards, batching with left
padding changes nothing, sampling is reproducible, top-k=1 is greedy."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from lvlm_jax.generate import filter_logits, generate_tokens, left_pad
from lvlm_jax.models import build_model, dummy_inputs

IMG = 7


@pytest.fixture(scope="module")
def model_and_params():
    model = build_model({
        "vision": {"preset": "tiny", "depth": 1},
        "language": {"preset": "tiny", "vocab_size": 64},
        "connector": {"kind": "projector"},
        "image_token_id": IMG,
    })
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                               **dummy_inputs(model.cfg)))["params"]
    return model, params


def prompts(model, rng, lengths):
    m = model.cfg.image_tokens
    return [[int(x) for x in rng.integers(8, 64, 2)] + [IMG] * m +
            [int(x) for x in rng.integers(8, 64, n)] for n in lengths]


def pixels_for(model, rng, b):
    s = model.cfg.vision.image_size
    return rng.normal(size=(b, 1, s, s, 3)).astype(np.float32)


def test_greedy_decoding_equals_argmax_of_full_forward_passes(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    row = prompts(model, rng, [5])[0]
    pixels = pixels_for(model, rng, 1)
    ids, seg = left_pad([row])
    out = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                          max_new_tokens=6)
    seq = list(row)
    forward = jax.jit(lambda p, ids, px: model.apply({"params": p}, ids, px)[0])
    for i in range(6):
        logits = forward(params, np.array([seq], np.int32), pixels)
        logp = jax.nn.log_softmax(logits[0, -1])
        nxt = int(np.argmax(logits[0, -1]))
        assert int(out["tokens"][0, i]) == nxt
        np.testing.assert_allclose(out["log_probs"][0, i], logp[nxt], rtol=1e-4, atol=1e-5)
        seq.append(nxt)


def test_batched_prompts_of_mixed_lengths_equal_one_by_one(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(1)
    rows = prompts(model, rng, [1, 6, 3])
    pixels = pixels_for(model, rng, 3)
    ids, seg = left_pad(rows)
    batched = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                              max_new_tokens=5)
    for i, row in enumerate(rows):
        one_ids, one_seg = left_pad([row])
        single = generate_tokens(model, params, one_ids, one_seg, pixels[i:i + 1],
                                 jax.random.PRNGKey(0), max_new_tokens=5)
        np.testing.assert_array_equal(batched["tokens"][i], single["tokens"][0])


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(2)
    rows = prompts(model, rng, [4, 4])
    pixels = pixels_for(model, rng, 2)
    ids, seg = left_pad(rows)
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(3), **kw)
    b = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(3), **kw)
    c = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(4), **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    greedy = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                             max_new_tokens=8)
    top1 = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(5),
                           max_new_tokens=8, temperature=0.7, top_k=1)
    np.testing.assert_array_equal(top1["tokens"], greedy["tokens"])


def test_stop_tokens_end_a_row_and_pad_the_rest(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(3)
    rows = prompts(model, rng, [3])
    ids, seg = left_pad(rows)
    pixels = pixels_for(model, rng, 1)
    free = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                           max_new_tokens=6)
    stop = int(free["tokens"][0, 2])
    first = int(np.argmax(np.asarray(free["tokens"][0]) == stop))
    out = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                          max_new_tokens=6, stop_ids=(stop,), pad_id=0)
    assert int(out["lengths"][0]) == first + 1
    assert np.all(np.asarray(out["tokens"][0, first + 1:]) == 0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.asarray(filter_logits(logits, top_p=0.8)) > -1e30
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.asarray(filter_logits(logits, top_k=3)) > -1e30
    np.testing.assert_array_equal(kept, [[True, True, True, False]])
