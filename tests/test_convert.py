"""`lvlm data convert`: LLaVA / caption / preference files -> ArrayRecord shards that skip and count
bad records, read back through ArrayRecordSource and the loader, and train through the CLI."""

import io
import itertools
import json
import os
import struct
import subprocess
import sys
import zlib

import grain
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image
from xla_env import cpu_env

from data_pipelines.arrayrecord_source import (
    ArrayRecordSource,
    deserialize_record,
    serialize_record,
)
from data_pipelines.convert import convert
from data_pipelines.images import to_rgb_uint8
from data_pipelines.loader import SkipStats, demo_tokenizer, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_READS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)

GOOD_LLAVA = ["single", "multi_turn", "text_only", "two_images", "lcs_caption"]
BAD_LLAVA = {
    "image_count_mismatch": ["mismatch"],
    "image_too_large": ["bomb"],
    "missing_image": ["missing"],
    "unreadable_image": ["truncated", "zero_bytes"],
}


def _encoded(fmt: str, size: tuple[int, int], seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _huge_png(side: int = 30000) -> bytes:
    """A valid 1-bit grayscale PNG of side x side pixels in ~110 KB: all-zero rows compress well."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = b"\0" * (1 + (side + 7) // 8)  # a filter byte, then 1 bit a pixel
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row * 1000) for _ in range(side // 1000)] + [z.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    files = {
        "coco/a.jpg": _encoded("JPEG", (40, 30), 0),
        "coco/b.png": _encoded("PNG", (24, 24), 1, "RGBA"),
        "c.jpg": _encoded("JPEG", (20, 36), 2, "L"),
        "d.png": _encoded("PNG", (32, 32), 3, "P"),
        "truncated.jpg": _encoded("JPEG", (64, 48), 4)[:600],
        "empty.jpg": b"",
        "huge.png": _huge_png(),
    }
    for name, content in files.items():
        (images / name).write_bytes(content)

    llava = [
        {"id": "single", "image": "coco/a.jpg",
         "conversations": _turns("<image>\nwhat color is the circle?", "the circle is red.")},
        {"id": "multi_turn", "image": "coco/b.png",
         "conversations": _turns("how many shapes are there?\n<image>", "there are two shapes.",
                                 "where is the square?", "the square is top left.")},
        {"id": "text_only", "conversations": _turns("name a color.", "blue.")},
        {"id": "two_images", "images": ["coco/a.jpg", "c.jpg"],
         "conversations": _turns("<image>\n<image>\nwhich image has a circle?", "the first.")},
        {"id": "lcs_caption", "image": "d.png",
         "conversations": _turns("<image>", "a red circle and a blue square.")},
        {"id": "truncated", "image": "truncated.jpg",
         "conversations": _turns("<image>\ndescribe the image.", "a circle.")},
        {"id": "zero_bytes", "image": "empty.jpg",
         "conversations": _turns("<image>\ndescribe the image.", "a circle.")},
        {"id": "missing", "image": "coco/nope.jpg",
         "conversations": _turns("<image>\ndescribe the image.", "a circle.")},
        {"id": "bomb", "image": "huge.png",
         "conversations": _turns("<image>\ndescribe the image.", "a circle.")},
        {"id": "mismatch", "image": "coco/a.jpg",
         "conversations": _turns("describe the image.", "a circle.")},
    ]
    (root / "llava.json").write_text(json.dumps(llava))
    captions = [
        json.dumps({"image": "coco/a.jpg", "caption": "a red circle."}),
        json.dumps({"image": "d.png", "caption": "a blue square."}),
        '{"image": "c.jpg", "caption": "a green',  # cut off mid-line
        json.dumps({"id": "cap_missing", "image": "gone.jpg", "caption": "nothing."}),
    ]
    (root / "captions.jsonl").write_text("\n".join(captions) + "\n")
    preferences = [
        {"id": "pref_0", "image": "coco/a.jpg", "prompt": "<image>\ndescribe the image.",
         "chosen": "a red circle.", "rejected": "a red circle and a yellow triangle."},
        {"id": "pref_1", "images": ["c.jpg", "d.png"], "prompt": "<image> <image> compare.",
         "chosen": "the same.", "rejected": "different."},
        {"id": "pref_mismatch", "images": ["c.jpg"], "prompt": "describe the image.",
         "chosen": "a circle.", "rejected": "a square."},
    ]
    (root / "preferences.json").write_text(json.dumps(preferences))
    return root


@pytest.fixture(scope="module")
def llava_out(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "llava"
    report = convert("llava", data / "llava.json", data / "images", out, num_shards=2, workers=2)
    return out, report


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    demo_tokenizer(path)
    return path


def test_record_serialisation_round_trips_bytes_and_json_fields():
    record = {"id": "x", "images": [b"\xff\xd8one", b"two"], "image": b"3", "caption": "é <image>",
              "empty": [], "turns": [{"from": "human", "value": "hi"}]}
    assert deserialize_record(serialize_record(record)) == record
    with pytest.raises(ValueError, match="not an lvlm record"):
        deserialize_record(b"JUNKJUNK")


def test_llava_conversion_counts_converted_and_skipped_records_by_reason(llava_out, data):
    out, report = llava_out
    assert report.converted == len(GOOD_LLAVA)
    assert report.skipped == {reason: len(ids) for reason, ids in BAD_LLAVA.items()}
    assert report.skipped_ids == BAD_LLAVA
    assert [os.path.basename(s) for s in report.shards] == [
        "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["format"], meta["kind"]) == ("llava", "conversation")
    assert (meta["num_input"], meta["num_records"], meta["num_skipped"]) == (10, 5, 5)
    assert sum(s["num_records"] for s in meta["shards"]) == 5
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["truncated", "zero_bytes", "missing", "bomb", "mismatch"]
    assert "900000000 pixels" in skipped[3]["detail"]  # from the header: nothing was decoded


def test_conversion_is_deterministic_across_worker_counts(llava_out, data, tmp_path):
    out, report = llava_out
    again = convert("llava", data / "llava.json", data / "images", tmp_path / "again",
                    num_shards=2, workers=1, verbose=False)
    for a, b in zip(report.shards, again.shards, strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()
    assert (out / "metadata.json").read_text() == (tmp_path / "again/metadata.json").read_text()


def test_arrayrecord_source_reads_records_in_input_order_with_encoded_images(llava_out, data):
    out, _ = llava_out
    source = ArrayRecordSource(out)
    assert len(source) == 5 and source.kind == "conversation"
    records = [source[i] for i in range(len(source))]
    assert [r["id"] for r in records] == GOOD_LLAVA
    single, multi, text_only, two, _ = records
    assert single["images"] == [(data / "images/coco/a.jpg").read_bytes()]  # stored as encoded
    assert to_rgb_uint8(single["images"][0]).shape == (30, 40, 3)
    assert to_rgb_uint8(two["images"][1]).shape == (36, 20, 3)
    assert len(multi["conversations"]) == 4 and text_only["images"] == []
    assert two["image_files"] == ["coco/a.jpg", "c.jpg"]
    with pytest.raises(IndexError):
        source[5]


def test_converted_conversations_feed_the_loader(llava_out, tok_dir):
    out, _ = llava_out
    stats = SkipStats()
    ds = make_dataset(ArrayRecordSource(out), kind="conversation",
                      tokenizer=demo_tokenizer(tok_dir), template="vicuna_v1", seq_len=128,
                      image_size=16, image_tokens=4, max_images=2, batch_size=2, seed=0,
                      stats=stats, read_options=SMALL_READS)
    batches = list(itertools.islice(iter(ds), 5))  # two epochs
    assert len(batches) == 5
    for batch in batches:
        assert batch["input_ids"].shape == (2, 128)
        assert batch["pixel_values"].shape == (2, 2, 16, 16, 3)
        assert batch["loss_mask"].sum() > 0
    assert stats.skipped_fraction == 0.0


def test_captions_skip_malformed_json_lines_and_feed_the_loader(data, tmp_path, tok_dir):
    report = convert("captions", data / "captions.jsonl", data / "images", tmp_path / "cap",
                     workers=1, verbose=False)
    assert report.converted == 2 and report.kind == "caption"
    assert report.skipped_ids == {"malformed_json": ["line 3"], "missing_image": ["cap_missing"]}
    source = ArrayRecordSource(tmp_path / "cap")
    assert [source[i]["caption"] for i in range(2)] == ["a red circle.", "a blue square."]
    ds = make_dataset(source, kind="caption", tokenizer=demo_tokenizer(tok_dir), template="plain",
                      seq_len=32, image_size=16, image_tokens=4, batch_size=2, seed=0,
                      read_options=SMALL_READS)
    assert next(iter(ds))["pixel_values"].shape == (2, 1, 16, 16, 3)


def test_preferences_keep_prompt_chosen_rejected_and_images(data, tmp_path):
    report = convert("preferences", data / "preferences.json", data / "images", tmp_path / "pref",
                     workers=1, verbose=False)
    assert report.converted == 2
    assert report.skipped_ids == {"image_count_mismatch": ["pref_mismatch"]}
    record = ArrayRecordSource(tmp_path / "pref")[1]
    assert record["id"] == "pref_1" and len(record["images"]) == 2
    assert (record["chosen"], record["rejected"]) == ("the same.", "different.")


def test_bad_arguments_and_empty_paths_fail_with_clear_messages(data, tmp_path, llava_out):
    with pytest.raises(ValueError, match="unknown format 'coco'"):
        convert("coco", data / "llava.json", data / "images", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        convert("llava", data / "nope.json", data / "images", tmp_path / "x")
    with pytest.raises(FileExistsError, match="already holds"):
        convert("llava", data / "llava.json", data / "images", llava_out[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards .*empty'"):
        ArrayRecordSource(tmp_path / "empty")

    from lvlm_jax.train.input_pipeline import make_source

    def cfg(**data_cfg):
        return ConfigDict({"seed": 0, "data": {"source": "arrayrecord", "path": "",
                                                "kind": "conversation", **data_cfg}})

    with pytest.raises(ValueError, match="needs data.path"):
        make_source(cfg(), None)
    with pytest.raises(FileNotFoundError, match="data.path='/no/such/dir'"):
        make_source(cfg(path="/no/such/dir"), None)
    with pytest.raises(ValueError, match="holds 'conversation' records but data.kind is 'caption'"):
        make_source(cfg(path=str(llava_out[0]), kind="caption"), None)
    assert len(make_source(cfg(path=str(llava_out[0])), None)) == 5


def _lvlm(*args, cache=None, timeout=300):
    env = cpu_env()
    if cache:
        env["LVLM_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "lvlm_jax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_converts_then_trains_two_steps_on_the_shards(data, tmp_path, tok_dir):
    out = tmp_path / "shards"
    res = _lvlm("data", "convert", "--format=llava", f"--input={data / 'llava.json'}",
                f"--images={data / 'images'}", f"--out={out}", "--num_shards=3")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "5 converted, 5 skipped" in res.stdout
    assert "unreadable_image: 2" in res.stdout and "skipping record bomb" in res.stderr
    assert "convert: 10/10 records" in res.stderr  # progress

    workdir = tmp_path / "run"
    res = _lvlm("train", "--config=experiments/demo.py:sft", f"--workdir={workdir}",
                "--config.data.source=arrayrecord", f"--config.data.path={out}",
                "--config.train.total_steps=2", "--config.data.batch_size=4",
                "--config.train.progress=false", cache=tok_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) >= 1 and all(np.isfinite(losses))


def test_cli_bad_arguments_fail_with_one_line(data, tmp_path):
    for args, message in [
        (["--format=coco"], "unknown format 'coco'"),
        (["--format=llava", "--num_shards=0"], "num_shards must be >= 1"),
        (["--format=llava", f"--input={tmp_path / 'nope.json'}"], "nope.json"),
    ]:
        base = [f"--input={data / 'llava.json'}", f"--images={data / 'images'}",
                f"--out={tmp_path / 'o'}"]
        res = _lvlm("data", "convert", *base, *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
