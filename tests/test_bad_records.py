"""Bad records during a run (ArrayRecord shards that did not pass through `lvlm data convert`'s
checks): each kind is skipped with its id and reason in the log and counted; the count reaches
metrics.jsonl (data/skipped, data/skipped_fraction); a run fails with a message naming the
skipped fraction and the budget only when skips pass data.max_skip_fraction."""

import json
import logging
import struct

import grain
import numpy as np
import pytest
from record_shards import jpeg, png, png_header, write_shards
from training_utils import tiny_config

from data_pipelines.arrayrecord_source import MAGIC, ArrayRecordSource
from data_pipelines.encoders import MAX_PIXELS
from data_pipelines.loader import demo_tokenizer, make_dataset
from data_pipelines.skips import skip_counts
from lvlm_jax.train import loop

SEQ = 64


def _conversation(i: int, image=None, question="<image>\nwhat color is the circle?",
                  answer="the circle is red."):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"r{i}", "images": [png(i) if image is None else image], "conversations": turns}


def _malformed_json() -> bytes:
    header = b'{"record": {"id": "cut", "conversations": [{"from": "hu'  # cut off mid-object
    return MAGIC + struct.pack("<I", len(header)) + header


BAD = {  # id -> (record, the reason the log names)
    "truncated": (_conversation(0, jpeg(0)[:400]), "unreadable image"),
    "zero_bytes": (_conversation(0, b""), "unreadable image"),
    "missing": (_conversation(0, "/nonexistent/images/x.jpg"), "missing image"),
    "bomb": (_conversation(0, png_header(30000)), "image too large"),  # past PIL's own refusal
    "large": (_conversation(0, png_header(10000)), "image too large"),  # past ours only
    "mismatch": (_conversation(0, question="what color is the circle?"), "wrong image count"),
    "too_long": (_conversation(0, question="<image>\n" + "is there a red circle? " * 20),
                 "no supervised token fits"),
    "malformed_json": (_malformed_json(), "malformed record"),
}


def _records(n_good: int, every: int) -> tuple[list, list[str]]:
    """n_good good records with a bad one (the BAD kinds in turn) after every `every`."""
    records, bad_ids, kinds = [], [], list(BAD)
    for i in range(n_good):
        records.append(_conversation(i))
        if (i + 1) % every == 0:
            name = kinds[len(bad_ids) % len(kinds)]
            record = BAD[name][0]
            record_id = f"#{len(records)}" if isinstance(record, bytes) else f"{name}{i}"
            records.append(record if isinstance(record, bytes) else dict(record, id=record_id))
            bad_ids.append(record_id)
    return records, bad_ids


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def test_each_kind_of_bad_record_is_skipped_logged_with_its_id_and_counted(tok, tmp_path,
                                                                          caplog):
    assert MAX_PIXELS < 10000**2 < 2 * MAX_PIXELS < 30000**2  # PIL refuses past 2x by itself
    records, bad_ids = _records(16, every=2)
    assert len(bad_ids) == len(BAD)
    source = ArrayRecordSource(write_shards(tmp_path / "data", records, "conversation", 1))
    dataset = make_dataset(
        source, kind="conversation", tokenizer=tok, template="chatml", seq_len=SEQ,
        image_size=16, image_tokens=4, batch_size=1, seed=0, shuffle=False, num_epochs=1,
        read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    # One row, so one lane: every record is read before the data runs out (with more rows, the
    # first lane to run out ends the epoch).
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        iterator = iter(dataset)
        batches = list(iterator)
    assert len(batches) == 16  # the 16 good records
    logged = {r.args[0]: r.args[1] for r in caplog.records if r.msg.startswith("skipping record")}
    assert sorted(logged) == sorted(bad_ids)
    for record_id, (name, (_, reason)) in zip(bad_ids, BAD.items(), strict=True):
        assert logged[record_id].startswith(reason), (name, logged[record_id])
    assert skip_counts(iterator.get_state()) == (len(records), len(BAD))


BAD_IMAGES = {  # id -> (image, the reason the log names)
    "truncated": (jpeg(0)[:400], "unreadable image"),
    "missing": ("/nonexistent/images/x.jpg", "missing image"),
    "bomb": (png_header(30000), "image too large"),
    "large": (png_header(10000), "image too large"),
}


@pytest.mark.parametrize("kind", ["prompt", "preference"])
def test_prompt_and_preference_records_with_a_bad_image_are_skipped_and_counted(tok, kind,
                                                                                 caplog):
    replies = ({"reference": "red"} if kind == "prompt"
               else {"chosen": "the circle is red.", "rejected": "the circle is blue."})
    records = []
    for i, (name, (image, _)) in enumerate(BAD_IMAGES.items()):
        question = {"prompt": "<image>\nwhat color is the circle?", **replies}
        records += [{"id": f"good{i}", "images": [png(10 + i)], **question},
                    {"id": name, "images": [image], **question}]
    dataset = make_dataset(
        records, kind=kind, tokenizer=tok, template="chatml", seq_len=SEQ, image_size=16,
        image_tokens=4, batch_size=1, seed=0, shuffle=False, num_epochs=1,
        read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.loader"):
        iterator = iter(dataset)
        batches = list(iterator)
    logged = {r.args[0]: r.args[1] for r in caplog.records if r.msg.startswith("skipping record")}
    assert {k: v.split(":")[0] for k, v in logged.items()} == {
        name: reason for name, (_, reason) in BAD_IMAGES.items()}
    assert skip_counts(iterator.get_state()) == (8, 4)
    # The good records' solid colours come through in order.
    pixels = np.concatenate([b["pixel_values"] for b in batches])
    assert pixels.shape == (4, 1, 16, 16, 3)
    np.testing.assert_array_equal(pixels.reshape(4, -1).min(1), [10, 11, 12, 13])
    np.testing.assert_array_equal(pixels.reshape(4, -1).max(1), [10, 11, 12, 13])


def _run_config(data_dir, **data):
    return tiny_config(steps=3, batch=8, **{
        "model.language.vocab_size": 384, "model.image_token_id": -1, "data.template": "chatml",
        "data.source": "arrayrecord", "data.path": str(data_dir), "data.seq_len": SEQ,
        "data.shuffle": False, "train.log_every": 1,
        **{f"data.{k}": v for k, v in data.items()}})


def test_a_run_with_a_few_bad_records_completes_and_logs_their_count(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    records, _ = _records(24, every=6)  # 4 bad among 28
    data = write_shards(tmp_path / "data", records, "conversation", 1)
    cfg = _run_config(data, max_skip_fraction=0.2, skip_budget_after=10)
    loop.train(cfg, str(tmp_path / "run"), log=lambda msg: None)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = {r["step"]: r for r in logged if "loss" in r}
    # Unshuffled: by step k the loader has read up to the 8k-th good record (the bad one
    # after the 24th is never reached).
    assert [steps[k]["data/skipped"] for k in (1, 2, 3)] == [1, 2, 3]
    np.testing.assert_allclose([steps[k]["data/skipped_fraction"] for k in (1, 2, 3)],
                               [1 / 9, 2 / 18, 3 / 27])


def test_a_run_with_too_many_bad_records_fails_naming_the_fraction_and_the_budget(
        tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    records, _ = _records(24, every=6)
    data = write_shards(tmp_path / "data", records, "conversation", 1)
    cfg = _run_config(data, max_skip_fraction=0.05, skip_budget_after=5)
    # Unshuffled, 8 rows: step 1 reads records 0-7 and, for the row whose record was bad, one
    # more from its lane.
    with pytest.raises(ValueError, match=r"skipped 11\.11 % of the records read \(1 of 9\), "
                                         r"over the budget data\.max_skip_fraction=0\.05"):
        loop.train(cfg, str(tmp_path / "run"), log=lambda msg: None)
