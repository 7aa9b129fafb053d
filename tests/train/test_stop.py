"""Stop requests: what sets them, and the process that a user or a scheduler signals (`interruptible`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from svd.train.stop import STOPPED_STATUS, StopRequest

ROOT = Path(__file__).resolve().parents[2]


def test_a_poll_runs_at_every_check_even_after_a_request_so_that_it_may_be_a_collective():
    answers = iter([None, "the preemption of ranks [1]", None])
    calls = []

    def poll() -> str | None:
        calls.append(1)
        return next(answers)

    stop = StopRequest(poll=poll)
    assert not stop.is_set()
    assert stop.is_set()
    assert stop.is_set()  # a later poll that says nothing does not take the request back
    assert len(calls) == 3  # every rank asks as often as the others, whatever it saw
    assert (stop.reason, stop.signal) == ("the preemption of ranks [1]", None)


def test_the_signalled_process_stops_its_ranks_once_and_a_second_ctrl_c_quits_at_once():
    """A repeated SIGTERM (a scheduler repeating itself) still waits for the save; then SIGINT quits."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from svd.train.stop import interruptible

        def stop_ranks(signum):
            print("stop ranks", signum, flush=True)

        with interruptible(stop_ranks, lambda: print("quit", flush=True)) as seen:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("still saving after", seen.name, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        print("never printed")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == STOPPED_STATUS == 130
    assert done.stdout.splitlines() == [f"stop ranks {15}", "still saving after SIGTERM", "quit"]
    assert done.stderr.splitlines() == [
        "launch: SIGTERM: saving the step under way, then stopping (Ctrl-C again: quit without it)",
        "launch: SIGINT again: quitting without saving the step under way",
    ]
