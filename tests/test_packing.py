"""Packing in the loader: a packed row is its samples laid end to end (tokens, loss mask, restarted
positions, segment ids, images in order, at most max_images), and the model's loss on a packed row
equals the sum of its losses on the separate samples."""

import grain
import jax
import numpy as np
import pytest
from training_utils import tiny_config

from data_pipelines.loader import demo_tokenizer, make_dataset
from data_pipelines.packing import trim_example, unpack_row
from lvlm_jax.models import build_model, dummy_inputs, vlm_config
from lvlm_jax.train.stages import LossContext, get_stage

IMAGE_TOKENS = 4
SEQ = 128
SMALL_READS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _records(n: int) -> list[dict]:
    """Distinct conversations of 0, 1 or 2 images (distinct colours) and different lengths."""
    out = []
    for i in range(n):
        images = [np.full((8, 8, 3), (40 * i + 7 * j) % 256, np.uint8) for j in range(i % 3)]
        question = " ".join(["<image>"] * len(images) + ["what color is the circle?"] * (1 + i % 4))
        turns = [{"from": "human", "value": question},
                 {"from": "gpt", "value": "the circle is red." if i % 2 else "blue."}]
        out.append({"id": str(i), "images": images, "conversations": turns})
    return out


def _batches(tok, packing: str, batch_size: int, max_images: int, n: int = 12) -> list[dict]:
    return list(make_dataset(
        _records(n), kind="conversation", tokenizer=tok, template="chatml", seq_len=SEQ,
        image_size=16, image_tokens=IMAGE_TOKENS, max_images=max_images, batch_size=batch_size,
        seed=0, shuffle=False, num_epochs=1, packing=packing, read_options=SMALL_READS))


def _rows(batches):
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def _trimmed(row, tok):
    sample = trim_example(row, tok.image_id, IMAGE_TOKENS)
    sample["positions"] = row["positions"][:len(sample["input_ids"])]
    return sample


def _assert_samples_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_packed_row_is_its_samples_end_to_end_with_restarted_positions(tok):
    separate = [_trimmed(r, tok) for r in _rows(_batches(tok, "none", 1, max_images=4))]
    packed = _rows(_batches(tok, "first_fit", 1, max_images=4))
    assert len(separate) == 12 and len(packed) < len(separate)  # the last partial row is dropped
    i = 0
    for row in packed:
        k = int(row["segment_ids"].max())
        length = int(np.count_nonzero(row["segment_ids"]))
        # Segment ids 1..k, contiguous, then padding (0) to the end.
        lengths = [len(s["input_ids"]) for s in separate[i:i + k]]
        np.testing.assert_array_equal(
            row["segment_ids"][:length], np.repeat(np.arange(1, k + 1), lengths))
        assert not row["segment_ids"][length:].any() and not row["loss_mask"][length:].any()
        np.testing.assert_array_equal(row["positions"][:length],
                                      np.concatenate([np.arange(n) for n in lengths]))
        for got, want in zip(unpack_row(row, tok.image_id, IMAGE_TOKENS), separate[i:i + k],
                             strict=True):
            _assert_samples_equal(got, want)
            assert got["loss_mask"][-1] == 0 and got["targets"][-1] == 0  # no cross-sample target
        n_images = sum(len(s["pixel_values"]) for s in separate[i:i + k])
        assert not row["pixel_values"][n_images:].any()  # the image slots left are empty
        # First fit with one open row: the next sample did not fit in tokens or images.
        nxt = separate[i + k] if i + k < len(separate) else None
        if nxt is not None:
            assert (length + len(nxt["input_ids"]) > SEQ
                    or n_images + len(nxt["pixel_values"]) > 4)
        i += k
    assert i >= 10  # rows emitted cover all but the trailing open row


def test_rows_never_hold_more_than_max_images_and_lose_no_sample(tok):
    separate = [_trimmed(r, tok) for r in _rows(_batches(tok, "none", 1, max_images=2))]
    packed = _rows(_batches(tok, "first_fit", 3, max_images=2, n=12))
    unpacked = [s for row in packed for s in unpack_row(row, tok.image_id, IMAGE_TOKENS)]
    for row in packed:
        blocks = np.count_nonzero(row["input_ids"] == tok.image_id) // IMAGE_TOKENS
        assert blocks <= 2 and row["pixel_values"].shape[0] == 2
    # Three open rows: samples land out of order, but each is one of the separate samples.
    key = lambda s: (s["input_ids"].tobytes(), s["pixel_values"].tobytes())  # noqa: E731
    want = {key(s): s for s in separate}
    assert len(unpacked) > 3 and len({key(s) for s in unpacked}) == len(unpacked)
    for s in unpacked:
        _assert_samples_equal(s, want[key(s)])


def test_loss_on_a_packed_row_is_the_sum_of_the_losses_on_its_samples(tok):
    cfg = tiny_config(**{"model.language.vocab_size": 384, "model.image_token_id": tok.image_id})
    model_cfg = vlm_config(cfg.model.to_dict())
    assert model_cfg.image_tokens == IMAGE_TOKENS
    model = build_model(model_cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), **dummy_inputs(model_cfg))["params"]
    ctx = LossContext(model, loss_chunk=8)
    step_loss = jax.jit(lambda p, b: get_stage("sft").loss(ctx, p, b, jax.random.PRNGKey(1))[:2])
    loss = lambda batch: step_loss(params, batch)  # noqa: E731

    packed = _batches(tok, "first_fit", 1, max_images=4)[0]
    k = int(packed["segment_ids"].max())
    assert k >= 3
    separate = _batches(tok, "none", k, max_images=4)[0]  # the same samples, a row each
    # Empty rows (all padding, no loss) give both batches one shape: one compilation.
    packed = {f: np.concatenate([v, np.zeros((k - 1, *v.shape[1:]), v.dtype)])
              for f, v in packed.items()}
    total_packed, weight_packed = loss(packed)
    total_separate, weight_separate = loss(separate)
    assert float(weight_packed) == float(weight_separate) > 0
    np.testing.assert_allclose(float(total_packed), float(total_separate), rtol=2e-5)
    # Attending across samples changes the loss: the equality rests on the segment ids.
    merged = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    assert abs(float(loss(merged)[0]) - float(total_packed)) > 1e-3
