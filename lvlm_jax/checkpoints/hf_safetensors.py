"""Reads and writes safetensors files with numpy alone (bfloat16 included, via ml_dtypes).

Our own ~100 lines rather than `safetensors.numpy`: numpy has no bfloat16, and most hub
checkpoints are bf16. Reading memory-maps the file and checks its header against its size, so a
truncated or garbled file fails naming the file instead of deep inside numpy. Writing is
deterministic (tensors in name order, a fixed header layout), so exporting the same parameters
twice gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64), "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16), "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message names the file."""


class SafetensorsFile:
    """One memory-mapped safetensors file: `names`, `shape(name)`, `dtype(name)`, `[name]`."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)

        def bad(why: str) -> SafetensorsError:
            return SafetensorsError(f"{path} is not a valid safetensors file: {why}")

        if size < 8:
            raise bad(f"it has only {size} bytes")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(_MAX_HEADER, size - 8):
                raise bad(f"its header claims {n} bytes, but the file has {size}")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_size = size - self._start
        self._info: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
            if not 0 <= begin <= end <= data_size:
                raise bad(f"tensor {name!r} lies at bytes {begin}..{end}, past the end of the "
                          f"data ({data_size} bytes): the file is truncated")
            if end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise bad(f"tensor {name!r} has {end - begin} bytes for shape {shape} "
                          f"{info['dtype']}")
            self._info[name] = (dtype, shape, begin, end)
        self._map = np.memmap(path, np.uint8, "r") if size > self._start else None

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._info[name]
        if begin == end:
            return np.zeros(shape, dtype)
        raw = self._map[self._start + begin:self._start + end]
        return raw.view(dtype).reshape(shape)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` in name order, streaming one tensor at a time."""
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in names:
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())


def open_checkpoint(files: Iterable[str]) -> dict[str, SafetensorsFile]:
    """Tensor name -> the file holding it, over all the shards of a checkpoint."""
    where: dict[str, SafetensorsFile] = {}
    for path in files:
        f = SafetensorsFile(path)
        for name in f.names:
            if name in where:
                raise SafetensorsError(f"tensor {name!r} is in both {where[name].path} and "
                                       f"{path}")
            where[name] = f
    return where
