"""Weighted mixtures of record sources, each encoded as its own kind, mixed by grain.

A mixture is `((SPEC, WEIGHT), ...)`; SPEC is `synthetic[:KIND]`, `arrayrecord:DIR` (alias
`path:DIR`) or `tfds:NAME[/CONFIG][:VERSION]`. Every source is read, shuffled and encoded on its own
(caption records with the plain template, conversations with the chat template), then grain's
`MapDataset.mix` interleaves the encoded examples in proportion to the weights. The result is a
MapDataset up to the batching, so it is deterministic and its iterator state checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grain

from data_pipelines.loader import (
    KINDS,
    PACKABLE_KINDS,
    SkipStats,
    SyntheticSource,
    batch_examples,
    check_pipeline,
    encoded_source,
)

SOURCES = ("synthetic", "arrayrecord", "tfds")
_ALIASES = {"path": "arrayrecord"}


@dataclass(frozen=True)
class MixtureEntry:
    """One parsed `(SPEC, WEIGHT)` pair."""

    source: str  # synthetic | arrayrecord | tfds
    arg: str  # the kind, the directory or the TFDS name ("" for a bare "synthetic")
    weight: float

    @property
    def spec(self) -> str:
        return f"{self.source}:{self.arg}" if self.arg else self.source


def parse_mixture(mixture: Sequence[Sequence[Any]]) -> list[MixtureEntry]:
    """Checks `((SPEC, WEIGHT), ...)`; returns every entry, zero weights included."""
    entries = []
    for item in mixture:
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
            raise ValueError(f"data.mixture entries are (SPEC, WEIGHT) pairs, got {item!r}")
        spec, weight = item
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"data.mixture: SPEC must be a non-empty string, got {spec!r}")
        source, _, arg = spec.partition(":")
        source = _ALIASES.get(source, source)
        if source not in SOURCES:
            raise ValueError(f"data.mixture: {spec!r} names no source; use one of "
                             "synthetic[:KIND], arrayrecord:DIR (or path:DIR), tfds:NAME")
        if source != "synthetic" and not arg:
            what = "NAME" if source == "tfds" else "DIR"
            raise ValueError(f"data.mixture: {spec!r} needs a {what} after the colon")
        if source == "synthetic" and arg and arg not in KINDS:
            raise ValueError(f"data.mixture: {spec!r}: unknown kind {arg!r}; "
                             f"valid kinds: {list(KINDS)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                math.isfinite(weight) and weight >= 0):
            raise ValueError(f"data.mixture: the weight of {spec!r} must be a finite number "
                             f">= 0, got {weight!r}")
        entries.append(MixtureEntry(source, arg, float(weight)))
    if not any(e.weight > 0 for e in entries):
        raise ValueError(f"data.mixture needs an entry of weight > 0, got {tuple(mixture)!r}")
    return entries


def open_mixture(
    entries: Sequence[MixtureEntry], *, split: str, default_kind: str, num_examples: int,
    seed: int, image_size: int, tfds_dir: str = "", tfds_split: str = "train",
) -> list[tuple[Any, str, float]]:
    """(source, its record kind, weight) for every entry of weight > 0 (the others stay closed).

    Synthetic sources hold `num_examples` records; an ArrayRecord directory's kind comes from its
    metadata.json (else `default_kind`); a TFDS dataset's from its feature layout.
    """
    parts = []
    for e in entries:
        if e.weight == 0:
            continue
        try:
            if e.source == "synthetic":
                source = SyntheticSource(e.arg or default_kind, num_examples, seed=seed,
                                         image_size=image_size, split=split)
                kind = source.kind
            elif e.source == "arrayrecord":
                from data_pipelines.arrayrecord_source import ArrayRecordSource

                source = ArrayRecordSource(e.arg, split=split)
                kind = source.kind or default_kind
            else:
                from data_pipelines.tfds_source import TfdsSource

                source = TfdsSource(e.arg, split=tfds_split, data_dir=tfds_dir or None)
                kind = source.kind
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"data.mixture entry {e.spec!r}: {err}") from err
        parts.append((source, kind, e.weight))
    kinds = {kind for _, kind, _ in parts}
    if "preference" in kinds and len(kinds) > 1:
        others = sorted(kinds - {"preference"})
        raise ValueError(f"data.mixture mixes preference pairs with {others} records; their "
                         "examples have different fields")
    return parts


def mix(datasets: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
    """grain's weighted mix of `datasets`, without those of weight 0."""
    kept = [(ds, float(w)) for ds, w in zip(datasets, weights, strict=True) if w > 0]
    if not kept:
        raise ValueError(f"a mixture needs a weight > 0, got {list(weights)}")
    if len(kept) == 1:
        return kept[0][0]
    return grain.MapDataset.mix([ds for ds, _ in kept], [w for _, w in kept])


def make_mixture_dataset(
    parts: Sequence[tuple[Sequence[dict[str, Any]], str, float]],
    *,
    tokenizer: Any,
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
) -> grain.IterDataset:
    """`loader.make_dataset` over a weighted mixture of `(source, kind, weight)` parts.

    Source i is shuffled with seed `seed + i`, repeated
    `num_epochs` times (None: forever; with a number the mixture ends when its first source
    does) and encoded as `kind`; the mixed stream is dealt into lanes like make_dataset's, and
    this process gets its `rows`. Skipped records leave a gap in their lane, so the proportions
    hold for the records that encode; the skip counts and budget (one over the whole mixture),
    packing and workers are make_dataset's.
    """
    check_pipeline(template, seq_len, batch_size, packing)
    stats = stats if stats is not None else SkipStats()
    datasets, weights = [], []
    for i, (source, kind, weight) in enumerate(parts):
        try:
            datasets.append(encoded_source(
                source, kind=kind, seed=seed + i, shuffle=shuffle, num_epochs=num_epochs,
                stats=stats,
                tokenizer=tokenizer, template=template, seq_len=seq_len, image_size=image_size,
                image_tokens=image_tokens, max_images=max_images, image_mode=image_mode))
        except ValueError as e:
            raise ValueError(f"mixture source {source!r}: {e}") from e
        weights.append(weight)
    return batch_examples(
        mix(datasets, weights), packable=all(k in PACKABLE_KINDS for _, k, w in parts if w > 0),
        tokenizer=tokenizer, seq_len=seq_len, image_tokens=image_tokens, max_images=max_images,
        batch_size=batch_size, rows=rows, read_options=read_options, worker_count=worker_count,
        packing=packing, max_skip_fraction=max_skip_fraction, min_skip_records=min_skip_records)
