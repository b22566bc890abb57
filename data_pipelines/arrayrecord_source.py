"""Random access over the ArrayRecord shards of `lvlm data convert`, and their record format.

One record is one serialised dict (`serialize_record` / `deserialize_record`):

    b"LVR1" | n: uint32 little-endian | header: n bytes of UTF-8 JSON | blob_0 | blob_1 | ...

    header = {"record": {...the JSON fields...}, "blobs": {"images": [len_0, len_1, ...]}}

Every field whose value is bytes (`"image": len`) or a non-empty list of bytes (`"images": [...]`)
is stored as raw blobs after the header, in header order, and restored as bytes on reading. Images
stay encoded exactly as in their source files (JPEG, PNG, ...); the loader decodes them. A JSON
header and raw bytes need nothing beyond the standard library, any language can read them, and
reading a record costs one small JSON parse plus slices of the image bytes.

A converted directory holds `train-00000-of-00004.array_record`, ..., and `metadata.json` with the
format, the record kind (caption | conversation | preference) and the counts.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from array_record.python.array_record_data_source import ArrayRecordDataSource

MAGIC = b"LVR1"
_HEADER_LEN = struct.Struct("<I")
METADATA = "metadata.json"
SHARD_SUFFIX = ".array_record"


def _is_blob_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, bytes) for v in value)


def serialize_record(record: dict[str, Any]) -> bytes:
    """A dict of JSON values and bytes (or lists of bytes) -> one record (see the module doc)."""
    fields, blob_lens, blobs = {}, {}, []
    for key, value in record.items():
        if isinstance(value, bytes):
            blob_lens[key] = len(value)
            blobs.append(value)
        elif _is_blob_list(value):
            blob_lens[key] = [len(v) for v in value]
            blobs.extend(value)
        else:
            fields[key] = value
    header = json.dumps({"record": fields, "blobs": blob_lens}, ensure_ascii=False,
                        separators=(",", ":")).encode()
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header, *blobs])


def deserialize_record(data: bytes) -> dict[str, Any]:
    """The inverse of `serialize_record`."""
    if data[:4] != MAGIC:
        raise ValueError(f"not an lvlm record (starts with {bytes(data[:4])!r}, not {MAGIC!r})")
    (n,) = _HEADER_LEN.unpack_from(data, 4)
    start = 4 + _HEADER_LEN.size
    header = json.loads(data[start : start + n])
    record = header["record"]
    offset = start + n
    for key, lens in header["blobs"].items():
        parts = []
        for length in lens if isinstance(lens, list) else [lens]:
            parts.append(bytes(data[offset : offset + length]))
            offset += length
        record[key] = parts if isinstance(lens, list) else parts[0]
    return record


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def find_shards(path: str | os.PathLike, split: str | None = None) -> list[Path]:
    """The shard files of a directory (sorted; only `split`'s when given), or the one file named."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no ArrayRecord shards at {str(path)!r}: it does not exist")
    # "*.array_record*" also matches TFDS's "name-train.array_record-00000-of-00008".
    files = sorted(p for p in path.glob(f"*{SHARD_SUFFIX}*") if p.is_file())
    if split is not None:
        files = [p for p in files if p.name.startswith(f"{split}-") or f"-{split}." in p.name]
    if not files:
        which = f"{split!r} " if split else ""
        raise FileNotFoundError(
            f"no {which}ArrayRecord shards (*{SHARD_SUFFIX}) in {str(path)!r}; "
            "make them with `lvlm data convert`")
    return files


class ArrayRecordSource:
    """Records of all shards of a converted directory (or one shard file), by global index.

    A grain random-access source: `len(source)`, `source[i]` -> the record dict, images as
    encoded bytes. `kind` and `metadata` come from the directory's metadata.json when it has one.
    Picklable, so grain worker processes can read it.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None):
        self.path = str(path)
        self.files = [str(f) for f in find_shards(path, split)]
        self._source = ArrayRecordDataSource(self.files)
        meta_path = Path(path) / METADATA if Path(path).is_dir() else None
        self.metadata: dict[str, Any] = (
            json.loads(meta_path.read_text()) if meta_path and meta_path.is_file() else {})
        self.kind: str | None = self.metadata.get("kind")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        return deserialize_record(self._source[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, {len(self.files)} shards, {len(self)} records)"
