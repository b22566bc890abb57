"""Preemption: SIGTERM asks the training loop to checkpoint and stop, at the same step on every
process of a multi-host run."""

from __future__ import annotations

import signal
import threading


def _sync_manager_running() -> bool:
    """Whether jax.distributed started its preemption sync manager (it does in `initialize`):
    that manager owns SIGTERM then, in C++, and agrees on a step with the other processes."""
    try:
        from jax._src import distributed
    except ImportError:  # pragma: no cover - a jax without the private module
        return False
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopFlag:
    """While entered, SIGTERM makes `should_stop(step)` True at some step; the loop saves a
    checkpoint at that step and stops.

    One process: a Python handler (installed only from the main thread, which is the only one
    Python allows; the previous handler comes back on exit). Several processes: a process that
    stopped on its own would leave the others waiting in the step's collectives, or saving a
    different step. So jax's preemption sync point decides instead: a SIGTERM to any process
    (caught by jax.distributed's notifier) makes every process stop at the same later step.
    Every process must then call `should_stop` once per step, in increasing step order.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._agreed = False
        self._answered: tuple[int, bool] | None = None

    def __enter__(self):
        import jax

        self._agreed = jax.process_count() > 1 and _sync_manager_running()
        # A Python handler would replace the notifier's and leave the other processes waiting.
        if not self._agreed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (the same answer on every process)."""
        if self.requested or not self._agreed:
            return self.requested
        if self._answered is not None and self._answered[0] == step:
            return self._answered[1]
        from jax.experimental import multihost_utils

        self.requested = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        self._answered = (int(step), self.requested)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
