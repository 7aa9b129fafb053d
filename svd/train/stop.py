"""A request to stop training early and cleanly: save a checkpoint at the next step boundary, then return.

Schedulers warn before they take the machines away: Slurm sends a signal `signal_delay_s` before the time
limit or on preemption, Kubernetes sends SIGTERM before killing a pod, a user presses Ctrl-C. The signal
handler only sets a flag, because a checkpoint is a collective save that every rank must enter together; the
trainer folds the flag into the loss all-reduce it already does each step, so all ranks see the request at the
same step without an extra collective.

Who asks depends on who gets the signal:
- every rank listens itself (`StopRequest.on_signals`): Slurm signals every process of the job step, and a
  terminal's Ctrl-C reaches its whole foreground process group;
- the process a user or a scheduler addresses passes the request on to the ranks (`interruptible`): the
  rank itself in a one-rank run, torch's elastic agent of a multi-rank local run, the Ray driver. Kubernetes
  signals only a container's main process, `ray job stop` only the entrypoint's processes;
- a request that arrives by other means is polled once per step (`StopRequest(poll=…)`): a flag the elastic
  agent sets for its ranks, Ray Train's notice that a node of the run is being drained for preemption.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

# What a user or a scheduler sends to stop a run: Kubernetes, Slurm's scancel and `ray job stop` send SIGTERM,
# a terminal SIGINT. (Slurm's warning before a time limit, SIGUSR2, is the Slurm launcher's own.)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The exit status of a run stopped by a signal after saving its last step, as a shell reports Ctrl-C (curation
# exits with it too): not 0, since the run is not done, and not 1, since nothing failed.
STOPPED_STATUS = 130


class StopRequest:
    def __init__(self, poll: Callable[[], str | None] | None = None) -> None:
        """`poll`: another source of requests, asked at every `is_set()`; it returns why to stop, or None."""
        self._event = threading.Event()
        self._poll = poll
        self.signal: int | None = None  # the signal that asked, if one did
        self.reason: str | None = None  # what asked, for the launcher's last line

    def set(self, signum: int | None = None, _frame: object = None, *, reason: str | None = None) -> None:
        """The first request wins: a scheduler that warns (SIGUSR2) and then terminates (SIGTERM) asked for
        what its first signal means."""
        if not self._event.is_set():
            self.signal = signum
            self.reason = reason or (signal.Signals(signum).name if signum else "a stop request")
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked. The trainer asks once per step on every rank, at the same point (it folds
        the answer into the step's loss all-reduce), and `poll` runs at every call, even after a request: so a
        poll may itself be a collective of the ranks (Ray Train's preemption notice is one)."""
        if self._poll is not None and (reason := self._poll()):
            self.set(reason=reason)
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


@dataclass
class Interruption:
    """What `interruptible` received: the first stop signal, if any."""

    signal: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


@contextmanager
def interruptible(
    stop_ranks: Callable[[int], None], quit_now: Callable[[], None] = lambda: None, *, prefix: str = "launch"
) -> Iterator[Interruption]:
    """In the process a user or a scheduler signals (the main thread), while the block runs: the first SIGTERM
    or SIGINT calls `stop_ranks(signum)`, which asks the ranks to save the step under way and return, and says
    so in one line; a SIGINT after that (a second Ctrl-C) calls `quit_now()` (end the ranks) and exits at once
    with status 130, in one line, saving nothing more. A repeated SIGTERM changes nothing: a scheduler that
    repeats itself still wants the checkpoint. The handlers write with os.write: a print could land inside
    the main thread's own print, which Python refuses (a reentrant call)."""
    seen = Interruption()

    def handle(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if seen.signal is None:
            seen.signal = signum
            _say(
                f"{prefix}: {name}: saving the step under way, then stopping (Ctrl-C again: quit without it)"
            )
            stop_ranks(signum)
        elif signum == signal.SIGINT:
            _say(f"{prefix}: {name} again: quitting without saving the step under way")
            quit_now()
            os._exit(STOPPED_STATUS)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield seen
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stopped_line(step: int, run_dir: str, reason: str) -> str:
    """The last line of a run a stop request ended."""
    return f"stopped by {reason} after step {step}, saved in {run_dir}; rerun the same command to continue"


def _say(line: str) -> None:
    os.write(2, (line + "\n").encode())
