"""The training input pipeline: records -> templated, masked, fixed-length examples -> batches."""

from __future__ import annotations

import io
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
from PIL import Image

from data_pipelines.images import prepare_image
from data_pipelines.packing import MODES as PACKING_MODES
from data_pipelines.packing import pack_first_fit
from data_pipelines.skips import DropSkipped, Skipped
from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.templates import (
    IMAGE_MARK,
    TextTokenizer,
    get_template,
    render,
)
from data_pipelines.tokenizer import Tokenizer, train_chat_tokenizer

KINDS = ("caption", "conversation", "preference", "prompt")
DEMO_VOCAB_SIZE = 384  # an upper bound: the closed synthetic vocabulary needs fewer pieces
_DEMO_TOKENIZER = "demo_tokenizer_v1"  # bump when the corpus or the template words change
_KEPT_IDS = 100  # skipped ids remembered by SkipStats
# The loader's pixel limit: PIL's decompression-bomb threshold, the one `lvlm data convert`
# checks too.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


class BadRecord(ValueError):
    """A record that cannot become a training example; it is skipped and counted."""


def checked_image(image: Any, size: int, mode: str = "pad") -> np.ndarray:
    """prepare_image, or BadRecord for an image that cannot be read or has more than MAX_PIXELS
    pixels (read from the header first, so a decompression bomb is never decoded)."""
    try:
        if isinstance(image, bytes | bytearray | memoryview | str | Path):
            src = image if isinstance(image, str | Path) else io.BytesIO(bytes(image))
            with Image.open(src) as opened:
                width, height = opened.size
            if width * height > MAX_PIXELS:
                raise BadRecord(f"image too large: {width}x{height} is over {MAX_PIXELS} pixels")
        return prepare_image(image, size, mode)
    except Image.DecompressionBombError as e:  # PIL's own refusal, past twice its limit
        raise BadRecord(f"image too large: {e}") from e
    except FileNotFoundError as e:
        raise BadRecord(f"missing image: {e}") from e
    except (OSError, TypeError, ValueError) as e:
        if isinstance(e, BadRecord):
            raise
        raise BadRecord(f"unreadable image: {e!r}") from e


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
    images whose blocks were cut away are zeroed. A preference record gives a pair (see
    `encode_preference`).
    """
    if kind == "prompt":
        return encode_prompt(
            record, tokenizer=tokenizer, template=template, seq_len=seq_len,
            image_size=image_size, image_tokens=image_tokens, max_images=max_images,
            image_mode=image_mode)
    if kind == "preference":
        return encode_preference(
            record, tokenizer=tokenizer, template=template, seq_len=seq_len,
            image_size=image_size, image_tokens=image_tokens, max_images=max_images,
            image_mode=image_mode)
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
        prepared = checked_image(image, image_size, image_mode)
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


PAIR_SIDES = ("chosen", "rejected")
_PAIR_TEXT = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def preference_spec(seq_len: int, image_size: int, max_images: int = 1) -> dict[str, tuple]:
    """Fields of one preference example: chosen_* and rejected_* text fields, shared pixels."""
    spec = example_spec(seq_len, image_size, max_images)
    out = {f"{side}_{name}": spec[name] for side in PAIR_SIDES for name in _PAIR_TEXT}
    out["pixel_values"] = spec["pixel_values"]
    return out


def encode_preference(
    record: dict[str, Any], *, tokenizer: TextTokenizer, template: str, seq_len: int,
    image_size: int, image_tokens: int, max_images: int = 1, image_mode: str = "pad",
) -> dict[str, np.ndarray]:
    """`{id, images, prompt, chosen, rejected}` -> a pair of examples (see `preference_spec`).

    Each side is the prompt as the user turn and its response as the assistant turn, encoded
    like a conversation: the loss mask covers the response (and its end-of-turn) only. Both
    sides share the prompt, the images and so `pixel_values`. Never packed: a pair is compared
    row by row.
    """
    try:
        prompt = record["prompt"]
        replies = {side: record[side] for side in PAIR_SIDES}
        if not all(isinstance(t, str) for t in (prompt, *replies.values())):
            raise TypeError("prompt, chosen and rejected must be strings")
    except (KeyError, TypeError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    images = record.get("images")
    if images is None:
        images = [record["image"]] if record.get("image") is not None else []
    out: dict[str, np.ndarray] = {}
    for side, reply in replies.items():
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        example = encode_example(
            {"images": images, "conversations": turns}, kind="conversation",
            tokenizer=tokenizer, template=template, seq_len=seq_len, image_size=image_size,
            image_tokens=image_tokens, max_images=max_images, image_mode=image_mode)
        for name in _PAIR_TEXT:
            out[f"{side}_{name}"] = example[name]
        # Images precede both replies, so both sides keep the same ones.
        out.setdefault("pixel_values", example["pixel_values"])
    return out


def prompt_spec(seq_len: int, image_size: int, max_images: int = 1) -> dict[str, tuple]:
    """Fields of one rollout prompt: the prompt left-padded to seq_len (for generation), its
    segment ids, the images, and the reference answer's ids right-padded (all pad when none)."""
    spec = example_spec(seq_len, image_size, max_images)
    return {"prompt_ids": spec["input_ids"], "prompt_segment_ids": spec["segment_ids"],
            "pixel_values": spec["pixel_values"], "reference_ids": spec["input_ids"]}


def encode_prompt(
    record: dict[str, Any], *, tokenizer: TextTokenizer, template: str, seq_len: int,
    image_size: int, image_tokens: int, max_images: int = 1, image_mode: str = "pad",
) -> dict[str, np.ndarray]:
    """`{id, images, prompt, [reference]}` -> a prompt for sampling (see `prompt_spec`): the
    user turn then the assistant prefix. A prompt that does not fit is skipped, never cut."""
    try:
        prompt, reference = record["prompt"], record.get("reference") or ""
        if not isinstance(prompt, str) or not isinstance(reference, str):
            raise TypeError("prompt and reference must be strings")
        ids, _ = render(template, [{"from": "human", "value": prompt}], tokenizer, image_tokens,
                        add_generation_prompt=True)
    except (KeyError, TypeError, ValueError) as e:
        raise BadRecord(f"malformed record: {e!r}") from e
    images = record.get("images")
    if images is None:
        images = [record["image"]] if record.get("image") is not None else []
    if len(np.flatnonzero(ids == tokenizer.image_id)) != len(images) * image_tokens:
        raise BadRecord(f"wrong image count: {prompt.count(IMAGE_MARK)} {IMAGE_MARK} marks for "
                        f"{len(images)} images")
    if len(images) > max_images:
        raise BadRecord(f"too many images: {len(images)} > max_images={max_images}")
    ref = tokenizer.encode(reference)
    if len(ids) > seq_len or len(ref) > seq_len:
        raise BadRecord(f"prompt of {len(ids)} tokens or reference of {len(ref)} does not fit "
                        f"in seq_len={seq_len}")
    out = {name: np.zeros(shape, dtype)
           for name, (shape, dtype) in prompt_spec(seq_len, image_size, max_images).items()}
    pad = getattr(tokenizer, "pad_id", 0)
    out["prompt_ids"][:] = pad
    out["reference_ids"][:] = pad
    out["prompt_ids"][seq_len - len(ids):] = ids
    out["prompt_segment_ids"][seq_len - len(ids):] = 1
    out["reference_ids"][: len(ref)] = ref
    for j, image in enumerate(images):
        try:
            out["pixel_values"][j] = prepare_image(image, image_size, image_mode)
        except (OSError, TypeError, ValueError) as e:
            raise BadRecord(f"unreadable image: {e!r}") from e
    return out


def vqa_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """A SyntheticShapes.vqa question -> a rollout prompt whose reference is its answer."""
    return {"id": record["id"], "images": [record["image"]],
            "prompt": f"{IMAGE_MARK}\n{record['question']}", "reference": record["answer"]}


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
    and becomes None, or with `markers` a `Skipped` marker (for skips.DropSkipped, which counts
    it in the iterator state)."""

    def __init__(self, stats: SkipStats | None = None, markers: bool = False,
                 **encode_kwargs: Any):
        self.stats = stats if stats is not None else SkipStats()
        self.markers = markers
        self.kwargs = encode_kwargs

    def map(self, record: dict[str, Any] | Skipped) -> dict[str, np.ndarray] | Skipped | None:
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
        return skipped if self.markers else None


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
    shard_index: int = 0,
    shard_count: int = 1,
    image_mode: str = "pad",
    max_skip_fraction: float | None = 0.5,
    stats: SkipStats | None = None,
    read_options: grain.ReadOptions | None = None,
    worker_count: int = 0,
    packing: str = "none",
    min_skip_records: int = 1000,
) -> grain.IterDataset:
    """A deterministic, checkpointable grain pipeline of batches (dicts of stacked numpy arrays).

    This process reads records `shard_index::shard_count`, shuffled by `seed` (reshuffled every
    epoch), for `num_epochs` epochs (None: forever). Caption records use the `plain` template and
    conversation records `template`. Bad records are skipped, logged with their id and counted
    (in `stats`, and in the iterator state: skips.skip_counts); iteration fails once more than
    `max_skip_fraction` of the records read were skipped (after `min_skip_records` reads). With
    `packing="first_fit"` a row holds several samples (see packing.py; preference pairs are never
    packed). The last partial batch is dropped. `worker_count` > 0 runs the pipeline in that
    many processes (see `with_workers`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; valid kinds: {list(KINDS)}")
    get_template(template)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if packing not in PACKING_MODES:
        raise ValueError(f"unknown packing {packing!r}; valid: {list(PACKING_MODES)}")
    ds = grain.MapDataset.source(ReadableSource(source))[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} of {len(source)} records is empty")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    encode = EncodeRecord(
        stats,
        markers=True,
        kind=kind,
        tokenizer=tokenizer,
        template=template,
        seq_len=seq_len,
        image_size=image_size,
        image_tokens=image_tokens,
        max_images=max_images,
        image_mode=image_mode,
    )
    it = DropSkipped(ds.map(encode).to_iter_dataset(
        reader_options(read_options, worker_count, batch_size)), max_skip_fraction,
        min_skip_records)
    if packing == "first_fit" and kind in ("caption", "conversation"):
        # As many open rows as a batch has: a flush of full rows then fills about one batch.
        it = pack_first_fit(it, seq_len=seq_len, max_images=max_images,
                            image_id=tokenizer.image_id, image_tokens=image_tokens,
                            num_bins=batch_size)
    return with_workers(it.batch(batch_size, drop_remainder=True), worker_count)


def reader_options(read_options: grain.ReadOptions | None, worker_count: int,
                   batch_size: int) -> grain.ReadOptions | None:
    """`read_options`, or with workers one reader thread each: grain's default of 16 threads and
    500 records in flight per worker process only contend for the GIL and the cores."""
    if read_options is None and worker_count > 0:
        return grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size)
    return read_options


def with_workers(batches: grain.IterDataset, worker_count: int) -> grain.IterDataset:
    """`batches` made in `worker_count` processes (0: in this one); deterministic, checkpointable.

    Worker i batches records i::worker_count and batches come round-robin from the workers, so the
    order depends on worker_count (a resume must keep it). Workers are spawned and get a pickled
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
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def demo_tokenizer(cache_dir: str | os.PathLike) -> Tokenizer:
    """The demo's SentencePiece model, trained once on the synthetic corpus and template words.

    Training is deterministic; the model is cached as `cache_dir/demo_tokenizer_v1.model`. The
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
    return Tokenizer(str(path))
