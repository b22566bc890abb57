"""Progress of a loop (training steps, eval examples): a tqdm bar on a terminal, a plain line
every tenth of the total in a log."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol


class Progress(Protocol):
    """What a loop calls on a progress display; tqdm and PlainProgress both provide it."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, **values: Any) -> Any: ...

    def close(self) -> Any: ...


def progress(total: int, initial: int = 0, desc: str = "", file: IO[str] | None = None,
             percent: int = 10, unit: str = "steps") -> Progress:
    """A tqdm bar when `file` (default: stderr, where tqdm writes) is a terminal, else a
    PlainProgress that writes a line every `percent`% of `total`."""
    stream = sys.stderr if file is None else file
    if _is_tty(stream):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True,
                    unit=unit.rstrip("s") or "it")
    return PlainProgress(total, initial, desc, stream, percent, unit=unit)


def _is_tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class PlainProgress:
    """Progress for files and CI logs: tqdm's carriage returns would turn a whole run into one
    enormous line there. Writes e.g. `sft: 160/800 steps (20%), 4.9 it/s, loss 0.3412, eta 2m10s`
    each time the count passes another `percent`% of `total`, and at the end."""

    def __init__(self, total: int, initial: int = 0, desc: str = "",
                 file: IO[str] | None = None, percent: int = 10,
                 clock: Callable[[], float] = time.perf_counter, unit: str = "steps"):
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], got {percent}")
        self.total, self.n, self.desc = max(int(total), 0), int(initial), desc
        self.percent, self.unit = percent, unit
        self._file = sys.stderr if file is None else file
        self._clock = clock
        self._initial, self._start = self.n, clock()
        self._first: tuple[int, float] | None = None
        self._printed_n = self.n  # nothing to report until a step is done
        self._postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = self._clock()
        if self._first is None:
            self._first = (self.n, now)
        # Milestones are fractions of the whole run, so a resumed run keeps the same percentages.
        if self._bucket(self.n) > self._bucket(before) or (self.n >= self.total > before):
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line; set them before the `update` that may write."""
        self._postfix = dict(values)

    def close(self) -> None:
        """Writes the last count when the run stopped between milestones (an early stop)."""
        if self.n != self._printed_n:
            self._write(self._clock())

    def _line(self, now: float) -> str:
        parts = [f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total} {self.unit}"
                 + (f" ({100 * self.n // self.total}%)" if self.total else "")]
        rate = self._rate(now)
        if rate is not None:
            parts.append(f"{rate:.3g} it/s" if rate < 100 else f"{rate:.0f} it/s")
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        if self.n < self.total and rate:
            parts.append(f"eta {format_seconds((self.total - self.n) / rate)}")
        elif self.n >= self.total:
            parts.append(f"took {format_seconds(now - self._start)}")
        return ", ".join(parts)

    def _bucket(self, n: int) -> int:
        return n * 100 // (self.total * self.percent) if self.total else 0

    def _rate(self, now: float) -> float | None:
        # From the first step on: the time before it (compiling the step) is not a training speed.
        n0, t0 = self._first if self._first and self.n > self._first[0] else (self._initial,
                                                                               self._start)
        return (self.n - n0) / (now - t0) if now > t0 and self.n > n0 else None

    def _write(self, now: float) -> None:
        # Logs usually take stdout and stderr together; flushing stdout first keeps the run's own
        # printed lines ahead of this one, as they happened.
        if self._file is not sys.stdout:
            sys.stdout.flush()
        self._file.write(self._line(now) + "\n")
        self._file.flush()
        self._printed_n = self.n


def format_seconds(seconds: float) -> str:
    """12s, 2m10s, 1h02m."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
