"""Tests of the grain training pipeline: example layout, truncation, skipping, determinism, resume,
sharding, and the image transforms it uses."""

import io
import itertools
import json

import grain
import numpy as np
import pytest
from PIL import Image

from data_pipelines.encoders import BadRecord, encode_example, example_spec
from data_pipelines.images import (
    CLIP_MEAN_RGB,
    pad_to_square,
    prepare_image,
    resize,
    to_rgb_uint8,
)
from data_pipelines.loader import SkipStats, SyntheticSource, demo_tokenizer, make_dataset
from data_pipelines.templates import render

IMAGE_TOKENS = 4
SMALL_READS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _dataset(tok, source=None, **overrides):
    kwargs = dict(
        kind="conversation",
        tokenizer=tok,
        template="vicuna_v1",
        seq_len=96,
        image_size=16,
        image_tokens=IMAGE_TOKENS,
        batch_size=4,
        seed=0,
        read_options=SMALL_READS,
    )
    kwargs.update(overrides)
    source = source if source is not None else SyntheticSource(kwargs["kind"], 64, image_size=16)
    return make_dataset(source, **kwargs)


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("kind", ["caption", "conversation"])
def test_batches_have_the_documented_shapes_and_dtypes(kind, tok):
    batch = next(iter(_dataset(tok, kind=kind, max_images=2)))
    spec = example_spec(96, 16, max_images=2)
    assert batch.keys() == spec.keys()
    for name, (shape, dtype) in spec.items():
        assert batch[name].shape == (4, *shape), name
        assert batch[name].dtype == dtype, name


@pytest.mark.parametrize("kind", ["caption", "conversation"])
def test_loss_mask_marks_targets_that_are_the_next_input_token(kind, tok):
    for batch in _take(iter(_dataset(tok, kind=kind)), 4):
        ids, targets, mask = batch["input_ids"], batch["targets"], batch["loss_mask"]
        for row in range(len(ids)):
            n = int(batch["segment_ids"][row].sum())
            assert batch["segment_ids"][row].tolist() == [1] * n + [0] * (96 - n)
            assert batch["positions"][row, :n].tolist() == list(range(n))
            assert not batch["positions"][row, n:].any() and not ids[row, n:].any()
            np.testing.assert_array_equal(targets[row, : n - 1], ids[row, 1:n])
            assert not targets[row, n - 1 :].any() and not mask[row, n - 1 :].any()
            supervised = np.flatnonzero(mask[row])
            assert len(supervised) > 0
            assert (targets[row, supervised] == ids[row, supervised + 1]).all()
            assert tok.image_id not in targets[row, supervised]


def test_supervised_targets_decode_to_the_assistant_replies(tok):
    record = SyntheticSource("conversation", 8)[3]
    example = encode_example(
        record,
        kind="conversation",
        tokenizer=tok,
        template="chatml",
        seq_len=128,
        image_size=16,
        image_tokens=IMAGE_TOKENS,
    )
    supervised = example["targets"][example["loss_mask"] == 1]
    im_end = tok.piece_to_id("<|im_end|>")
    replies = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    assert tok.decode(supervised).split("<|im_end|>") == [*replies, ""]
    assert supervised.tolist().count(im_end) == len(replies)


def _two_image_record():
    rng = np.random.default_rng(0)
    images = [rng.integers(1, 255, (20, 12, 3), dtype=np.uint8) for _ in range(2)]
    turns = [
        {"from": "human", "value": "<image>\nwhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nis there a blue square?"},
        {"from": "gpt", "value": "no"},
    ]
    return {"id": "two", "images": images, "conversations": turns}


def test_truncation_never_cuts_inside_an_image_block(tok):
    record = _two_image_record()
    full, _ = render("vicuna_v1", record["conversations"], tok, IMAGE_TOKENS)
    second_block = int(np.flatnonzero(full == tok.image_id)[IMAGE_TOKENS])
    for seq_len in range(2, len(full) + 3):
        try:
            ex = encode_example(
                record,
                kind="conversation",
                tokenizer=tok,
                template="vicuna_v1",
                seq_len=seq_len,
                image_size=8,
                image_tokens=IMAGE_TOKENS,
                max_images=2,
            )
        except BadRecord as e:
            assert "no supervised token" in str(e)
            continue
        n = int(ex["segment_ids"].sum())
        np.testing.assert_array_equal(ex["input_ids"][:n], full[:n])  # cut from the end
        blocks = int((ex["input_ids"] == tok.image_id).sum()) // IMAGE_TOKENS
        assert (ex["input_ids"] == tok.image_id).sum() == blocks * IMAGE_TOKENS
        if second_block < seq_len < second_block + IMAGE_TOKENS:
            assert n == second_block  # backed up to the start of the block
        # Images whose block was cut away are zeroed; the kept ones are not.
        assert [bool(ex["pixel_values"][j].any()) for j in range(2)] == [j < blocks for j in (0, 1)]


def test_records_that_cannot_train_are_skipped_and_counted(tok):
    good = [SyntheticSource("conversation", 6)[i] for i in range(6)]
    too_long = dict(
        good[0],
        id="too-long",
        conversations=[
            {"from": "human", "value": "<image>\n" + "is there a red circle? " * 40},
            {"from": "gpt", "value": "yes"},
        ],
    )
    no_image = dict(good[1], id="no-image", images=[])
    broken = dict(good[2], id="broken", images=[b"not an image"])
    source = good[:3] + [too_long, no_image, broken] + good[3:]
    stats = SkipStats()
    batches = list(_dataset(tok, source, shuffle=False, num_epochs=1, batch_size=1, stats=stats))
    assert len(batches) == 6
    assert stats.kept == 6 and sum(stats.skipped.values()) == 3
    assert sorted(stats.skipped_ids) == ["broken", "no-image", "too-long"]
    assert stats.skipped_fraction == pytest.approx(3 / 9)


def test_skipping_more_than_the_budget_fails(tok):
    source = _numbered_source(1000)
    for record in source[::2]:
        record["caption"] += " <image>"  # an image mark in a reply: a malformed record
    dataset = _dataset(tok, source, kind="caption", seq_len=16, batch_size=8, max_skip_fraction=0.4)
    # Each row's lane skips its own bad records; over the lanes about half were skipped.
    with pytest.raises(ValueError, match=r"skipped (4[5-9]|5[0-5])\.\d\d %"):
        _take(iter(dataset), 200)
    assert (
        len(
            _take(
                iter(
                    _dataset(
                        tok, source, kind="caption", seq_len=16, batch_size=8, max_skip_fraction=0.6
                    )
                ),
                200,
            )
        )
        == 200
    )


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(tok):
    a = _take(iter(_dataset(tok, seed=3)), 3)
    _assert_batches_equal(a, _take(iter(_dataset(tok, seed=3)), 3))
    b = _take(iter(_dataset(tok, seed=4)), 3)
    assert not all(
        np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True)
    )


def test_resume_from_iterator_state_gives_the_same_next_batches(tok):
    dataset = _dataset(tok, seed=1, batch_size=3)
    iterator = iter(dataset)
    _take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    expected = _take(iterator, 4)  # crosses the epoch boundary (64 records, 3 per batch)
    resumed = iter(dataset)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)
    fresh = iter(_dataset(tok, seed=1, batch_size=3))  # a new process rebuilds the pipeline
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)


def _numbered_source(n):
    images = [np.full((8, 8, 3), i % 256, np.uint8) for i in range(n)]
    return [{"id": str(i), "image": images[i], "caption": " ".join(str(i))} for i in range(n)]


def test_the_rows_of_every_process_together_are_the_one_process_batches(tok):
    source = _numbered_source(64)
    for record in source[::5]:
        record["caption"] += " <image>"  # bad records: skipped within their rows' lanes
    kwargs = dict(kind="caption", batch_size=4, seq_len=16, max_skip_fraction=0.5)
    whole = _take(iter(_dataset(tok, source, **kwargs)), 12)
    for split in ([[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 2], [1, 3]]):
        parts = [_take(iter(_dataset(tok, source, rows=rows, **kwargs)), 12) for rows in split]
        for step, batch in enumerate(whole):
            for rows, part in zip(split, parts, strict=True):
                for key in batch:
                    np.testing.assert_array_equal(part[step][key], batch[key][rows],
                                                  err_msg=f"{key} step {step} rows {rows}")
    first_epoch = [int(tok.decode(b["targets"][r][b["loss_mask"][r] == 1]).replace(" ", ""))
                   for b in whole[:8] for r in range(4)]
    assert len(set(first_epoch)) == len(first_epoch)  # no record twice before an epoch ends


def test_bad_arguments_fail_with_clear_messages(tok):
    with pytest.raises(ValueError, match="unknown chat template 'nope'"):
        _dataset(tok, template="nope")
    with pytest.raises(ValueError, match="unknown record kind 'rollout'"):
        _dataset(tok, kind="rollout")
    with pytest.raises(ValueError, match=r"rows must be distinct and in \[0, 4\)"):
        _dataset(tok, rows=[1, 4])


# --- image transforms -------------------------------------------------------------------------


def test_to_rgb_uint8_handles_grayscale_rgba_palette_and_bytes():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    assert to_rgb_uint8(rgb[:, :, 0]).shape == (6, 4, 3)
    np.testing.assert_array_equal(to_rgb_uint8(np.dstack([rgb, np.full((6, 4), 7, np.uint8)])), rgb)
    palette = Image.fromarray(rgb).convert("P")
    assert to_rgb_uint8(palette).shape == (6, 4, 3)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    np.testing.assert_array_equal(to_rgb_uint8(buffer.getvalue()), rgb)
    with pytest.raises(TypeError, match="uint8"):
        to_rgb_uint8(rgb.astype(np.float32))


def test_pad_to_square_centres_the_image_on_the_mean_colour():
    img = np.full((2, 6, 3), 255, np.uint8)
    out = pad_to_square(img)
    assert out.shape == (6, 6, 3)
    assert (out[2:4] == 255).all()
    assert (out[:2] == CLIP_MEAN_RGB).all() and (out[4:] == CLIP_MEAN_RGB).all()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_prepare_image_equals_pad_to_square_then_resize_bitwise(fmt):
    # prepare_image skips the pad rows in PIL's horizontal pass; the pixels must not change.
    rng = np.random.default_rng(0)
    shapes = [(480, 640), (640, 480), (300, 301), (301, 300), (37, 500), (500, 37), (336, 400),
              (400, 336), (100, 100), (13, 7)]
    shapes += [tuple(int(v) for v in rng.integers(8, 900, 2)) for _ in range(6)]
    for height, width in shapes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        data = buffer.getvalue()
        for size in (336, 224, 16):
            reference = resize(pad_to_square(to_rgb_uint8(data)), size)
            np.testing.assert_array_equal(prepare_image(data, size), reference,
                                          err_msg=f"{width}x{height} -> {size}")
            # Into a batch slot (the loader's path): the same pixels, written in place.
            batch = np.zeros((2, size, size, 3), np.uint8)
            returned = prepare_image(data, size, out=batch[1])
            np.testing.assert_array_equal(batch[1], reference)
            assert np.shares_memory(returned, batch)
            assert not batch[0].any()


def test_prepare_image_of_an_array_already_at_size_is_a_copy_of_its_pixels():
    # The fast path for arrays already [size, size, 3] uint8 equals the PIL path it skips.
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for mode in ("pad", "resize"):
        got = prepare_image(pixels, 32, mode)
        np.testing.assert_array_equal(got, resize(pad_to_square(pixels), 32))
        assert not np.shares_memory(got, pixels)
        batch = np.zeros((2, 32, 32, 3), np.uint8)
        assert np.shares_memory(prepare_image(pixels, 32, mode, out=batch[1]), batch)
        np.testing.assert_array_equal(batch[1], pixels)
    # Other sizes, dtypes and channel counts still go through PIL
    np.testing.assert_array_equal(prepare_image(pixels, 16), resize(pixels, 16))
    rgba = np.concatenate([pixels, np.full((32, 32, 1), 7, np.uint8)], axis=-1)
    np.testing.assert_array_equal(prepare_image(rgba, 32), pixels)


def test_prepare_image_leaves_out_pad_only_rows_without_changing_a_pixel():
    # Output rows (wide images) or columns (tall ones) that read padding only are left out of
    # the resize, which runs on a canvas with fewer pad rows or columns instead
    # (data_pipelines/images.py: _pad_rows_left_out). Every pixel must stay that of
    # pad_to_square then resize, at the sides and sizes where the cut applies.
    from data_pipelines.images import _pad_rows_left_out

    assert _pad_rows_left_out(640, 336, 80, 80) == (40, 21, 40, 21)  # COCO's 640x480 at 336
    assert _pad_rows_left_out(640, 336, 0, 1) == (0, 0, 0, 0)  # no row reads padding only
    rng = np.random.default_rng(1)
    cuts = 0
    for width, size in ((640, 336), (612, 336), (1024, 336), (640, 224), (640, 384), (800, 448),
                        (500, 336), (337, 336)):
        for height in sorted({int(h) for h in rng.integers(1, width, 5)} | {width * 3 // 4}):
            top = (width - height) // 2
            cuts += any(_pad_rows_left_out(width, size, top, width - height - top))
            wide = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            wide[:2], wide[-2:] = 255, 0  # hard edges against the padding
            for pixels in (wide, wide.transpose(1, 0, 2)):  # and the tall image
                reference = resize(pad_to_square(pixels), size)
                np.testing.assert_array_equal(prepare_image(pixels, size), reference,
                                              err_msg=f"{pixels.shape} -> {size}")
                slot = np.full((size, size, 3), 7, np.uint8)
                np.testing.assert_array_equal(prepare_image(pixels, size, out=slot), reference)
                np.testing.assert_array_equal(slot, reference)
    assert cuts >= 25  # the cut ran, not only the full resize


def test_prepare_image_refuses_more_pixels_than_allowed_before_decoding():
    from data_pipelines.images import ImageTooLarge

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLarge, match="50x40 is over 1999 pixels"):
        prepare_image(buffer.getvalue(), 16, max_pixels=1999)
    assert prepare_image(buffer.getvalue(), 16, max_pixels=2000).shape == (16, 16, 3)


def test_prepare_image_gives_uint8_squares_in_both_modes():
    img = np.zeros((30, 10, 3), np.uint8)
    padded = prepare_image(img, 12, mode="pad")
    stretched = prepare_image(img, 12, mode="resize")
    assert padded.shape == stretched.shape == (12, 12, 3) and padded.dtype == np.uint8
    assert (padded[:, 0] == CLIP_MEAN_RGB).all() and not stretched.any()
    with pytest.raises(ValueError, match="crop"):
        prepare_image(img, 12, mode="crop")
