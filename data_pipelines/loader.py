"""The training input pipeline: records -> templated, masked, fixed-length examples -> batches."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from data_pipelines.images import prepare_image
from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.templates import (
    IMAGE_MARK,
    SPECIAL_MARKERS,
    TextTokenizer,
    get_template,
    render,
    template_texts,
)
from data_pipelines.tokenizer import Tokenizer, train_tokenizer

KINDS = ("caption", "conversation")
DEMO_VOCAB_SIZE = 384  # an upper bound: the closed synthetic vocabulary needs fewer pieces
_DEMO_TOKENIZER = "demo_tokenizer_v1"  # bump when the corpus or the template words change
_KEPT_IDS = 100  # skipped ids remembered by SkipStats

log = logging.getLogger(__name__)


class BadRecord(ValueError):
    """A record that cannot become a training example; it is skipped and counted."""


class SkipStats:
    """Thread-safe counts of encoded and skipped records, with the last few skipped ids.

    Counts are of records the pipeline has encoded, which runs ahead of the batches consumed (grain
    prefetches) and is not part of the iterator state: use them for logs and budgets, not resumes.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.kept = 0
        self.skipped: Counter[str] = Counter()  # reason -> count
        self.skipped_ids: list[str] = []

    def add_kept(self) -> None:
        with self._lock:
            self.kept += 1

    def add_skipped(self, record_id: str, reason: str) -> None:
        with self._lock:
            self.skipped[reason.split(":")[0]] += 1
            self.skipped_ids = [*self.skipped_ids[-(_KEPT_IDS - 1) :], record_id]

    @property
    def skipped_fraction(self) -> float:
        total = self.kept + sum(self.skipped.values())
        return sum(self.skipped.values()) / total if total else 0.0


def example_spec(seq_len: int, image_size: int, max_images: int = 1) -> dict[str, tuple]:
    """Shape and dtype of every field of one example (prepend the batch size for a batch)."""
    return {
        "input_ids": ((seq_len,), np.int32),
        "targets": ((seq_len,), np.int32),
        "loss_mask": ((seq_len,), np.float32),
        "segment_ids": ((seq_len,), np.int32),
        "positions": ((seq_len,), np.int32),
        "pixel_values": ((max_images, image_size, image_size, 3), np.uint8),
    }


def _conversation(record: dict[str, Any], kind: str) -> tuple[list[dict], list[Any]]:
    if kind == "caption":
        image, caption = record["image"], record["caption"]
        return [{"from": "human", "value": IMAGE_MARK}, {"from": "gpt", "value": caption}], [image]
    images = record.get("images")
    if images is None:  # LLaVA's JSON names one image "image"
        images = [record["image"]] if record.get("image") is not None else []
    return list(record["conversations"]), list(images)


def encode_example(
    record: dict[str, Any],
    *,
    kind: str,
    tokenizer: TextTokenizer,
    template: str,
    seq_len: int,
    image_size: int,
    image_tokens: int,
    max_images: int = 1,
    image_mode: str = "pad",
) -> dict[str, np.ndarray]:
    """One record -> one fixed-length example (see `example_spec`); raises BadRecord.

    `targets[i]` is `input_ids[i + 1]` (0 at the last real position) and `loss_mask[i]` says whether
    it is supervised. Too-long text is cut from the end, never inside an image's token block; the
    images whose blocks were cut away are zeroed.
    """
    try:
        turns, images = _conversation(record, kind)
        ids, mask = render(
            "plain" if kind == "caption" else template, turns, tokenizer, image_tokens
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    starts = np.flatnonzero(ids == tokenizer.image_id)[::image_tokens]
    if len(starts) != len(images):
        marks = f"{len(starts)} {IMAGE_MARK} marks"
        raise BadRecord(f"wrong image count: {marks} for {len(images)} images")
    if len(images) > max_images:
        raise BadRecord(f"too many images: {len(images)} > max_images={max_images}")

    keep = min(len(ids), seq_len)
    for start in starts:
        if start < keep < start + image_tokens:
            keep = int(start)
    ids, mask = ids[:keep], mask[:keep]
    if not mask[1:].any():
        raise BadRecord(f"no supervised token fits in seq_len={seq_len}")

    pixels = np.zeros((max_images, image_size, image_size, 3), np.uint8)
    for j, image in enumerate(images):
        try:
            prepared = prepare_image(image, image_size, image_mode)
        except (OSError, TypeError, ValueError) as e:
            raise BadRecord(f"unreadable image: {e!r}") from e
        if starts[j] + image_tokens <= keep:
            pixels[j] = prepared

    example = {
        name: np.zeros(shape, dtype)
        for name, (shape, dtype) in example_spec(seq_len, image_size, max_images).items()
    }
    example["input_ids"][:keep] = ids
    example["targets"][: keep - 1] = ids[1:]
    example["loss_mask"][: keep - 1] = mask[1:]
    example["segment_ids"][:keep] = 1
    example["positions"][:keep] = np.arange(keep)
    example["pixel_values"] = pixels
    return example


class EncodeRecord(grain.transforms.Map):
    """encode_example as a grain transform: a bad record becomes None, logged and counted."""

    def __init__(self, stats: SkipStats | None = None, **encode_kwargs: Any):
        self.stats = stats if stats is not None else SkipStats()
        self.kwargs = encode_kwargs

    def map(self, record: dict[str, Any]) -> dict[str, np.ndarray] | None:
        try:
            example = encode_example(record, **self.kwargs)
        except BadRecord as e:
            record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
            log.warning("skipping record %s: %s", record_id, e)
            self.stats.add_skipped(record_id, str(e))
            return None
        self.stats.add_kept()
        return example


class SyntheticSource:
    """A random-access source of SyntheticShapes records: `kind` "caption" or "conversation"."""

    def __init__(
        self, kind: str, n: int, seed: int = 0, image_size: int = 64, split: str = "train"
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; valid kinds: {list(KINDS)}")
        self.kind, self.n = kind, n
        self._shapes = SyntheticShapes(seed=seed, image_size=image_size, split=split)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} out of range for {self.n} records")
        return getattr(self._shapes, self.kind)(index)

    def __repr__(self) -> str:
        return f"SyntheticSource({self.kind!r}, n={self.n}, split={self._shapes.split!r})"


def make_dataset(
    source: Sequence[dict[str, Any]],
    *,
    kind: str,
    tokenizer: TextTokenizer,
    template: str,
    seq_len: int,
    image_size: int,
    image_tokens: int,
    max_images: int = 1,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    image_mode: str = "pad",
    max_skip_fraction: float | None = 0.5,
    stats: SkipStats | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """A deterministic, checkpointable grain pipeline of batches (dicts of stacked numpy arrays).

    This process reads records `shard_index::shard_count`, shuffled by `seed` (reshuffled every
    epoch), for `num_epochs` epochs (None: forever). Caption records use the `plain` template and
    conversation records `template`. Bad records are skipped and counted in `stats`; grain raises
    when more than `max_skip_fraction` of a window of 1000 records is skipped. The last partial
    batch is dropped.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; valid kinds: {list(KINDS)}")
    get_template(template)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} of {len(source)} records is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    encode = EncodeRecord(
        stats,
        kind=kind,
        tokenizer=tokenizer,
        template=template,
        seq_len=seq_len,
        image_size=image_size,
        image_tokens=image_tokens,
        max_images=max_images,
        image_mode=image_mode,
    )
    ds = ds.map(encode).filter(lambda example: example is not None)
    it = ds.to_iter_dataset(read_options)
    options = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=max_skip_fraction)
    it = grain.experimental.WithOptionsIterDataset(it, options)
    return it.batch(batch_size, drop_remainder=True)


def demo_tokenizer(cache_dir: str | os.PathLike) -> Tokenizer:
    """The demo's SentencePiece model, trained once on the synthetic corpus and template words.

    Training is deterministic; the model is cached as `cache_dir/demo_tokenizer_v1.model`. The
    templates' special markers are single tokens, so rendered chats never need <unk>.
    """
    path = Path(cache_dir) / f"{_DEMO_TOKENIZER}.model"
    if not path.is_file():
        lines = SyntheticShapes(seed=0).corpus(500) + template_texts()
        tmp_prefix = Path(cache_dir) / f".{_DEMO_TOKENIZER}.{os.getpid()}.{threading.get_ident()}"
        model = train_tokenizer(
            lines,
            str(tmp_prefix),
            DEMO_VOCAB_SIZE,
            user_defined_symbols=(IMAGE_MARK, *SPECIAL_MARKERS),
        )
        os.replace(model, path)  # atomic: concurrent trainers write the same model
        Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    return Tokenizer(str(path))
