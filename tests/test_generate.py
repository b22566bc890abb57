"""KV-cache generation under jit: greedy equals the argmax of full forwards, batching with left
padding changes nothing, sampling is reproducible, top-k=1 is greedy, scanned and unscanned
stacks and sharded decoding give the same tokens."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lvlm_jax import sharding
from lvlm_jax.generate import filter_logits, first_argmax, generate_tokens, left_pad
from lvlm_jax.models import build_model, dummy_inputs
from lvlm_jax.models.scan_utils import unstack_layers

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


def test_first_argmax_breaks_ties_like_jnp_argmax():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-np.inf] * 4,
                       [0.0, np.nan, 5.0, np.nan]], np.float32)
    got = np.asarray(first_argmax(logits))
    np.testing.assert_array_equal(got, np.asarray(jax.numpy.argmax(logits, axis=-1)))
    np.testing.assert_array_equal(got, [1, 0, 0, 1])


def test_unscanned_stack_decodes_the_tokens_the_scanned_one_does(model_and_params):
    model, params = model_and_params
    cfg = model.cfg
    flat = build_model(dataclasses.replace(
        cfg, language=dataclasses.replace(cfg.language, scan_layers=False),
        vision=dataclasses.replace(cfg.vision, scan_layers=False)))
    rng = np.random.default_rng(4)
    rows = prompts(model, rng, [2, 5])
    pixels = pixels_for(model, rng, 2)
    ids, seg = left_pad(rows)
    kw = dict(max_new_tokens=6)
    scanned = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0), **kw)
    unrolled = generate_tokens(flat, unstack_layers(params), ids, seg, pixels,
                               jax.random.PRNGKey(0), **kw)
    np.testing.assert_array_equal(scanned["tokens"], unrolled["tokens"])
    np.testing.assert_allclose(scanned["log_probs"], unrolled["log_probs"], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*with mesh.*:DeprecationWarning")
def test_decoding_sharded_over_eight_devices_equals_one_device(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(5)
    rows = prompts(model, rng, [1, 2, 3, 4, 5, 6, 7, 8])
    pixels = pixels_for(model, rng, 8)
    ids, seg = left_pad(rows)
    kw = dict(max_new_tokens=4)
    single = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0), **kw)
    mesh = sharding.make_mesh({"ici": {"fsdp": -1}})
    rules = sharding.rules_from_config("fsdp")
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), **dummy_inputs(model.cfg))
    shardings = sharding.logical_shardings(boxed, mesh, rules)["params"]
    sharded_params = jax.device_put(params, shardings)
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))  # noqa: E731
    # The legacy mesh context, as the training loop uses (flax's logical constraints resolve
    # against it; under jax.set_mesh they also hit the scanned parameter slices and fail).
    with mesh, nn.logical_axis_rules(sharding.flax_rules(rules)):
        out = generate_tokens(model, sharded_params, put(ids), put(seg), put(pixels),
                              jax.random.PRNGKey(0), **kw)
    assert len(out["tokens"].sharding.device_set) == 8
    np.testing.assert_array_equal(out["tokens"], single["tokens"])
    np.testing.assert_allclose(out["log_probs"], single["log_probs"], rtol=1e-5, atol=1e-6)


def test_instruction_aware_resampler_decodes_and_rescores_with_the_prompt_as_instruction():
    # InstructBLIP's queries read the instruction; training takes it from the prompt (the tokens
    # before the first supervised one), so generation must give them the whole prompt.
    from lvlm_jax.train.stages.base import prompt_inputs

    model = build_model({
        "vision": {"preset": "tiny", "depth": 1},
        "language": {"preset": "tiny", "vocab_size": 64},
        "connector": {"kind": "resampler", "num_queries": 4, "width": 32, "depth": 1,
                      "num_heads": 2, "mlp_dim": 64, "instruction_aware": True,
                      "instruction_vocab": 0, "max_instruction_len": 16},
        "image_token_id": IMG,
    })
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                               **dummy_inputs(model.cfg)))["params"]
    rng = np.random.default_rng(3)
    rows = prompts(model, rng, [6, 3])
    pixels = pixels_for(model, rng, 2)
    ids, seg = left_pad(rows)
    out = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0),
                          max_new_tokens=3)

    def forward(loss_mask):
        batch = {"input_ids": ids, "segment_ids": seg, "loss_mask": loss_mask}
        positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
        return model.apply({"params": params}, ids, pixels, segment_ids=seg,
                           positions=positions, **prompt_inputs(model.cfg, batch))[0][:, -1]

    whole_prompt = forward(np.zeros(ids.shape, np.float32))
    np.testing.assert_array_equal(out["tokens"][:, 0], np.argmax(whole_prompt, -1))
    logp = jax.nn.log_softmax(whole_prompt)
    np.testing.assert_allclose(out["log_probs"][:, 0],
                               np.take_along_axis(logp, out["tokens"][:, :1], 1)[:, 0],
                               rtol=1e-4, atol=1e-5)
    # The instruction reaches the answer: leaving the prompt's last token out of it changes it.
    shorter = np.zeros(ids.shape, np.float32)
    shorter[:, -1] = 1
    assert np.abs(np.asarray(jax.nn.log_softmax(forward(shorter))) - logp).max() > 1e-3
    # PPO re-scores the sampled responses with one forward; it must read the same instruction.
    from lvlm_jax.train.rl_math import response_log_probs, sequence_inputs

    seq = sequence_inputs(ids, seg, out["tokens"], np.ones(out["tokens"].shape, np.float32))
    rescored, _ = response_log_probs(model, params, seq, pixels, 3)
    np.testing.assert_allclose(rescored, out["log_probs"], rtol=1e-4, atol=1e-4)


def test_with_unscanned_decoder_unrolls_the_decoder_and_decodes_the_same_tokens(
        model_and_params):
    # `lvlm generate` on CPU loads a scanned run this way (decoding ~1.5x faster unrolled).
    from lvlm_jax.api import VLMHandle, with_unscanned_decoder

    model, params = model_and_params
    scanned = VLMHandle(config=model.cfg, params=params, model=model)
    flat = with_unscanned_decoder(scanned)
    assert model.cfg.language.scan_layers and not flat.config.language.scan_layers
    assert "layers_0" in flat.params["decoder"]["stack"]
    assert flat.params["vision"] is params["vision"]  # only the decoder is unrolled
    rng = np.random.default_rng(6)
    rows = prompts(model, rng, [4, 2])
    pixels = pixels_for(model, rng, 2)
    ids, seg = left_pad(rows)
    kw = dict(max_new_tokens=5)
    a = generate_tokens(model, params, ids, seg, pixels, jax.random.PRNGKey(0), **kw)
    b = generate_tokens(flat.model, flat.params, ids, seg, pixels, jax.random.PRNGKey(0), **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["log_probs"], b["log_probs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_the_kv_cache_shards_over_the_batch_axes_like_the_activations(model_and_params, scan):
    # Without constraints XLA may keep a rollout's cache whole on every device; it follows the
    # activations instead: rows over (data, fsdp). A merged [batch * kv_heads] buffer (the
    # unscanned stack's) splits its leading axis the same way.
    from lvlm_jax.models.vlm import with_unscanned_decoder

    model, params = model_and_params if scan else with_unscanned_decoder(*model_and_params)
    rng = np.random.default_rng(7)
    ids, seg = left_pad(prompts(model, rng, [3] * 8))
    pixels = pixels_for(model, rng, 8)
    mesh = sharding.make_mesh({"ici": {"data": 2, "fsdp": 4}})
    rules = sharding.rules_from_config(None)

    def prefill(p, ids, seg, pixels):
        cache = model.apply({"params": p}, 8, ids.shape[1] + 2, method=model.init_cache)
        positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
        return model.apply({"params": p}, ids, pixels, segment_ids=seg, positions=positions,
                           cache=cache, return_hidden=True)[1]

    replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, P()))
    with sharding.mesh_context(mesh), nn.logical_axis_rules(sharding.flax_rules(rules)):
        cache = jax.jit(prefill)(replicated, ids, seg, pixels)
    batch = ("data", "fsdp")
    like = lambda buf, *spec: buf.sharding.is_equivalent_to(  # noqa: E731
        jax.sharding.NamedSharding(mesh, P(*spec)), buf.ndim)
    for buf in jax.tree.leaves((cache["k"], cache["v"])):
        want = (None, batch, "tensor", None, None) if scan else (batch, None, None)
        assert like(buf, *want) and not like(buf), buf.sharding.spec
    assert like(cache["positions"], batch, None)
