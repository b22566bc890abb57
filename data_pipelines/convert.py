"""Converts LLaVA JSON, caption JSONL and preference JSON to checked ArrayRecord shards."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from data_pipelines.arrayrecord_source import (
    METADATA,
    SHARD_SUFFIX,
    serialize_record,
    shard_name,
)
from data_pipelines.templates import IMAGE_MARK
from data_pipelines.tokenizer_base import VIDEO_MARK

FORMATS = {"llava": "conversation", "captions": "caption", "preferences": "preference"}
REASONS = ("malformed_json", "malformed_record", "image_count_mismatch", "missing_image",
           "unreadable_image", "image_too_large", "video_count_mismatch", "missing_video",
           "unreadable_video")
SPLIT = "train"
SKIPPED = "skipped.jsonl"
RECORDS_PER_SHARD = 50_000  # the default shard count aims at files of a few GB of images
# The loader decodes with PIL's default limits, which refuse images past twice this many pixels;
# a record the loader cannot decode must not pass conversion.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# group_size:1 makes every record its own chunk, which grain's random access needs to be fast;
# images are already compressed, so the writer does not compress again.
WRITER_OPTIONS = "group_size:1,uncompressed"

log = logging.getLogger(__name__)

Item = tuple[str, Any]  # (fallback id, a parsed JSON value or a raw JSONL line)


class Skip(Exception):
    """A source record that cannot become a training record; it is skipped and counted."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        self.id = "?"  # filled in by convert_record once the record's id is known


@dataclass
class ConvertReport:
    """What `convert` wrote: counts, the skipped ids by reason, and the shard files."""

    format: str
    kind: str
    out_dir: str
    converted: int
    skipped: dict[str, int]  # reason -> count
    skipped_ids: dict[str, list[str]]  # reason -> ids, in input order
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items()))
        skipped = f" ({reasons})" if reasons else ""
        return (f"{self.converted} converted, {self.num_skipped} skipped{skipped} -> "
                f"{self.out_dir} ({len(self.shards)} shards, kind={self.kind})")


# --- reading the input ------------------------------------------------------------------------


def read_items(input_path: str | os.PathLike) -> list[Item]:
    """A JSON list (LLaVA's files) or JSONL (one object a line; lines are parsed by the workers,
    so a malformed line skips only itself)."""
    path = Path(input_path)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e
        return [(f"#{i}", v) for i, v in enumerate(values)]
    return [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


# --- checking one record ------------------------------------------------------------------------


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of encoded image bytes that decode cleanly; raises Skip otherwise.

    The size comes from the header before anything is decoded, so a decompression bomb costs
    nothing; then the whole file is decoded (JPEG at 1/8 scale, which still reads every byte), as
    `verify()` alone misses a truncated JPEG.
    """
    if not data:
        raise Skip("unreadable_image", "empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise Skip("image_too_large",
                               f"{width}x{height} is over max_pixels={max_pixels}")
                img.verify()
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
        except Image.DecompressionBombError as e:  # PIL's own header check, past 2x its limit
            raise Skip("image_too_large", f"over max_pixels={max_pixels}: {e}") from e
        except Skip:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
            raise Skip("unreadable_image", f"{type(e).__name__}: {e}") from e
    return width, height


def _read_image(images_dir: Path, ref: Any, max_pixels: int) -> bytes:
    if not isinstance(ref, str) or not ref:
        raise Skip("malformed_record", f"image path {ref!r} is not a non-empty string")
    path = images_dir / ref
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise Skip("missing_image", f"no file {str(path)!r}") from e
    except OSError as e:
        raise Skip("unreadable_image", f"{str(path)!r}: {e}") from e
    try:
        check_image(data, max_pixels)
    except Skip as e:
        raise Skip(e.reason, f"{ref}: {e.detail}") from None
    return data


def _read_video(videos_dir: Path, ref: Any) -> bytes:
    """A clip's bytes, checked to open and decode its first frame (the loader decodes the rest
    and skips a clip that fails there); raises Skip otherwise."""
    from data_pipelines import video

    if not isinstance(ref, str) or not ref:
        raise Skip("malformed_record", f"video path {ref!r} is not a non-empty string")
    path = videos_dir / ref
    if path.is_dir():
        raise Skip("unreadable_video", f"{str(path)!r} is a folder; convert stores video files")
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as e:
        raise Skip("missing_video", f"no file {str(path)!r}") from e
    except OSError as e:
        raise Skip("unreadable_video", f"{str(path)!r}: {e}") from e
    try:
        video.count_frames(data)
    except video.VideoError as e:
        raise Skip("unreadable_video", f"{ref}: {e}") from None
    return data


def _video_refs(raw: dict[str, Any]) -> list[Any]:
    """A conversation's clips: "video" (one path, or a list) or "videos" (a list)."""
    value = raw.get("videos") if raw.get("videos") is not None else raw.get("video")
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if raw.get("videos") is not None:
        raise Skip("malformed_record", "'videos' is not a list")
    return [value]


def _image_refs(raw: dict[str, Any]) -> list[Any]:
    """LLaVA names one image "image" and several "images"; text-only records have neither."""
    if raw.get("images") is not None:
        if not isinstance(raw["images"], list):
            raise Skip("malformed_record", "'images' is not a list")
        return raw["images"]
    return [raw["image"]] if raw.get("image") is not None else []


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise Skip("malformed_record", f"{key!r} is {type(value).__name__}, not a string")
    return value


def _fields(fmt: str, raw: dict[str, Any]) -> tuple[dict[str, Any], list[Any], list[str]]:
    """(the record's text fields, its image paths, the texts whose <image> marks must match)."""
    if fmt == "captions":
        caption = _text(raw, "caption")
        # The loader renders a caption as one "<image>" turn plus the caption.
        return {"caption": caption}, [raw.get("image")], [IMAGE_MARK, caption]
    refs = _image_refs(raw)
    if fmt == "preferences":
        texts = {k: _text(raw, k) for k in ("prompt", "chosen", "rejected")}
        return texts, refs, list(texts.values())
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Skip("malformed_record", "'conversations' is not a non-empty list")
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise Skip("malformed_record", f"turn {turn!r} lacks string 'from' and 'value'")
    turns = [{"from": t["from"], "value": t["value"]} for t in turns]
    return {"conversations": turns}, refs, [t["value"] for t in turns]


def convert_record(fmt: str, item: Item, images_dir: Path, max_pixels: int
                   ) -> tuple[str, bytes]:
    """(record id, serialised record) for one input item; raises Skip with the id in `.id`."""
    record_id, raw = item
    try:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise Skip("malformed_json", str(e)) from e
        if not isinstance(raw, dict):
            raise Skip("malformed_record", f"a {type(raw).__name__}, not a JSON object")
        record_id = str(raw.get("id", record_id))
        texts, refs, marked = _fields(fmt, raw)
        marks = sum(t.count(IMAGE_MARK) for t in marked)
        if marks != len(refs):
            raise Skip("image_count_mismatch", f"{marks} {IMAGE_MARK} marks for {len(refs)} images")
        video_refs = _video_refs(raw) if fmt == "llava" else []
        marks = sum(t.count(VIDEO_MARK) for t in marked)
        if fmt == "llava" and marks != len(video_refs):
            raise Skip("video_count_mismatch",
                       f"{marks} {VIDEO_MARK} marks for {len(video_refs)} videos")
        images = [_read_image(images_dir, ref, max_pixels) for ref in refs]
        videos = [_read_video(images_dir, ref) for ref in video_refs]
    except Skip as e:
        e.id = record_id
        raise
    if fmt == "captions":
        record = {"id": record_id, "image": images[0], **texts, "image_file": refs[0]}
    else:
        record = {"id": record_id, "images": images, **texts, "image_files": refs}
    if isinstance(raw.get("video"), str) and raw.get("videos") is None:  # as it came
        record.update(video=videos[0], video_file=video_refs[0])
    elif videos:
        record.update(videos=videos, video_files=video_refs)
    return record_id, serialize_record(record)


Result = tuple[str, bytes | None, str, str]  # (id, record or None, skip reason, detail)


def _convert_chunk(fmt: str, images_dir: Path, max_pixels: int, items: Sequence[Item]
                   ) -> list[Result]:
    out = []
    for item in items:
        try:
            out.append((*convert_record(fmt, item, images_dir, max_pixels), "", ""))
        except Skip as e:
            out.append((e.id, None, e.reason, e.detail))
    return out


def _ordered_results(fn: Callable[[Sequence[Item]], list[Result]], chunks: list[Sequence[Item]],
                     workers: int) -> Iterator[list[Result]]:
    """fn over chunks in input order; a bounded window of chunks in flight keeps the image bytes
    held in memory small whatever the dataset size."""
    if workers <= 1:
        yield from map(fn, chunks)
        return
    method = multiprocessing.get_all_start_methods()[0]  # the platform's default
    if method == "fork" and "jax" in sys.modules:
        method = "spawn"  # jax runs threads that a fork would copy mid-flight, stuck
    # An executor, not a Pool: a worker that dies raises BrokenProcessPool instead of hanging.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque[Future] = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- the conversion -----------------------------------------------------------------------------


def convert(
    fmt: str,
    input_path: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    num_shards: int | None = None,
    workers: int | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chunk_size: int = 64,
    verbose: bool = True,
) -> ConvertReport:
    """Checks every record of `input_path` and writes the good ones to ArrayRecord shards.

    `fmt` is "llava" (LLaVA JSON: `{id, image | images, conversations}`, also pretraining
    captions like LCS-558K, and `{id, video, conversations}` with a `<video>` mark, the file's
    bytes stored as images' are), "captions" (JSONL of `{image, caption}`) or "preferences"
    (`{id, images | image, prompt, chosen, rejected}`); JSON lists and JSONL both work. Image
    and video paths are relative to `images_dir` (None: the input file's folder). Records are
    checked in `workers` processes (None: all cores) and written in input order, shard `i` holding a
    contiguous `1/num_shards` of the input, so the same input gives the same files. Bad records
    are skipped, counted by reason, logged with their ids and listed in `out_dir/skipped.jsonl`;
    `out_dir/metadata.json` records the format, kind and counts.
    """
    start = time.time()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {list(FORMATS)}")
    input_path = Path(input_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file {str(input_path)!r} does not exist")
    images_dir = Path(images_dir) if images_dir is not None else input_path.parent
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images directory {str(images_dir)!r} does not exist")
    for name, value in (("num_shards", num_shards), ("workers", workers),
                        ("chunk_size", chunk_size), ("max_pixels", max_pixels)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob(f"*{SHARD_SUFFIX}*")):
        raise FileExistsError(f"{str(out_dir)!r} already holds ArrayRecord shards; "
                              "convert into an empty directory")

    items = read_items(input_path)
    n = len(items)
    if n == 0:
        raise ValueError(f"{str(input_path)!r} holds no records")
    num_shards = min(num_shards or math.ceil(n / RECORDS_PER_SHARD), n)
    workers = workers or os.cpu_count() or 1
    # Small inputs still spread over every worker; big ones go in chunks of chunk_size.
    size = max(1, min(chunk_size, math.ceil(n / (4 * workers))))
    chunks = [items[i : i + size] for i in range(0, n, size)]
    workers = min(workers, len(chunks))
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = FORMATS[fmt]
    say = functools.partial(print, file=sys.stderr, flush=True) if verbose else lambda *a: None
    say(f"convert: {n} {fmt} records from {input_path} -> {out_dir} "
        f"({num_shards} shards, {workers} workers)")

    shards = [out_dir / shard_name(SPLIT, s, num_shards) for s in range(num_shards)]
    shard_counts = [0] * num_shards
    skipped: Counter[str] = Counter()
    skipped_ids: dict[str, list[str]] = {}
    fn = functools.partial(_convert_chunk, fmt, images_dir, max_pixels)
    index, current, writer = 0, -1, None
    last_report = time.time()
    with open(out_dir / SKIPPED, "w", encoding="utf-8") as skip_file:
        for results in _ordered_results(fn, chunks, workers):
            for record_id, data, reason, detail in results:
                # Shards hold contiguous runs of the input, so one writer is open at a time.
                shard = index * num_shards // n
                while current < shard:
                    if writer is not None:
                        writer.close()
                    current += 1
                    writer = ArrayRecordWriter(str(shards[current]), WRITER_OPTIONS)
                index += 1
                if data is None:
                    log.warning("skipping record %s: %s: %s", record_id, reason, detail)
                    skipped[reason] += 1
                    skipped_ids.setdefault(reason, []).append(record_id)
                    skip_file.write(json.dumps({"id": record_id, "reason": reason,
                                                "detail": detail}) + "\n")
                    continue
                writer.write(data)
                shard_counts[current] += 1
            if time.time() - last_report > 10 or index == n:
                last_report = time.time()
                rate = index / max(time.time() - start, 1e-9)
                say(f"convert: {index}/{n} records, {sum(shard_counts)} converted, "
                    f"{sum(skipped.values())} skipped ({rate:.0f} records/s)")
    while current < num_shards - 1:  # shards past the last record still exist, empty
        if writer is not None:
            writer.close()
        current += 1
        writer = ArrayRecordWriter(str(shards[current]), WRITER_OPTIONS)
    writer.close()

    report = ConvertReport(
        format=fmt, kind=kind, out_dir=str(out_dir), converted=sum(shard_counts),
        skipped=dict(sorted(skipped.items())), skipped_ids=skipped_ids,
        shards=[str(s) for s in shards], seconds=time.time() - start)
    metadata = {
        "format": fmt,
        "kind": kind,
        "record_format": "LVR1: magic, uint32 header length, JSON header, image bytes "
                         "(data_pipelines/arrayrecord_source.py)",
        "input": str(input_path),
        "num_input": n,
        "num_records": report.converted,
        "num_skipped": report.num_skipped,
        "skipped": report.skipped,
        "max_pixels": max_pixels,
        "shards": [{"file": s.name, "num_records": c} for s, c in zip(shards, shard_counts,
                                                                       strict=True)],
    }
    # Written last: a directory with metadata.json is a finished conversion.
    (out_dir / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return report
