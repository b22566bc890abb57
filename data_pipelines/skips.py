"""Bad records in a running pipeline: dropped, counted in the iterator state, and held to a budget.

The encoder turns a bad record into a `Skipped` marker instead of an example. `DropSkipped` drops
the markers and keeps the counts (records read, records skipped) in its iterator state, so they
are checkpointed with it, resume where they were, and reach the main process from grain worker
processes (whose states travel with every element). `skip_counts` reads them back out of the
state of a whole pipeline. When more than `max_fraction` of the records read were skipped (once
at least `min_records` were read), iteration fails with a message naming both figures; with
grain worker processes each worker holds the budget over its own share of the records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import grain

STATE_KEY = "skip_counts"  # where the counts sit in an iterator's state


class Skipped(NamedTuple):
    """What the encoder returns for a record that cannot become an example."""

    record_id: str
    reason: str


class SkipBudgetError(ValueError):
    """More records were skipped than `data.max_skip_fraction` allows."""


def skip_counts(state: Any) -> tuple[int, int]:
    """(records read, records skipped) summed over every counter in an iterator state (one per
    grain worker process, or one)."""
    read = skipped = 0
    if isinstance(state, Mapping):
        for key, value in state.items():
            if key == STATE_KEY and isinstance(value, Mapping):
                read += int(value["read"])
                skipped += int(value["skipped"])
            else:
                r, s = skip_counts(value)
                read, skipped = read + r, skipped + s
    elif isinstance(state, list | tuple):
        for value in state:
            r, s = skip_counts(value)
            read, skipped = read + r, skipped + s
    return read, skipped


def has_skip_counts(state: Any) -> bool:
    """Whether an iterator state holds skip counters (a pipeline with DropSkipped in it)."""
    if isinstance(state, Mapping):
        return STATE_KEY in state or any(has_skip_counts(v) for v in state.values())
    if isinstance(state, list | tuple):
        return any(has_skip_counts(v) for v in state)
    return False


def budget_message(read: int, skipped: int, max_fraction: float) -> str:
    return (f"the input skipped {100 * skipped / read:.2f} % of the records read ({skipped} of "
            f"{read}), over the budget data.max_skip_fraction={max_fraction:g}; the ids and "
            "reasons are in the log's 'skipping record' warnings. Fix or drop the bad records, "
            "or raise data.max_skip_fraction")


class _DropSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_fraction: float | None,
                 min_records: int):
        super().__init__(parent)
        self._max_fraction = max_fraction
        self._min_records = min_records
        self._read = self._skipped = 0

    def _check(self) -> None:
        if (self._max_fraction is not None and self._read >= self._min_records
                and self._skipped > self._max_fraction * self._read):
            raise SkipBudgetError(budget_message(self._read, self._skipped, self._max_fraction))

    def __next__(self) -> Any:
        while True:
            element = next(self._parent)
            self._read += 1
            if isinstance(element, Skipped):
                self._skipped += 1
                self._check()
                continue
            self._check()
            return element

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                STATE_KEY: {"read": self._read, "skipped": self._skipped}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._read = int(state[STATE_KEY]["read"])
        self._skipped = int(state[STATE_KEY]["skipped"])


class DropSkipped(grain.IterDataset):
    """Drops `Skipped` markers, counting them (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, max_fraction: float | None = 0.05,
                 min_records: int = 200):
        super().__init__(parent)
        if max_fraction is not None and not 0 <= max_fraction <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1] or None, got {max_fraction}")
        self._max_fraction = max_fraction
        self._min_records = int(min_records)

    def __iter__(self) -> grain.DatasetIterator:
        return _DropSkippedIterator(self._parent.__iter__(), self._max_fraction,
                                    self._min_records)

    def __str__(self) -> str:
        return f"DropSkipped(max_fraction={self._max_fraction}, min_records={self._min_records})"
