"""Flattened media (models/media_layout.py): crops of a whole batch in one budgeted array."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvlm_jax.models.media_layout import (
    BudgetError,
    Media,
    MediaLayout,
    build_layout,
    num_media_tokens,
    place_crops,
)
from lvlm_jax.models.vision import VisionEncoder
from lvlm_jax.models.vlm import VLM, vlm_config

IMG = 5


def _cfg(**kw):
    return vlm_config({
        "vision": {"image_size": 32, "patch_size": 8, "width": 16, "depth": 1, "mlp_dim": 32,
                   "num_heads": 2},
        "language": {"vocab_size": 64, "embed_dim": 32, "num_layers": 1, "num_heads": 2,
                     "num_kv_heads": 2, "mlp_dim": 64, "head_dim": 16},
        "image_token_id": IMG, **kw})


def _rows(counts, tokens, rng):
    t = max(counts) * tokens + 8
    ids = np.zeros((len(counts), t), np.int32)
    for r, n in enumerate(counts):
        row = [*rng.integers(6, 64, 4), *[IMG] * (tokens * n), *rng.integers(6, 64, 4)]
        ids[r, :len(row)] = row
    return ids


def test_rows_of_0_1_3_images_encode_4_crops_and_equal_the_padded_layout():
    cfg = _cfg()
    model, rng = VLM(cfg), np.random.default_rng(0)
    counts = [0, 1, 3]
    ids = _rows(counts, cfg.vision.num_tokens, rng)
    images = [rng.normal(size=(n, 32, 32, 3)).astype(np.float32) for n in counts]
    dense = np.zeros((3, 3, 32, 32, 3), np.float32)
    for r, n in enumerate(counts):
        dense[r, :n] = images[r]
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(dense))["params"]
    ref, _ = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(dense))

    slots, weights, _ = build_layout(cfg, ids == IMG, [[Media()] * n for n in counts],
                                     crops_per_group=4)
    pixels, valid = place_crops([[im] if len(im) else [] for im in images], crops_per_group=4,
                                dtype=np.float32)
    assert valid.all() and pixels.shape == (1, 4, 32, 32, 3)
    layout = MediaLayout(jnp.asarray(pixels), jnp.asarray(slots), jnp.asarray(weights))
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, VisionEncoder) and context.method_name == "__call__":
            seen.append(args[0].shape)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        out, _ = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(
            params, jnp.asarray(ids), layout)
    assert seen == [(4, 32, 32, 3)]  # the vision tower ran on the 4 real crops, not 3 x 3
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


def test_groups_number_their_own_crops_and_refuse_over_budget():
    cfg = _cfg()
    t = cfg.vision.num_tokens
    ids = _rows([1, 2, 1, 0], t, np.random.default_rng(1))
    media = [[Media()] * n for n in (1, 2, 1, 0)]
    slots, _, first = build_layout(cfg, ids == IMG, media, crops_per_group=3, groups=2)
    assert first.tolist() == [0, 1, 0, 1]
    assert slots[1][ids[1] == IMG][:, 0].tolist() == list(range(t, 3 * t))  # crops 1, 2
    assert slots[2][ids[2] == IMG][:, 0].tolist() == list(range(t))  # group 1 starts at 0
    with pytest.raises(BudgetError, match="group 0 needs 3 crops, over its budget of 2"):
        build_layout(cfg, ids == IMG, media, crops_per_group=2, groups=2)
    with pytest.raises(ValueError, match="row 0 has 16 media placeholder tokens"):
        build_layout(cfg, ids == IMG, [[], *media[1:]], crops_per_group=3, groups=2)


def test_anyres_image_takes_tiles_unpadded_with_newlines():
    cfg = _cfg(image_newline=True, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    # a wide 20x60 image on a 1x2 grid: 16 global tokens, a 4x8 map un-padded to 2 rows,
    # 2 newlines
    m = Media(grid=(1, 2), image_size=(20, 60))
    assert m.crops == 3
    assert num_media_tokens(cfg, m) == 16 + 2 * 8 + 2


def test_generation_evaluators_refuse_an_anyres_model_instead_of_one_resized_view():
    from lvlm_jax.evals.model_runner import ModelRunner

    model = VLM(_cfg(image_newline=True, image_grid_pinpoints=[[32, 64], [64, 32]]))
    runner = ModelRunner(model, None, None, "vicuna_v1", image_size=32)
    with pytest.raises(ValueError, match="do not tile images any-res yet"):
        runner._pixels([np.zeros((20, 60, 3), np.uint8)])
