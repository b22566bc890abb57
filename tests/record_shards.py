"""Test helper: ArrayRecord shards written record by record, as `lvlm data convert` lays them out
but without its checks, so a test can put any record (bad ones included) in front of a run."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from data_pipelines.arrayrecord_source import METADATA, serialize_record, shard_name


def png(colour: int, side: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), colour % 256, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def numbered_captions(n: int) -> list[dict]:
    """Caption records whose caption spells their number digit by digit ("1 2" for 12)."""
    return [{"id": str(i), "image": png(i), "caption": " ".join(str(i))} for i in range(n)]


def write_shards(out: Path, records: list, kind: str, num_shards: int = 2) -> Path:
    """`records` (dicts, or raw bytes written as they are) -> out/train-*.array_record."""
    out.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        writer = ArrayRecordWriter(str(out / shard_name("train", s, num_shards)),
                                   "group_size:1,uncompressed")
        for record in records[s::num_shards]:
            writer.write(record if isinstance(record, bytes) else serialize_record(record))
        writer.close()
    (out / METADATA).write_text(json.dumps({"kind": kind, "converted": len(records)}))
    return out


def caption_number(tokenizer, batch: dict, row: int = 0) -> int:
    """The number spelled by a caption example's supervised targets."""
    targets = batch["targets"][row][batch["loss_mask"][row] == 1]
    return int(tokenizer.decode(targets).replace(" ", ""))


def png_header(side: int) -> bytes:
    """A PNG that claims side x side pixels and holds none: enough for a decoder's size check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def jpeg(colour: int, side: int = 32) -> bytes:
    rng = np.random.default_rng(colour)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()
