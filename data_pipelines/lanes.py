"""Global batches that do not depend on the topology: row r of every global batch comes from lane r.

The encoded example stream (every record, shuffled by the seed and reshuffled every epoch, or a
weighted mixture of such streams) is dealt into `batch_size` lanes: lane r holds the stream's
positions r, r + B, r + 2B, ... Row r of the global batch of step s is the s-th row that lane r
makes: its s-th example, or with packing its s-th packed row. A bad record is dropped from its own
lane only, and packing runs within a lane. So the global batch of step s is a function of the
dataset, the seed and s, whatever the number of processes or devices; each process reads only
the lanes of the rows its devices hold (`local_rows`), and a lane's iterator state means the same
thing in any process, which is what lets a checkpoint restore onto another number of processes
(`merge_lane_states`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines.media import FIELDS as RAGGED_FIELDS
from data_pipelines.skips import STATE_KEY, SkipBudgetError, budget_message, skip_counts

LANES_KEY = "lanes"  # where the per-row states sit in an iterator state


def local_rows(sharding: Any, batch_size: int) -> list[int]:
    """The rows of a global batch of `batch_size` rows that this process's devices hold under
    `sharding` (a jax Sharding of the batch arrays), in increasing order: the union of its
    addressable shards' index ranges along the leading axis."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return sorted(rows)


class _LaneBatchIterator(grain.DatasetIterator):
    def __init__(self, lanes: Sequence[grain.DatasetIterator], rows: Sequence[int],
                 max_skip_fraction: float | None, min_skip_records: int):
        super().__init__(list(lanes))
        self._rows = list(rows)
        self._max_fraction = max_skip_fraction
        self._min_records = min_skip_records

    def __next__(self) -> dict[str, np.ndarray]:
        elements = [next(lane) for lane in self._parents]
        if self._max_fraction is not None:
            # One budget over this process's lanes (a lane's own would trip on a local cluster).
            read, skipped = skip_counts([lane.get_state() for lane in self._parents])
            if read >= self._min_records and skipped > self._max_fraction * read:
                raise SkipBudgetError(budget_message(read, skipped, self._max_fraction))
        # A flat example's crops and media differ in length from row to row: a list of rows.
        return {k: [e[k] for e in elements] if k in RAGGED_FIELDS
                else np.stack([e[k] for e in elements]) for k in elements[0]}

    def get_state(self) -> dict[str, Any]:
        return {LANES_KEY: {str(r): lane.get_state()
                            for r, lane in zip(self._rows, self._parents, strict=True)}}

    def set_state(self, state: dict[str, Any]) -> None:
        lanes = state[LANES_KEY]
        missing = [r for r in self._rows if str(r) not in lanes]
        if missing:
            raise ValueError(f"the data-iterator state has no lanes for rows {missing[:8]} of "
                             f"this process (it holds rows {sorted(lanes, key=int)[:8]}...); "
                             "was it saved with another data.batch_size?")
        for r, lane in zip(self._rows, self._parents, strict=True):
            lane.set_state(lanes[str(r)])


class LaneBatches(grain.IterDataset):
    """Batches of one element from each lane dataset, in `rows` order (see the module
    docstring). Bad records are counted in the lanes (skips.DropSkipped) and held to one budget
    over all of them: more than `max_skip_fraction` of the records read, once `min_skip_records`
    were read, stops iteration."""

    def __init__(self, lanes: Sequence[grain.IterDataset], rows: Sequence[int],
                 max_skip_fraction: float | None = 0.5, min_skip_records: int = 1000):
        if len(lanes) != len(rows) or not lanes:
            raise ValueError(f"need one lane per row, got {len(lanes)} lanes for rows {rows}")
        super().__init__(list(lanes))
        self._rows = [int(r) for r in rows]
        self._max_fraction = max_skip_fraction
        self._min_records = int(min_skip_records)

    def __iter__(self) -> grain.DatasetIterator:
        return _LaneBatchIterator([p.__iter__() for p in self._parents], self._rows,
                                  self._max_fraction, self._min_records)

    def __str__(self) -> str:
        return f"LaneBatches(rows={self._rows[:4]}{'...' if len(self._rows) > 4 else ''})"


def lane_batches(examples: grain.MapDataset, *, batch_size: int, rows: Sequence[int] | None,
                 make_lane: Callable[[grain.MapDataset], grain.IterDataset],
                 max_skip_fraction: float | None, min_skip_records: int) -> LaneBatches:
    """Global batches of `batch_size` rows from the stream `examples`; this process gets `rows`
    (None: all). `make_lane` turns a lane's slice of the stream into its iterator of rows."""
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    rows = list(range(batch_size)) if rows is None else [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < batch_size]
    if bad or len(set(rows)) != len(rows):
        raise ValueError(f"rows must be distinct and in [0, {batch_size}), got {rows}")
    return LaneBatches([make_lane(examples[r::batch_size]) for r in rows], rows,
                       max_skip_fraction, min_skip_records)


def merge_lane_states(data_dir: str) -> dict[str, Any] | None:
    """The per-row lane states of every process's saved iterator state in `data_dir` (grain's
    `process_*-of-*.json` files), as one state any process can restore from; None when the
    files hold no lanes (worker processes, or an older layout)."""
    lanes: dict[str, Any] = {}
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("process_")
                   and n.endswith(".json"))
    for name in names:
        with open(os.path.join(data_dir, name)) as f:
            state = json.load(f)
        if not isinstance(state, dict) or LANES_KEY not in state:
            return None
        lanes.update(state[LANES_KEY])
    return {LANES_KEY: lanes} if lanes else None


def restore_lanes(iterator: Any, data_dir: str) -> bool:
    """Moves `iterator` to the lane states saved in `data_dir` by any number of processes;
    False (iterator untouched) when the files hold no lane states."""
    state = merge_lane_states(data_dir)
    if state is None or not hasattr(iterator, "set_state"):
        return False
    iterator.set_state(state)  # a row no file holds fails here, naming the rows
    return True


__all__ = ["LANES_KEY", "STATE_KEY", "LaneBatches", "lane_batches", "local_rows",
           "merge_lane_states", "restore_lanes"]

