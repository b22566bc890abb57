"""Profiling a window of training steps with jax.profiler (TensorBoard / Perfetto read it)."""

from __future__ import annotations

from typing import Any

import jax


def check_profile_steps(steps: Any) -> tuple[int, int] | None:
    """train.profile_steps -> (first, last), 1-based and inclusive; None when empty."""
    if not steps:
        return None
    if (len(steps) != 2 or not all(isinstance(s, int) for s in steps)
            or not 1 <= steps[0] <= steps[1]):
        raise ValueError("train.profile_steps must be [first, last] steps with "
                         f"1 <= first <= last, got {list(steps)}")
    return int(steps[0]), int(steps[1])


class Profiler:
    """A jax.profiler trace of the steps in a window, written to `directory` (None: no trace)."""

    def __init__(self, steps: Any, directory: str | None):
        self.window = check_profile_steps(steps) if directory else None
        self.directory = directory
        self.active = False

    def __enter__(self):
        return self

    def before(self, step: int) -> None:
        if self.window and not self.active and self.window[0] <= step <= self.window[1]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, state: Any) -> None:
        if self.active and step >= self.window[1]:
            jax.block_until_ready(state)  # the last step's device work belongs in the trace
            self.__exit__()

    def __exit__(self, *exc):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
