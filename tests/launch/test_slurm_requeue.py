"""Requeue bookkeeping of a Slurm job's ranks, under submitit and a plain sbatch script, without a cluster:
the ranks run in this process with Slurm's environment, and a stand-in `scontrol` records what it is asked."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from svd.config import ConfigError, compose, to_yaml
from svd.launch import slurm
from svd.launch.slurm import CrashedTooOftenError, SlurmTraining, requeue_after_crash
from svd.launch.slurm_requeue import CrashLedger, RequeueError, requeue_job
from svd.train.lease import RUN_OWNER

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What Slurm's scontrol does here: requeue (refused, as for a job already being requeued, when REFUSE is set),
# show the job with its restart count (ended by SIGTERM the first time when TERM_ONCE names a file that is not
# there yet), expand a node list.
SCONTROL = """#!/bin/bash
echo "$*" >> "$SCONTROL_LOG"
case "$1" in
requeue)
    if [ -n "${SCONTROL_REFUSE:-}" ]; then echo "Job is pending execution for job $2" >&2; exit 1; fi ;;
show)
    if [ -n "${SCONTROL_TERM_ONCE:-}" ] && [ ! -e "$SCONTROL_TERM_ONCE" ]; then
        touch "$SCONTROL_TERM_ONCE"; kill -TERM $$
    fi
    if [ "$2" = hostnames ]; then echo n1; exit; fi
    echo "JobId=${*: -1} JobState=COMPLETING Restarts=$SCONTROL_RESTARTS" ;;
esac
"""


@pytest.fixture
def scontrol(tmp_path, monkeypatch) -> Path:
    """A stand-in scontrol first on PATH; returns the file where it writes each command line it gets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    log = tmp_path / "scontrol.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(log))
    monkeypatch.setenv("SCONTROL_RESTARTS", "0")
    return log


@pytest.fixture
def requeue_signal_caught() -> Iterator[list[int]]:
    """The requeue signal (submitit's handler on rank 0) recorded instead of ending this process."""
    caught: list[int] = []
    previous = signal.signal(slurm.REQUEUE_SIGNAL, lambda signum, _frame: caught.append(signum))
    yield caught
    signal.signal(slurm.REQUEUE_SIGNAL, previous)


def in_slurm_job(monkeypatch, *, rank: int, restarts: int, tasks: int = 2, job_id: str = "77") -> None:
    for key, value in {
        "SLURM_JOB_ID": job_id,
        "SLURM_RESTART_COUNT": str(restarts),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank),
        "SLURM_NTASKS": str(tasks),
        "SLURM_JOB_NUM_NODES": str(tasks),
        "SLURM_JOB_NODELIST": "n[1-2]" if tasks == 2 else "n1",
        "SLURMD_NODENAME": f"n{rank + 1}",
    }.items():
        monkeypatch.setenv(key, value)
    # What the rank exports (its rendezvous, its run owner) is undone after the test: a MASTER_PORT left in
    # this session's environment made later runs of the session bind the job's port, taken by then
    for key in (*RENDEZVOUS, "SUBMITIT_EXECUTOR", RUN_OWNER):
        monkeypatch.delenv(key, raising=False)


def run_config(tmp_path: Path, max_requeues: int = 3):
    return compose(
        [
            "model=tiny",
            "launcher=slurm",
            "nodes=2",
            "gpus_per_node=1",
            "data.table=s3://b/t.lance",
            f"launcher.folder={tmp_path / 'submitit'}",
            f"launcher.max_requeues={max_requeues}",
        ]
    )


def crash(error: Exception):
    def train_rank(cfg, stop):
        raise error

    return train_rank


def requeues(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")]


def test_a_configuration_error_fails_the_job_and_is_never_requeued(
    scontrol, requeue_signal_caught, tmp_path, monkeypatch
):
    in_slurm_job(monkeypatch, rank=0, restarts=0, tasks=1)  # one task where the run wants two

    with pytest.raises(ConfigError, match="the job has 1 tasks but the run wants nodes=2"):
        SlurmTraining(to_yaml(run_config(tmp_path)))()

    assert requeues(scontrol) == []
    assert requeue_signal_caught == []
    assert CrashLedger(tmp_path / "submitit", "77").crashes() == 0


def test_a_crash_on_a_rank_other_than_0_requeues_the_job_itself(
    scontrol, requeue_signal_caught, tmp_path, monkeypatch, capsys
):
    # Under NCCL's asynchronous error handling rank 0 is torn down without a Python exception: it never
    # requeues for rank 1.
    in_slurm_job(monkeypatch, rank=1, restarts=0)
    monkeypatch.setattr(slurm, "train_rank", crash(RuntimeError("CUDA error: an illegal memory access")))

    with pytest.raises(SystemExit) as left:
        SlurmTraining(to_yaml(run_config(tmp_path)))()

    assert left.value.code == 0
    assert requeues(scontrol) == ["requeue 77"]
    assert capsys.readouterr().out.splitlines() == [
        "svd: rank 1 crashed (RuntimeError: CUDA error: an illegal memory access); requeue 1 of 3",
        "svd: rank 1 leaves for the requeue",
    ]


def test_time_limit_requeues_do_not_count_as_crashes(scontrol, tmp_path, monkeypatch, capsys):
    # The plain sbatch path: five requeues for the time limit, then the run's first crash.
    in_slurm_job(monkeypatch, rank=0, restarts=5)
    monkeypatch.setattr(slurm, "train_rank", crash(OSError("connection reset by peer")))
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(run_config(tmp_path, max_requeues=1)))

    with pytest.raises(SystemExit) as left:
        slurm.main([str(config)])

    assert left.value.code == 0
    assert requeues(scontrol) == ["requeue 77"]
    assert "requeue 1 of 1" in capsys.readouterr().out


def test_ranks_crashing_in_one_run_of_the_job_count_one_crash_and_requeue_it_once(
    scontrol, requeue_signal_caught, tmp_path, monkeypatch
):
    cfg = run_config(tmp_path, max_requeues=1)
    error = RuntimeError("rank 1 lost its peer")
    in_slurm_job(monkeypatch, rank=0, restarts=0)
    with pytest.raises(SystemExit):
        requeue_after_crash(cfg, error)
    # rank 1 a moment later: Slurm refuses a second requeue of the job it is already requeuing
    in_slurm_job(monkeypatch, rank=1, restarts=0)
    monkeypatch.setenv("SCONTROL_REFUSE", "1")
    monkeypatch.setenv("SCONTROL_RESTARTS", "1")
    with pytest.raises(SystemExit) as left:
        requeue_after_crash(cfg, error)
    assert left.value.code == 0

    # the requeued run crashes too: that is the second crash, one more than launcher.max_requeues=1 allows
    in_slurm_job(monkeypatch, rank=1, restarts=1)
    with pytest.raises(CrashedTooOftenError) as gave_up:
        requeue_after_crash(cfg, error)

    assert str(gave_up.value) == (
        "gave up after 1 requeues (launcher.max_requeues=1): RuntimeError: rank 1 lost its peer"
    )
    assert requeues(scontrol) == ["requeue 77", "requeue 77"]
    ledger = CrashLedger(tmp_path / "submitit", "77")
    assert ledger.crashes() == 2
    assert sorted(path.name for path in ledger.folder.iterdir()) == ["0", "1"]  # no partial file left


def test_a_crash_that_cannot_be_counted_is_not_requeued(scontrol, tmp_path, monkeypatch, capsys):
    # uncounted, a crash that repeats would be requeued forever
    in_slurm_job(monkeypatch, rank=0, restarts=0)
    monkeypatch.setattr(slurm, "train_rank", crash(RuntimeError("boom")))
    (tmp_path / "submitit").write_text("a file where the launcher's folder should be")
    config = tmp_path / "run.yaml"
    config.write_text(to_yaml(run_config(tmp_path)))

    assert slurm.main([str(config)]) == 1

    assert requeues(scontrol) == []
    assert capsys.readouterr().err.startswith(
        f"svd: cannot count the crash (RuntimeError: boom) in {tmp_path / 'submitit' / '77_crashes'}: "
    )


def test_a_rank_whose_scontrol_is_ended_by_the_requeue_of_another_rank_asks_again(
    scontrol, tmp_path, monkeypatch
):
    # Rank 0's requeue was accepted: Slurm refuses this rank's and sends SIGTERM to every process of the job
    # step, the `scontrol show job` this rank runs to see the job requeued included.
    monkeypatch.setenv("SCONTROL_REFUSE", "1")
    monkeypatch.setenv("SCONTROL_RESTARTS", "1")
    monkeypatch.setenv("SCONTROL_TERM_ONCE", str(tmp_path / "terminated"))

    requeue_job("77", restart_count=0)

    assert scontrol.read_text().splitlines() == [
        "requeue 77",
        "show job --oneliner 77",  # ended by SIGTERM
        "show job --oneliner 77",
    ]


def test_a_requeue_slurm_refuses_for_another_reason_is_an_error(scontrol, monkeypatch):
    monkeypatch.setenv("SCONTROL_REFUSE", "1")  # refused, and the job was not requeued by anyone else

    with pytest.raises(RequeueError, match="scontrol requeue 77 failed: Job is pending execution for job 77"):
        requeue_job("77", restart_count=0)


def test_the_rendezvous_is_the_first_task_of_the_first_node_on_a_port_of_the_job(monkeypatch):
    in_slurm_job(monkeypatch, rank=9, restarts=0, job_id="123456")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[007-008]")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the GPUs Slurm gave the job: kept
    for key in RENDEZVOUS:
        monkeypatch.setenv(key, "stale")  # e.g. a job started from inside another job

    slurm.export_rendezvous()

    assert {key: os.environ[key] for key in RENDEZVOUS} == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(15000 + 123456 % 5000),
    }
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    slurm.export_rendezvous(master_port=29500)
    assert os.environ["MASTER_PORT"] == "29500"
