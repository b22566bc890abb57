"""Any-res tiling (data_pipelines/anyres.py) and feature packing (lvlm_jax/models/anyres.py) equal
HF's LLaVA-NeXT processor and pack_image_features (and OneVision's anyres_max cap) on 30 sizes."""

import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import anyres
from lvlm_jax.models import anyres as packing

# LLaVA-NeXT-7B (llava-v1.6): CLIP ViT-L/14 at 336, a CLS token dropped by "default".
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CROP, PATCH = 336, 14
# The same grids scaled down: 32-pixel crops of 8-pixel patches (4x4 tokens a tile).
TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
TINY_CROP, TINY_PATCH = 32, 8

# 30 (height, width): square, landscape and portrait photo shapes, 2:1 to 40:1 strips, odd sizes.
SIZES = [(336, 336), (480, 640), (640, 480), (720, 1280), (1280, 720), (1080, 1920), (1920, 1080),
         (600, 1400), (1400, 600), (500, 1000), (1000, 500), (400, 1200), (1200, 400), (300, 1200),
         (1200, 300), (200, 1200), (1200, 200), (120, 1200), (1200, 120), (60, 1200), (1200, 60),
         (30, 1200), (1200, 30), (333, 777), (777, 333), (1001, 999), (37, 53), (1, 1), (3, 7),
         (2000, 2000)]
# The same kinds of shapes at the tiny scale (up to 11:1: a 4-token-high tile map keeps a row).
TINY_SIZES = [(32, 32), (24, 32), (32, 24), (36, 64), (64, 36), (54, 96), (96, 54), (30, 70),
              (70, 30), (25, 50), (50, 25), (20, 60), (60, 20), (15, 60), (60, 15), (10, 60),
              (60, 10), (12, 120), (120, 12), (9, 100), (100, 9), (33, 78), (78, 33), (100, 99),
              (4, 5), (1, 1), (3, 7), (7, 3), (200, 200), (17, 129)]
IMAGE_ID = 1


def _image(size, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)


@functools.cache
def _hf_processor(pinpoints, crop, patch):
    """A LlavaNextProcessor built offline: the PIL image processor and a word-level tokenizer."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    words = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": IMAGE_ID, "describe": 2},
                                       unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", additional_special_tokens=["<image>"])
    images = LlavaNextImageProcessorPil(size={"shortest_edge": crop},
                                        crop_size={"height": crop, "width": crop},
                                        image_grid_pinpoints=[list(p) for p in pinpoints])
    return transformers.LlavaNextProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _hf_pack(size, features, newline, pinpoints, crop, patch, onevision_cap=None):
    """HF's pack_image_features for one image, called on a stand-in `self` holding the config
    (the method reads nothing else), so no model is built."""
    torch = pytest.importorskip("torch")
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    owner = SimpleNamespace(config=SimpleNamespace(
        vision_config=SimpleNamespace(image_size=crop, patch_size=patch),
        image_grid_pinpoints=[list(p) for p in pinpoints]))
    feats, line = torch.from_numpy(features), torch.from_numpy(newline)
    if onevision_cap is None:
        packed, lens = LlavaNextModel.pack_image_features(
            owner, [feats], torch.tensor([size]), "default", line)
    else:
        packed, lens = LlavaOnevisionModel.pack_image_features(
            owner, [feats], torch.tensor([size]), line, f"anyres_max_{onevision_cap}")
    return packed[0].numpy(), int(lens[0])


@pytest.mark.parametrize("pinpoints,sizes", [(PINPOINTS, SIZES), (TINY_PINPOINTS, TINY_SIZES)])
def test_best_grid_is_hf_select_best_resolution(pinpoints, sizes):
    pytest.importorskip("transformers")
    from transformers.image_processing_utils import select_best_resolution

    ours = [anyres.select_best_grid(size, pinpoints) for size in sizes]
    assert ours == [tuple(select_best_resolution(size, pinpoints)) for size in sizes]
    # Wide, tall and square shapes reach every grid of the set.
    assert {tuple(g) for g in ours} == {tuple(p) for p in pinpoints}


def _assert_same_as_hf_processor(size, pinpoints, crop, patch):
    processor = _hf_processor(tuple(map(tuple, pinpoints)), crop, patch)
    pixels = _image(size, seed=size[0] * 7919 + size[1])
    hf = processor(images=[Image.fromarray(pixels)], text=["describe <image>"],
                   return_tensors="np")
    tiles = anyres.tile_image(pixels, pinpoints, crop)
    rows, cols = tiles.grid
    assert tiles.crops.shape == (1 + rows * cols, crop, crop, 3)
    assert tiles.image_size == tuple(hf["image_sizes"][0]) == size
    hf_pixels = hf["pixel_values"][0]  # [crops, 3, crop, crop], rescaled and normalized
    assert hf_pixels.shape[0] == len(tiles.crops)
    mean = np.asarray(processor.image_processor.image_mean, np.float32)
    std = np.asarray(processor.image_processor.image_std, np.float32)
    # HF's floats back to its uint8 pixels: ours are the same bytes.
    hf_uint8 = np.rint((hf_pixels.transpose(0, 2, 3, 1) * std + mean) * 255)
    np.testing.assert_array_equal(tiles.crops, hf_uint8)
    ours = ((tiles.crops / np.float32(255) - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, hf_pixels, rtol=0, atol=1e-6)
    hf_count = int((hf["input_ids"][0] == IMAGE_ID).sum())
    assert anyres.num_image_tokens(size, pinpoints, crop, patch, "default", 1) == hf_count


@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiles_and_token_count_equal_hf_processor_tiny(size):
    _assert_same_as_hf_processor(size, TINY_PINPOINTS, TINY_CROP, TINY_PATCH)


@pytest.mark.parametrize("size", [(480, 640), (1920, 1080), (30, 1200), (1001, 999), (3, 7)])
def test_tiles_and_token_count_equal_hf_processor_llava_next_7b(size):
    _assert_same_as_hf_processor(size, PINPOINTS, CROP, PATCH)


@pytest.mark.parametrize("strategy,additional", [("default", 1), ("full", 0), ("full", 1)])
def test_token_count_equals_hf_processor_count_on_30_sizes(strategy, additional):
    processor = _hf_processor(tuple(map(tuple, PINPOINTS)), CROP, PATCH)
    processor.vision_feature_select_strategy = strategy
    processor.num_additional_image_tokens = additional
    try:
        hf = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    finally:
        processor.vision_feature_select_strategy, processor.num_additional_image_tokens = \
            "default", 1
    ours = [anyres.num_image_tokens(s, PINPOINTS, CROP, PATCH, strategy, additional)
            for s in SIZES]
    assert ours == hf
    # A square image on the 1x2 grid: half of its 24x48 tile map is padding, cut to 24x24.
    base = 576 + additional - (strategy == "default")
    assert ours[SIZES.index((336, 336))] == base + 24 * 24 + 24


@pytest.mark.parametrize("pinpoints,sizes,crop,patch", [
    (PINPOINTS, SIZES, CROP, PATCH), (TINY_PINPOINTS, TINY_SIZES, TINY_CROP, TINY_PATCH)])
def test_packed_features_equal_hf_pack_image_features(pinpoints, sizes, crop, patch):
    side, dim = crop // patch, 8
    rng = np.random.RandomState(0)
    newline = rng.randn(dim).astype(np.float32)
    for size in sizes:
        rows, cols = anyres.grid_shape(size, pinpoints, crop)
        features = rng.randn(1 + rows * cols, side * side, dim).astype(np.float32)
        expected, length = _hf_pack(size, features, newline, pinpoints, crop, patch)
        packed = np.asarray(packing.pack_image_features(features, (rows, cols), size, newline))
        np.testing.assert_array_equal(packed, expected, err_msg=str(size))
        # The model's un-padding and the processor's count agree: one placeholder per token.
        assert length == anyres.num_image_tokens(size, pinpoints, crop, patch, "full", 0)


def test_jitted_packing_keeps_one_program_for_a_grid_and_zeros_past_the_length():
    # Every 1x3 image: one compiled program for all of them, the budget padded with zeros.
    sizes = [s for s in SIZES if anyres.grid_shape(s, PINPOINTS, CROP) == (1, 3)]
    assert len(sizes) == 8
    side, dim, budget = CROP // PATCH, 4, 576 + 24 * 73
    traces = []

    @jax.jit
    def pack(features, newline, index, weight, is_newline, valid):
        traces.append(1)
        return packing.pack_features(features, newline, index, weight, is_newline, valid)

    rng = np.random.RandomState(1)
    newline = rng.randn(dim).astype(np.float32)
    for size in sizes:
        features = rng.randn(4, side * side, dim).astype(np.float32)
        plan = packing.pack_plan((1, 3), size, side, length=budget)
        packed = np.asarray(pack(features, newline, plan.index, plan.weight, plan.newline,
                                 plan.valid))
        expected, length = _hf_pack(size, features, newline, PINPOINTS, CROP, PATCH)
        assert plan.length == length == int(plan.valid.sum())
        np.testing.assert_array_equal(packed[:length], expected)
        assert not packed[length:].any()
    assert len(traces) == 1


def test_plan_offsets_address_one_flattened_batch_of_crops():
    # Two images' crops in one array: the second image's plan starts past the first's crops.
    side, dim = TINY_CROP // TINY_PATCH, 3
    rng = np.random.RandomState(2)
    newline = rng.randn(dim).astype(np.float32)
    first, second = (24, 32), (70, 30)
    grids = [anyres.grid_shape(s, TINY_PINPOINTS, TINY_CROP) for s in (first, second)]
    crops = [rng.randn(1 + r * c, side * side, dim).astype(np.float32) for r, c in grids]
    batch = np.concatenate(crops)
    plan = packing.pack_plan(grids[1], second, side, offset=len(crops[0]) * side * side)
    packed = packing.pack_features(batch, newline, plan.index, plan.weight, plan.newline,
                                   plan.valid)
    expected, _ = _hf_pack(second, crops[1], newline, TINY_PINPOINTS, TINY_CROP, TINY_PATCH)
    np.testing.assert_array_equal(np.asarray(packed), expected)


ONEVISION_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]


@pytest.mark.parametrize("size", [(2304, 2304), (1536, 2304), (2000, 800), (500, 2300),
                                  (1000, 1000), (700, 1300)])
def test_onevision_anyres_max_9_shrink_equals_hf(size):
    # OneVision (SigLIP 384/14, 27x27 tokens a tile, no CLS) caps tiles in the model: a map over
    # ~9 tiles' tokens is shrunk bilinearly; the processor counts the shrunk map.
    pytest.importorskip("torch")
    from transformers.models.llava_onevision.processing_llava_onevision import (
        LlavaOnevisionProcessor,
    )

    side, dim = 27, 4
    grid = anyres.grid_shape(size, ONEVISION_PINPOINTS, 384)
    rng = np.random.RandomState(size[0] + size[1])
    features = rng.randn(1 + grid[0] * grid[1], side * side, dim).astype(np.float32)
    newline = rng.randn(dim).astype(np.float32)
    expected, length = _hf_pack(size, features, newline, ONEVISION_PINPOINTS, 384, 14,
                                onevision_cap=9)
    packed = np.asarray(packing.pack_image_features(features, grid, size, newline,
                                                    max_num_patches=9))
    assert packed.shape == expected.shape
    np.testing.assert_allclose(packed, expected, rtol=0, atol=1e-6)
    # The processor's count, through its own helpers on a stand-in holding its settings.
    owner = SimpleNamespace(image_processor=SimpleNamespace(
        image_grid_pinpoints=ONEVISION_PINPOINTS), num_image_tokens=side * side,
        vision_aspect_ratio="anyres_max_9")
    owner._get_unpadded_features = functools.partial(
        LlavaOnevisionProcessor._get_unpadded_features, owner)
    hf_count = LlavaOnevisionProcessor._get_number_of_features(owner, *size, 384, 384)
    ours = anyres.num_image_tokens(size, ONEVISION_PINPOINTS, 384, 14, "full", 0,
                                   max_num_patches=9)
    assert ours == hf_count == length


def test_onevision_cap_shrinks_a_6x6_grid_to_9_tiles_of_tokens():
    plan = packing.pack_plan((6, 6), (2304, 2304), 27, max_num_patches=9)
    # 162x162 tile tokens, ratio 2: an 81x81 map plus 81 newlines after the 729 global tokens.
    assert plan.length == 729 + 81 * 82
    assert plan.index.shape == (plan.length, 4)
    np.testing.assert_allclose(plan.weight.sum(axis=1)[~plan.newline], 1, atol=1e-6)


def test_an_image_too_elongated_for_the_grids_is_one_clear_error():
    # 10x10000 fits 336x1008 as 1008 x 1 pixel; its 24x72 feature map keeps 0 rows. HF puts only
    # the global view's tokens for it (its tile map is empty); we refuse it.
    with pytest.raises(anyres.AnyresError, match=r"10x10000 .* keeps 0x72 after un-padding"):
        anyres.num_image_tokens((10, 10000), PINPOINTS, CROP, PATCH, "default", 1)
    with pytest.raises(anyres.AnyresError, match=r"120x6 .* keeps 12x0"):
        anyres.num_image_tokens((120, 6), TINY_PINPOINTS, TINY_CROP, TINY_PATCH)
    with pytest.raises(ValueError, match="keeps no tile features"):
        packing.pack_plan((1, 3), (10, 10000), 24)
    processor = _hf_processor(tuple(map(tuple, PINPOINTS)), CROP, PATCH)
    hf = processor._get_num_multimodal_tokens(image_sizes=[(10, 10000)]).num_image_tokens
    assert hf == [576]


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (-3, 4)])
def test_a_degenerate_image_size_is_one_clear_error(size):
    with pytest.raises(anyres.AnyresError, match="degenerate image size"):
        anyres.num_image_tokens(size, PINPOINTS, CROP, PATCH)
    with pytest.raises(anyres.AnyresError, match="degenerate image size"):
        anyres.select_best_grid(size, PINPOINTS)
    if min(size) == 0:
        with pytest.raises(anyres.AnyresError, match="degenerate image size"):
            anyres.tile_image(np.zeros((*size, 3), np.uint8), PINPOINTS, CROP)


def test_pinpoints_that_are_not_multiples_of_the_crop_are_refused():
    with pytest.raises(ValueError, match="multiples of the crop size 336"):
        anyres.grid_shape((480, 640), [[336, 672], [500, 500]], CROP)


def test_packing_budget_too_small_is_refused():
    with pytest.raises(ValueError, match="over the budget 100"):
        packing.pack_plan((1, 2), (336, 336), 24, length=100)
