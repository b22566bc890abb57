"""The training input pipeline: records -> templated, masked, fixed-length examples -> batches."""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from data_pipelines.encoders import (
    KINDS,
    MAX_PIXELS,
    PAIR_SIDES,
    BadRecord,
    checked_image,
    encode_example,
    encode_preference,
    encode_prompt,
    example_spec,
    preference_spec,
    prompt_spec,
    vqa_prompt,
)
from data_pipelines.lanes import lane_batches
from data_pipelines.media import MediaOptions
from data_pipelines.packing import MODES as PACKING_MODES
from data_pipelines.packing import pack_first_fit
from data_pipelines.skips import DropSkipped, Skipped
from data_pipelines.synthetic import DESCRIBE_SHARE, SyntheticShapes
from data_pipelines.templates import TextTokenizer, get_template
from data_pipelines.tokenizer import open_tokenizer, train_chat_tokenizer

# The encoders live in encoders.py; they stay importable from here, where callers long found them.
__all__ = [
    "DEMO_VOCAB_SIZE", "KINDS", "MAX_PIXELS", "PAIR_SIDES", "BadRecord", "EncodeRecord",
    "MediaOptions", "PACKABLE_KINDS", "ReadableSource", "SkipStats", "SyntheticSource",
    "batch_examples",
    "check_pipeline", "checked_image", "demo_tokenizer", "encode_example", "encode_preference",
    "encode_prompt", "encoded_source", "example_spec", "make_dataset", "preference_spec",
    "prompt_spec", "reader_options", "vqa_prompt", "with_workers",
]

PACKABLE_KINDS = ("caption", "conversation")  # kinds whose examples pack.py can pack
# Open rows of a lane's first-fit packer: a sample that fits none of them flushes them all, so
# more bins fill rows better and hold more examples back.
LANE_PACKING_BINS = 4
DEMO_VOCAB_SIZE = 384  # an upper bound: the closed synthetic vocabulary needs fewer pieces
_DEMO_TOKENIZER = "demo_tokenizer_v2"  # bump when the corpus or the template words change
_KEPT_IDS = 100  # skipped ids remembered by SkipStats

log = logging.getLogger(__name__)


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

    # Grain worker processes get a copy of the pipeline; each counts its own records from zero.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

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


class ReadableSource:
    """A random-access source whose records that fail to deserialise (a corrupt ArrayRecord
    entry, a malformed JSON line) come out as `Skipped` markers instead of stopping the run."""

    def __init__(self, source: Sequence[Any]):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.source[index]
        except IndexError:
            raise
        except (ValueError, KeyError, TypeError, struct.error) as e:
            return Skipped(f"#{int(index)}", f"malformed record: {e!r}")

    def __repr__(self) -> str:
        return f"ReadableSource({self.source!r})"


class EncodeRecord(grain.transforms.Map):
    """encode_example as a grain transform: a bad record is logged with its id, counted in `stats`
    and becomes a `Skipped` marker (for skips.DropSkipped, which counts it in the iterator
    state)."""

    def __init__(self, stats: SkipStats | None = None, **encode_kwargs: Any):
        self.stats = stats if stats is not None else SkipStats()
        self.kwargs = encode_kwargs

    def map(self, record: dict[str, Any] | Skipped) -> dict[str, np.ndarray] | Skipped:
        if isinstance(record, Skipped):
            skipped = record
        else:
            try:
                example = encode_example(record, **self.kwargs)
            except BadRecord as e:
                record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
                skipped = Skipped(record_id, str(e))
            else:
                self.stats.add_kept()
                return example
        log.warning("skipping record %s: %s", skipped.record_id, skipped.reason)
        self.stats.add_skipped(skipped.record_id, skipped.reason)
        return skipped


class SyntheticSource:
    """A random-access source of SyntheticShapes records: `kind` "caption" or "conversation"."""

    def __init__(
        self, kind: str, n: int, seed: int = 0, image_size: int = 64, split: str = "train",
        description_noise: float = 0.0, describe_share: float = DESCRIBE_SHARE,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}; valid kinds: {list(KINDS)}")
        self.kind, self.n = kind, n
        self._shapes = SyntheticShapes(seed=seed, image_size=image_size, split=split,
                                       description_noise=description_noise,
                                       describe_share=describe_share)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"record {index} out of range for {self.n} records")
        if self.kind == "prompt":
            return vqa_prompt(self._shapes.vqa(index))
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
    rows: Sequence[int] | None = None,
    image_mode: str = "pad",
    max_skip_fraction: float | None = 0.5,
    stats: SkipStats | None = None,
    read_options: grain.ReadOptions | None = None,
    worker_count: int = 0,
    packing: str = "none",
    min_skip_records: int = 1000,
    media: MediaOptions | None = None,
    batch_map: grain.transforms.Map | None = None,
) -> grain.IterDataset:
    """A deterministic, checkpointable grain pipeline of batches (dicts of stacked numpy arrays).

    The records are shuffled by `seed` (reshuffled every epoch) for `num_epochs` epochs (None:
    forever) and dealt into `batch_size` lanes, one per row of the global batch (see lanes.py):
    the global batch of step s depends on the dataset, the seed and s only, and this process
    gets its `rows` of it (None: all), reading only their lanes. Caption records use the `plain`
    template and conversation records `template`. A bad record is skipped within its lane,
    logged with its id and counted (in `stats`, and in the iterator state: skips.skip_counts);
    iteration fails once more than `max_skip_fraction` of the records read were skipped (after
    `min_skip_records` reads). With `packing="first_fit"` a row holds several samples of its lane
    (see packing.py; preference pairs are never packed). Iteration ends when a lane of `rows`
    does. `worker_count` > 0 runs the pipeline in that many processes (see `with_workers`).
    With `media`, examples are flat (encoders.encode_flat_example: 0..N images and/or a video
    a row, any-res tiles) and their batches keep `crops` and `media` as lists of rows;
    `batch_map` (e.g. the trainer's MediaLayout builder) then maps every batch.
    """
    check_pipeline(template, seq_len, batch_size, packing)
    examples = encoded_source(
        source, kind=kind, seed=seed, shuffle=shuffle, num_epochs=num_epochs, stats=stats,
        tokenizer=tokenizer, template=template, seq_len=seq_len, image_size=image_size,
        image_tokens=image_tokens, max_images=max_images, image_mode=image_mode, media=media)
    return batch_examples(
        examples, packable=kind in PACKABLE_KINDS, tokenizer=tokenizer, seq_len=seq_len,
        image_tokens=image_tokens, max_images=max_images, batch_size=batch_size, rows=rows,
        read_options=read_options, worker_count=worker_count, packing=packing,
        max_skip_fraction=max_skip_fraction, min_skip_records=min_skip_records,
        max_crops=media.max_crops if media is not None else 0, batch_map=batch_map)


def check_pipeline(template: str, seq_len: int, batch_size: int, packing: str) -> None:
    """Fails with a message naming an unknown template or packing mode, or a bad size."""
    get_template(template)
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if packing not in PACKING_MODES:
        raise ValueError(f"unknown packing {packing!r}; valid: {list(PACKING_MODES)}")


def encoded_source(
    source: Sequence[dict[str, Any]], *, kind: str, seed: int, shuffle: bool = True,
    num_epochs: int | None = None, stats: SkipStats | None = None, **encode_kwargs: Any,
) -> grain.MapDataset:
    """The example stream of `source`: its records shuffled by `seed` (reshuffled every epoch),
    repeated `num_epochs` times (None: forever), each encoded as `kind` (`encode_kwargs` go to
    encode_example) or, when bad, a `Skipped` marker counted in `stats`. Random access: a
    position is encoded only when it is read."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; valid kinds: {list(KINDS)}")
    ds = grain.MapDataset.source(ReadableSource(source))
    if len(ds) == 0:
        raise ValueError(f"{source!r} holds no records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs).map(EncodeRecord(stats, kind=kind, **encode_kwargs))


def batch_examples(
    examples: grain.MapDataset, *, packable: bool, tokenizer: TextTokenizer, seq_len: int,
    image_tokens: int, max_images: int, batch_size: int, rows: Sequence[int] | None = None,
    read_options: grain.ReadOptions | None = None, worker_count: int = 0, packing: str = "none",
    max_skip_fraction: float | None = 0.5, min_skip_records: int = 1000, max_crops: int = 0,
    batch_map: grain.transforms.Map | None = None,
) -> grain.IterDataset:
    """The example stream (encoded examples and `Skipped` markers) -> this process's `rows` of
    every global batch of `batch_size` rows (lanes.py): in each row's lane the markers are
    dropped and counted in the iterator state (skips.DropSkipped; one skip budget over the
    lanes), and rows are packed when `packing` asks and the examples are `packable` (flat
    examples: at most `max_crops` crops a row); each batch goes through `batch_map`; made in
    `worker_count` processes."""
    num_lanes = batch_size if rows is None else len(rows)
    options = reader_options(read_options, worker_count, num_lanes)

    def make_lane(lane: grain.MapDataset) -> grain.IterDataset:
        # A lane holds the budget too: one that reads only bad records never yields a row.
        it = DropSkipped(lane.to_iter_dataset(options), max_skip_fraction, min_skip_records)
        if packing == "first_fit" and packable:
            it = pack_first_fit(it, seq_len=seq_len, max_images=max_images,
                                image_id=tokenizer.image_id, image_tokens=image_tokens,
                                num_bins=LANE_PACKING_BINS, max_crops=max_crops)
        return it

    batches = lane_batches(examples, batch_size=batch_size, rows=rows, make_lane=make_lane,
                           max_skip_fraction=max_skip_fraction,
                           min_skip_records=min_skip_records)
    if batch_map is not None:
        batches = batches.map(batch_map)
    return with_workers(batches, worker_count)


def reader_options(read_options: grain.ReadOptions | None, worker_count: int,
                   num_lanes: int) -> grain.ReadOptions:
    """`read_options` for each lane, or reader threads sized to the cores across the lanes: one
    a lane (each lane reads on its own), none in worker processes, which are the parallelism
    there. More only contend for the GIL and the cores: on 2 cores grain's 16 threads read at
    about half the speed of 2."""
    if read_options is not None:
        return read_options
    if worker_count > 0 or num_lanes > 4 * (os.cpu_count() or 1):
        return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


def with_workers(batches: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """`batches` made in `worker_count` processes (0: in this one); deterministic, checkpointable.

    Worker i reads positions i::worker_count of every lane, so it makes the batches of steps i,
    i + worker_count, ..., and batches come round-robin from the workers: without skips or
    packing that is the in-process order; with them, a lane's rows depend on worker_count (a
    resume must keep it). Workers are spawned and get a pickled
    copy of the pipeline (tokenizers reload by path); their SkipStats stay in the workers, so the
    caller's `stats` count nothing then.
    """
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if worker_count == 0:
        return batches
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library user never parses them
        flags.FLAGS.mark_as_parsed()
    if worker_count == 1 and hasattr(batches, "enable_shared_memory_output"):
        # Grain stacks batches straight into shared memory only for 2+ workers; with one, each
        # batch was stacked, then copied into fresh shared memory (~4 ms a batch of 8 336px
        # images here, most of it first-touch page faults): bench/results/data_loader.txt.
        batches.enable_shared_memory_output()
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def demo_tokenizer(cache_dir: str | os.PathLike) -> TextTokenizer:
    """The demo's SentencePiece model, trained once on the synthetic corpus and template words.

    Training is deterministic; the model is cached as `cache_dir/demo_tokenizer_v2.model`. The
    templates' special markers are single tokens, so rendered chats never need <unk>.
    """
    path = Path(cache_dir) / f"{_DEMO_TOKENIZER}.model"
    if not path.is_file():
        tmp_prefix = Path(cache_dir) / f".{_DEMO_TOKENIZER}.{os.getpid()}.{threading.get_ident()}"
        # The same path as `lvlm data train-tokenizer`: corpus + template texts, markers as pieces.
        model = train_chat_tokenizer(
            SyntheticShapes(seed=0).corpus(500), str(tmp_prefix), DEMO_VOCAB_SIZE)
        os.replace(model, path)  # atomic: concurrent trainers write the same model
        Path(f"{tmp_prefix}.vocab").unlink(missing_ok=True)
    return open_tokenizer(str(path))
