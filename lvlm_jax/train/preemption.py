"""Preemption: SIGTERM asks the training loop to checkpoint and stop at the next step."""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """Set by SIGTERM while entered; the loop saves a checkpoint and stops at the next step.

    The handler is installed only from the main thread (Python allows no other) and the previous
    one is restored on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
