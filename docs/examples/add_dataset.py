"""docs/add_dataset.md's worked example: a new random-access source of conversation records, fed
through the loader, and the same records written as ArrayRecord shards that `data.path` reads.

    python docs/examples/add_dataset.py        # prints one batch's fields and the shards written

tests/test_docs.py runs it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import grain
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from data_pipelines.arrayrecord_source import METADATA, serialize_record, shard_name
from data_pipelines.loader import make_dataset
from data_pipelines.synthetic import COLOR_RGB
from data_pipelines.templates import IMAGE_MARK
from lvlm_jax.config import ConfigDict, base_config
from lvlm_jax.train.input_pipeline import load_tokenizer


class ColorSquares:
    """Record i: a square of one colour and the question "what color is the image?".

    A source is anything with `len()` and `[i]` returning one record dict; grain reads it at
    random, so records must not depend on the order of reads. Images may be encoded bytes, a
    file path or a uint8 array.
    """

    def __init__(self, n: int, size: int = 48):
        self.n, self.size = n, size
        self.colors = sorted(COLOR_RGB)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)  # grain passes numpy integers
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} out of range for {self.n} records")
        color = self.colors[index % len(self.colors)]
        png = io.BytesIO()
        Image.new("RGB", (self.size, self.size), COLOR_RGB[color]).save(png, format="PNG")
        return {"id": f"square-{index}", "images": [png.getvalue()],
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_MARK}\nwhat color is the image?"},
                    {"from": "gpt", "value": color}]}


def config(out_dir: str) -> ConfigDict:
    """A training config that reads the shards of `write_shards(..., out_dir)`."""
    c = base_config()
    c.data.source = "arrayrecord"
    c.data.path = out_dir
    c.data.kind = "conversation"  # must match the shards' metadata.json
    c.data.seq_len = 96
    c.data.batch_size = 4
    c.data.shuffle = False
    c.model.vision = {"preset": "tiny"}  # 32 px, patch 8: 16 image tokens a picture
    c.train.total_steps = 10
    return c


def batches(source: Any, cfg: ConfigDict) -> grain.IterDataset:
    """One pass over `source`, in order, encoded as the training loader encodes `cfg.data`."""
    d = cfg.data
    return make_dataset(
        source, kind=d.kind, tokenizer=load_tokenizer(d),  # empty data.tokenizer: the demo's
        template=d.template, seq_len=d.seq_len, image_size=32, image_tokens=16,
        batch_size=d.batch_size, seed=cfg.seed, shuffle=False, num_epochs=1)


def write_shards(source: Any, out_dir: str, num_shards: int = 2, split: str = "train") -> None:
    """`source`'s records as `split` ArrayRecord shards plus metadata.json, the layout that
    `data.source="arrayrecord"`, `data.path=out_dir` (and `lvlm data convert`) use."""
    os.makedirs(out_dir, exist_ok=True)
    n = len(source)
    for s in range(num_shards):
        writer = ArrayRecordWriter(os.path.join(out_dir, shard_name(split, s, num_shards)),
                                   "group_size:1")  # one record a chunk: cheap random reads
        for i in range(s * n // num_shards, (s + 1) * n // num_shards):
            writer.write(serialize_record(source[i]))  # images stay encoded bytes
        writer.close()
    with open(os.path.join(out_dir, METADATA), "w") as f:
        json.dump({"kind": "conversation", "num_records": n}, f)


if __name__ == "__main__":
    import tempfile

    from data_pipelines.arrayrecord_source import ArrayRecordSource

    out = os.path.join(tempfile.mkdtemp(), "squares")
    batch = next(iter(batches(ColorSquares(8), config(out))))
    for name, value in batch.items():
        print(f"{name:14s} {value.dtype} {value.shape}")
    write_shards(ColorSquares(8), out)
    print(ArrayRecordSource(out))
