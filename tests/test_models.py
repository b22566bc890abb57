"""Behaviour of the assembled LVLM: scan, KV cache, prefix-LM, packing, cross-attention, merging."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax.models import build_model, dummy_inputs
from lvlm_jax.models.language import Decoder
from lvlm_jax.models.scan_utils import stack_layers, unstack_layers
from lvlm_jax.models.vision import VisionEncoder

IMG = 7  # placeholder id used by the tiny models
CONNECTORS = {
    "projector": {"kind": "projector", "projector": "mlp2x_gelu"},
    "resampler": {"kind": "resampler", "num_queries": 4, "width": 32, "depth": 2,
                  "num_heads": 4, "mlp_dim": 64, "instruction_aware": True},
    "cross_attention": {"kind": "cross_attention", "num_queries": 4, "width": 32, "depth": 1,
                        "num_heads": 4, "mlp_dim": 64, "cross_attention_every": 2},
}


def tiny(connector="projector", scan=True, prefix_lm=False, vision=None, language=None):
    cfg = {
        "vision": {"preset": "tiny", "scan_layers": scan, "depth": 3, **(vision or {})},
        "language": {"preset": "tiny", "scan_layers": scan, "num_layers": 4, **(language or {})},
        "connector": CONNECTORS[connector],
        "image_token_id": IMG,
        "prefix_lm": prefix_lm,
    }
    return build_model(cfg)


_PARAMS: dict = {}


def init(model, seed=0):
    """Initialised once per architecture: compiling init is the slowest part of these tests."""
    key = (model.cfg.connector, model.cfg.language.scan_layers, model.cfg.vision, seed)
    if key not in _PARAMS:
        variables = jax.jit(model.init)(jax.random.PRNGKey(seed),
                                        **dummy_inputs(model.cfg, batch=1))
        _PARAMS[key] = nn.meta.unbox(variables)
    return _PARAMS[key]


def run(module, params, *args, method=None, **kwargs):
    """module.apply under jit: eager flax dispatch is many times slower on CPU."""
    return jax.jit(functools.partial(module.apply, method=method))(params, *args, **kwargs)


def random_ids(rng, shape, vocab=512):
    return rng.integers(8, vocab, size=shape).astype(np.int32)  # never the placeholder id


def with_images(rng, model, batch=2, n_images=1, text_before=3, text_after=9):
    """Rows of [text, image placeholders, text] and matching pixels."""
    m = model.cfg.image_tokens
    marker = [IMG] * m if m else [IMG]
    rows = []
    for _ in range(batch):
        row = list(random_ids(rng, text_before))
        for _ in range(n_images):
            row += marker + list(random_ids(rng, 2))
        rows.append(row + list(random_ids(rng, text_after)))
    ids = np.array(rows, np.int32)
    size = model.cfg.vision.image_size
    pixels = rng.normal(size=(batch, n_images, size, size, 3)).astype(np.float32)
    return ids, pixels


def extra_inputs(model, ids):
    if model.cfg.connector.instruction_aware:
        return {"instruction": ids[:, :5]}
    return {}


@pytest.mark.parametrize("connector", list(CONNECTORS))
def test_scanned_and_unscanned_models_give_same_logits(connector):
    rng = np.random.default_rng(0)
    unscanned, scanned = tiny(connector, scan=False), tiny(connector, scan=True)
    params = init(unscanned)
    ids, pixels = with_images(rng, unscanned)
    extra = extra_inputs(unscanned, ids)
    ref, _ = run(unscanned, params, ids, pixels, **extra)
    stacked = stack_layers(params)
    abstract = jax.eval_shape(scanned.init, jax.random.PRNGKey(0), **dummy_inputs(scanned.cfg))
    assert jax.tree.map(np.shape, stacked) == jax.tree.map(np.shape, nn.meta.unbox(abstract))
    out, _ = run(scanned, stacked, ids, pixels, **extra)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # And back: the conversion is lossless.
    back = unstack_layers(stacked)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                    jax.tree.leaves(params), strict=False))


@pytest.mark.parametrize("connector,prefix_lm", [("projector", False), ("projector", True),
                                                 ("cross_attention", False)])
def test_kv_cache_decoding_matches_full_forward(connector, prefix_lm):
    rng = np.random.default_rng(1)
    model = tiny(connector, prefix_lm=prefix_lm)
    params = init(model)
    ids, pixels = with_images(rng, model, batch=2, text_after=10)
    t = ids.shape[1]
    n_new = 6
    prompt = t - n_new
    prefix = np.zeros(ids.shape, bool)
    prefix[:, :prompt] = True
    kw = {"prefix_mask": prefix} if prefix_lm else {}
    full, _ = run(model, params, ids, pixels, **kw)

    cache = model.apply(params, 2, t + 4, method=model.init_cache)
    pkw = {"prefix_mask": prefix[:, :prompt]} if prefix_lm else {}
    logits, cache = run(model, params, ids[:, :prompt], pixels, cache=cache, **pkw)
    np.testing.assert_allclose(logits, full[:, :prompt], rtol=1e-5, atol=1e-5)
    step = jax.jit(lambda p, tok, pos, c, mid: run(model,
        p, tok, cache=c, positions=pos, media_ids=mid,
        image_features=run(model, p, pixels, method=model.encode_images)
        if connector == "cross_attention" else None,
        **({"prefix_mask": jnp.zeros(tok.shape, bool)} if prefix_lm else {})))
    media_ids = np.cumsum(ids == IMG, axis=1) - 1
    for i in range(prompt, t):
        pos = np.full((2, 1), i, np.int32)
        logits, cache = step(params, ids[:, i:i + 1], pos, cache, media_ids[:, i:i + 1])
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == t


def test_prefix_lm_answer_tokens_never_change_prefix_logits():
    rng = np.random.default_rng(2)
    model = tiny(prefix_lm=True)
    params = init(model)
    ids, pixels = with_images(rng, model, batch=1, text_before=2, text_after=8)
    t = ids.shape[1]
    prompt = t - 4
    prefix = np.zeros(ids.shape, bool)
    prefix[:, :prompt] = True
    base, _ = run(model, params, ids, pixels, prefix_mask=prefix)

    changed_answer = ids.copy()
    changed_answer[:, prompt + 1] = (changed_answer[:, prompt + 1] + 1) % 500 + 8
    out, _ = run(model, params, changed_answer, pixels, prefix_mask=prefix)
    np.testing.assert_array_equal(out[:, :prompt + 1], base[:, :prompt + 1])
    assert not np.allclose(out[:, prompt + 1:], base[:, prompt + 1:])

    # Image and prompt positions see later prompt positions: changing the last prompt token
    # changes the logits at the first (text) position and at the image positions.
    changed_prompt = ids.copy()
    changed_prompt[:, prompt - 1] = (changed_prompt[:, prompt - 1] + 1) % 500 + 8
    out, _ = run(model, params, changed_prompt, pixels, prefix_mask=prefix)
    image_pos = np.where(ids[0] == IMG)[0]
    assert not np.allclose(out[0, 0], base[0, 0])
    assert not np.allclose(out[0, image_pos], base[0, image_pos])
    # Under a plain causal mask the same change leaves earlier positions alone.
    causal = tiny(prefix_lm=False)
    base_c, _ = run(causal, params, ids, pixels)
    out_c, _ = run(causal, params, changed_prompt, pixels)
    np.testing.assert_array_equal(out_c[:, :prompt - 1], base_c[:, :prompt - 1])


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_two_packed_samples_match_separate_runs(prefix_lm):
    rng = np.random.default_rng(3)
    model = tiny(prefix_lm=prefix_lm)
    params = init(model)
    a_ids, a_pix = with_images(rng, model, batch=1, text_before=2, text_after=5)
    b_ids, b_pix = with_images(rng, model, batch=1, text_before=4, text_after=3)
    la, lb = a_ids.shape[1], b_ids.shape[1]
    pad = 5
    packed = np.concatenate([a_ids, b_ids, np.zeros((1, pad), np.int32)], axis=1)
    seg = np.array([[1] * la + [2] * lb + [0] * pad], np.int32)
    pix = np.concatenate([a_pix, b_pix], axis=1)  # the row's images in placeholder order
    kw_a, kw_b, kw_p = {}, {}, {}
    if prefix_lm:
        pa, pb = np.arange(la) < la - 3, np.arange(lb) < lb - 2
        kw_a, kw_b = {"prefix_mask": pa[None]}, {"prefix_mask": pb[None]}
        kw_p = {"prefix_mask": np.concatenate([pa, pb, np.zeros(pad, bool)])[None]}
    out, _ = run(model, params, packed, pix, segment_ids=seg, **kw_p)
    ref_a, _ = run(model, params, a_ids, a_pix, **kw_a)
    ref_b, _ = run(model, params, b_ids, b_pix, **kw_b)
    np.testing.assert_allclose(out[:, :la], ref_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, la:la + lb], ref_b, rtol=1e-5, atol=1e-5)


def _flamingo_to_plain_lm(params, every):
    """decoder/stack/groups_g/layer_j -> decoder/stack/layers_{g*every+j}, drop the rest."""
    dec = params["params"]["decoder"]
    layers = {}
    for name, group in dec["stack"].items():
        g = int(name.split("_")[1])
        for j in range(every):
            layers[f"layers_{g * every + j}"] = group[f"layer_{j}"]
    plain = {k: v for k, v in dec.items() if k != "stack"}
    plain["stack"] = layers
    return {"params": plain}


def test_gated_cross_attention_at_init_equals_the_plain_lm():
    rng = np.random.default_rng(4)
    model = tiny("cross_attention", scan=False)
    params = init(model)
    ids, pixels = with_images(rng, model, batch=2, n_images=2)
    out, _ = run(model, params, ids, pixels)
    lm = Decoder(model.cfg.language)
    seg = np.ones(ids.shape, np.int32)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    lm_params = _flamingo_to_plain_lm(params, model.cfg.connector.cross_attention_every)
    emb = run(lm, lm_params, ids, method=lm.embed)
    ref, _ = run(lm, lm_params, emb, pos, seg)
    np.testing.assert_array_equal(out, ref)
    # Opening a gate makes the images matter.
    opened = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if "attn_gate" in jax.tree_util.keystr(p) else x, params)
    out2, _ = run(model, opened, ids, pixels)
    assert not np.allclose(out2, ref)


def test_each_image_lands_at_its_own_placeholders():
    rng = np.random.default_rng(5)
    model = tiny()
    params = init(model)
    ids, pixels = with_images(rng, model, batch=2, n_images=2)
    feats = run(model, params, pixels, method=model.encode_images)  # [b, 2, m, d]
    emb, _ = run(model, params, ids, pixels, method=model.embed_inputs)
    text_emb = run(model, params, ids, method=lambda m, i: m.decoder.embed(i))
    m = model.cfg.image_tokens
    for b in range(2):
        slots = np.where(ids[b] == IMG)[0]
        assert len(slots) == 2 * m
        np.testing.assert_array_equal(emb[b, slots[:m]], feats[b, 0])
        np.testing.assert_array_equal(emb[b, slots[m:]], feats[b, 1])
        text = ids[b] != IMG
        np.testing.assert_array_equal(emb[b, text], text_emb[b, text])
    # The two images' features differ, so a swap would have been caught.
    assert not np.allclose(feats[:, 0], feats[:, 1])


def test_vision_feature_layer_selects_hf_hidden_state():
    rng = np.random.default_rng(6)
    full = tiny(vision={"feature_layer": None, "post_norm": False})
    params = init(full)
    pixels = rng.normal(size=(1, 32, 32, 3)).astype(np.float32)
    vparams = {"params": params["params"]["vision"]}
    for scan in (True, False):
        p = vparams if scan else unstack_layers(vparams)
        enc = lambda fl, s=scan: VisionEncoder(dataclasses.replace(  # noqa: E731
            full.cfg.vision, feature_layer=fl, scan_layers=s))
        last = run(enc(None), p, pixels)
        np.testing.assert_allclose(run(enc(-1), p, pixels), last, rtol=1e-6)
        assert not np.allclose(run(enc(-2), p, pixels), last)
        np.testing.assert_allclose(run(enc(-2), p, pixels), run(enc(2), p, pixels), rtol=1e-6)


def test_position_embeddings_interpolate_to_a_new_resolution():
    model = tiny()
    params = init(model)
    enc = VisionEncoder(model.cfg.vision)
    big = np.random.default_rng(7).normal(size=(1, 48, 48, 3)).astype(np.float32)
    out = run(enc, {"params": params["params"]["vision"]}, big)
    assert out.shape == (1, 36, model.cfg.vision.width)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("connector,scan,qkv_bias", [("projector", True, True),
                                                     ("projector", False, False),
                                                     ("cross_attention", True, False)])
def test_fused_projection_weights_give_the_logits_of_the_separate_ones(connector, scan,
                                                                       qkv_bias):
    # Generation on CPU runs q/k/v and gate/up as one matmul each (language.fuse_projections).
    from lvlm_jax.models.language import FUSED_GATE_UP, FUSED_QKV, fuse_projections

    rng = np.random.default_rng(2)
    model = tiny(connector, scan=scan, language={"qkv_bias": qkv_bias})
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1),
                                               **dummy_inputs(model.cfg, batch=1)))
    ids, pixels = with_images(rng, model)
    fused = {"params": fuse_projections(params["params"])}
    names = {p[-1].key for p, _ in
             jax.tree_util.tree_leaves_with_path(fused["params"]["decoder"])}
    assert {f"{FUSED_QKV}_kernel", f"{FUSED_GATE_UP}_kernel"} <= names
    assert (f"{FUSED_QKV}_bias" in names) == qkv_bias
    # Fused weights must be read (a wrong split shows up in the logits), not just tolerated.
    broken = jax.tree_util.tree_map_with_path(
        lambda p, x: x[..., ::-1, :] if p[-1].key == f"{FUSED_QKV}_kernel" else x, fused)
    ref, _ = run(model, params, ids, pixels)
    got, _ = run(model, fused, ids, pixels)
    bad, _ = run(model, broken, ids, pixels)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(bad) - np.asarray(ref))) > 1e-3
