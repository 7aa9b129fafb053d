"""A request to stop training early and cleanly: save a checkpoint at the next step boundary, then return.

Schedulers warn before they take the machines away: Slurm sends a signal `signal_delay_s` before the time
limit or on preemption, Kubernetes sends SIGTERM before killing a pod. The signal handler only sets a flag,
because a checkpoint is a collective save that every rank must enter together; the trainer folds the flag
into the loss all-reduce it already does each step, so all ranks see the request at the same step without
an extra collective.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None  # the signal that asked, if one did

    def set(self, signum: int | None = None, _frame: object = None) -> None:
        """The first request wins: a scheduler that warns (SIGUSR2) and then terminates (SIGTERM) asked for
        what its first signal means."""
        if not self._event.is_set():
            self.signal = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextmanager
    def on_signals(self, signals: Sequence[int]) -> Iterator[StopRequest]:
        """Sets this request on any of `signals` while the block runs; the previous handlers come back
        after it (so a launcher can still requeue through its own handler once the checkpoint is saved)."""
        previous = {s: signal.signal(s, self.set) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
