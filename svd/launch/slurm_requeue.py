"""Requeue bookkeeping of a Slurm job: how often it crashed, and a requeue that any rank may ask for.

`SLURM_RESTART_COUNT` counts every requeue: a time limit and a preemption as well as a crash. A long run that
was requeued for its time limit ten times would give up at its first real crash if crashes were read from it.
So each crash is written down, as one file per run of the job (`<folder>/<job id>_crashes/<restart count>`):
the ranks that crash in the same run of the job (several do when one rank's failure breaks the collectives of
the others) write the same file, so a run of the job counts once however many of its ranks fail, and time
limits and preemptions write nothing. The folder is the launcher's (`launcher.folder`, submitit's logs and
pickles, on a filesystem that every node shares), not the run directory: it is still there when the object
store is what failed, and a run that was refused its run directory writes nothing into it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path


class RequeueError(RuntimeError):
    """Slurm refused to requeue the job, and no other rank had requeued it either."""


class CrashLedger:
    """The runs of one Slurm job that crashed."""

    def __init__(self, folder: str | Path, job_id: str) -> None:
        self.folder = Path(folder) / f"{job_id}_crashes"

    def record(self, restart_count: int, error: str) -> int:
        """Notes that the run `restart_count` (its SLURM_RESTART_COUNT) of the job crashed with `error`;
        returns how many runs of the job crashed, this one included. Written to a file of this process, then
        renamed into place: ranks that record the same run at once replace one another's file whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f".{restart_count}.{socket.gethostname()}.{os.getpid()}"
        partial.write_text(error + "\n")
        os.replace(partial, self.folder / str(restart_count))
        return self.crashes()

    def crashes(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(1 for path in self.folder.iterdir() if path.name.isdigit())


def requeue_job(job_id: str, restart_count: int) -> None:
    """`scontrol requeue` of the job, from whichever rank asks (any task of a job may requeue it). When
    several ranks ask at once, Slurm requeues the job for the first and refuses the others ("Job is pending
    execution"): a refused rank finds the job's restart count already past its own run, which is success."""
    asked = scontrol("requeue", job_id)
    if asked.returncode == 0 or job_restarts(job_id) > restart_count:
        return
    raise RequeueError(f"scontrol requeue {job_id} failed: {asked.stderr.strip() or asked.stdout.strip()}")


def job_restarts(job_id: str) -> int:
    """How often Slurm has requeued the job so far (`Restarts=` of `scontrol show job`): raised as soon as a
    requeue is accepted, while the job still ends its current run."""
    shown = scontrol("show", "job", "--oneliner", job_id)
    found = re.search(r"\bRestarts=(\d+)", shown.stdout)
    if shown.returncode != 0 or found is None:
        raise RequeueError(
            f"scontrol show job {job_id} failed: {shown.stderr.strip() or shown.stdout.strip()}"
        )
    return int(found[1])


def scontrol(*args: str, tries: int = 3) -> subprocess.CompletedProcess:
    """`scontrol ARGS`, asked again when a signal ended it: once another rank's requeue is accepted, Slurm
    sends SIGTERM to every process of the job step, the scontrol that a crashed rank is running included,
    and only once (SIGKILL follows KillWait seconds later), so the next try gets its answer."""
    for _ in range(tries):
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
        if done.returncode >= 0:  # negative: the signal that ended it
            break
    return done
