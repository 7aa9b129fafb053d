"""The run directory's lease with real processes on the stores runs use: a local file system, moto's S3 and
Ceph's radosgw (whose conditional writes differ: moto names the failed condition, radosgw does not)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from svd.config import compose
from svd.data.storage import Storage
from svd.train.lease import RUN_OWNER, RunDirInUseError, RunDirLease, RunDirLostError, hold_run_dir

ROOT = Path(__file__).resolve().parents[2]
SHORT_TTL_S = 10.0  # renewed every 2.5 s: a busy machine would have to starve the heartbeat for 10 s

# One process taking the lease: waits until `start` (so that several try at once), prints what happened,
# then holds it (heartbeat running) until its stdin closes, and releases it.
TAKER = textwrap.dedent(
    """
    import sys, time
    from svd.data.storage import Storage
    from svd.train.lease import RunDirInUseError, RunDirLease
    run_dir, owner, ttl_s, start = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    lease = RunDirLease(run_dir, Storage.from_env(), owner=owner, ttl_s=ttl_s)
    time.sleep(max(0.0, start - time.time()))
    try:
        note = lease.acquire()
    except RunDirInUseError as e:
        print("refused:", e, flush=True)
        sys.exit(3)
    print("held:", note, flush=True)
    sys.stdin.read()
    lease.release()
    """
)


STORES = ["local", "moto", "radosgw"]


@pytest.fixture
def run_dir(request, tmp_path) -> tuple[str, Storage, dict[str, str]]:
    """(a fresh run directory on the store the test is parametrized with, its storage, the environment a
    process needs to reach it)."""
    if request.param == "local":
        return str(tmp_path / "run"), Storage(), {}
    store = request.getfixturevalue("moto_s3" if request.param == "moto" else "radosgw")
    return f"s3://{store.new_bucket()}/runs/r", store.storage, store.env


def start_taker(where: tuple[str, Storage, dict[str, str]], owner: str, *, ttl_s: float, start: float = 0.0):
    uri, _, env = where
    return subprocess.Popen(
        [sys.executable, "-c", TAKER, uri, owner, str(ttl_s), str(start)],
        env=os.environ | env | {"PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen) -> str:
    line = process.stdout.readline()
    assert line, process.stderr.read()
    return line.strip()


def wait_for_line(stream, text: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        line = stream.readline() if ready else ""
        if text in line:
            return
        assert not ready or line, f"the stream ended without {text!r}"
    raise AssertionError(f"no line with {text!r} within {timeout_s} s")


def end(process: subprocess.Popen) -> str:
    """Close its stdin (it releases and exits); its stderr."""
    _, err = process.communicate(timeout=60)
    return err


def try_to_take(where, owner: str, *, ttl_s: float = 60.0) -> tuple[RunDirLease, str | None]:
    uri, storage, _ = where
    lease = RunDirLease(uri, storage, owner=owner, ttl_s=ttl_s)
    return lease, lease.acquire()


@pytest.mark.slow
@pytest.mark.parametrize("run_dir", STORES, indirect=True)
def test_runs_racing_for_one_run_directory_leave_exactly_one_holder_and_refuse_the_others(run_dir):
    start = time.time() + 4  # after every interpreter has started
    takers = [start_taker(run_dir, f"job-{i}", ttl_s=60, start=start) for i in range(4)]
    lines = [first_line(p) for p in takers]
    held = [i for i, line in enumerate(lines) if line.startswith("held:")]
    assert len(held) == 1, lines
    winner = takers[held[0]]
    for i, line in enumerate(lines):
        if i != held[0]:
            assert line.startswith(f"refused: checkpoint.run_dir={run_dir[0]} is in use by job-{held[0]} "), (
                line
            )
            assert f"pid {winner.pid}" in line
            assert takers[i].wait(timeout=60) == 3
    end(winner)
    assert winner.returncode == 0
    lease, note = try_to_take(run_dir, "job-next")  # released: free at once, nothing to report
    assert note is None
    lease.release()


def test_a_refusal_is_one_line_naming_the_directory_the_holder_and_when_its_lease_expires(tmp_path):
    where = (str(tmp_path / "run"), Storage(), {})
    holder, _ = try_to_take(where, "slurm-1234", ttl_s=600)
    try:
        with pytest.raises(RunDirInUseError) as refused:
            try_to_take(where, "local-abc")
    finally:
        holder.release()
    message = str(refused.value)
    assert "\n" not in message
    expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(holder.holder.renewed + 600))
    for part in (
        f"checkpoint.run_dir={where[0]} is in use by slurm-1234",
        f"pid {os.getpid()}",
        "since ",
        f"expires at {expires}",
        "checkpoint.break_lease=true",
    ):
        assert part in message


@pytest.mark.slow
@pytest.mark.parametrize("run_dir", ["radosgw"], indirect=True)
def test_a_live_holder_keeps_renewing_and_a_frozen_one_expires_and_learns_it_lost_the_directory(run_dir):
    holder = start_taker(run_dir, "job-a", ttl_s=SHORT_TTL_S)
    try:
        assert first_line(holder) == "held: None"
        time.sleep(1.2 * SHORT_TTL_S)  # its heartbeat renews the lease meanwhile
        with pytest.raises(RunDirInUseError, match="in use by job-a"):
            try_to_take(run_dir, "job-b")
        os.kill(holder.pid, signal.SIGSTOP)  # frozen: alive, and renewing no more
        deadline = time.time() + 6 * SHORT_TTL_S
        while True:
            try:
                lease, note = try_to_take(run_dir, "job-b")
                break
            except RunDirInUseError:
                assert time.time() < deadline, "the lease of a frozen holder never expired"
                time.sleep(0.5)
        assert note.startswith(f"checkpoint.run_dir={run_dir[0]}: taken from job-a (host ")
        assert ", whose lease expired at " in note
        os.kill(holder.pid, signal.SIGCONT)
        wait_for_line(holder.stderr, "this run no longer owns it")  # its next heartbeat finds the newer lease
        end(holder)
        with pytest.raises(RunDirInUseError, match="in use by job-b"):  # its release left job-b's alone
            try_to_take(run_dir, "job-c")
        lease.release()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("run_dir", STORES, indirect=True)
def test_a_restarted_job_takes_its_lease_back_at_once_while_other_jobs_are_refused(run_dir):
    crashed = start_taker(run_dir, "slurm-42", ttl_s=600)
    try:
        assert first_line(crashed) == "held: None"
        os.kill(crashed.pid, signal.SIGSTOP)  # hung, as a requeued job's old step can be: alive, not renewing
        with pytest.raises(RunDirInUseError, match="in use by slurm-42"):
            try_to_take(run_dir, "slurm-43")
        lease, note = try_to_take(run_dir, "slurm-42")  # the requeued job: the same job id
        taken_back = f"checkpoint.run_dir={run_dir[0]}: taken back from an earlier run of the same job"
        assert note.startswith(f"{taken_back}, slurm-42 (host ")
        with pytest.raises(RunDirInUseError, match="in use by slurm-42"):
            try_to_take(run_dir, "slurm-43")
        lease.release()
    finally:
        crashed.kill()
        crashed.wait()


def test_a_holder_whose_process_ended_on_this_host_frees_the_directory_at_once(tmp_path):
    where = (str(tmp_path / "run"), Storage(), {})
    killed = start_taker(where, "local-1", ttl_s=600)
    assert first_line(killed) == "held: None"
    killed.kill()  # SIGKILL: no release
    killed.wait()
    lease, note = try_to_take(where, "local-2")
    assert note.startswith(
        f"checkpoint.run_dir={where[0]}: taken from local-1 (host {socket.gethostname()}, "
    )
    assert note.endswith(f"pid {killed.pid}, since " + note.split("since ")[1])
    assert note.endswith("), whose process has ended")
    lease.release()


def test_break_lease_takes_the_directory_from_a_live_holder_which_stops_at_its_next_write(tmp_path):
    where = (str(tmp_path / "run"), Storage(), {})
    holder, _ = try_to_take(where, "ray-1", ttl_s=600)
    holder.confirm()  # still its own
    breaker = RunDirLease(where[0], Storage(), owner="ray-2", ttl_s=600, break_lease=True)
    assert breaker.acquire().endswith(", as checkpoint.break_lease=true asks")
    with pytest.raises(RunDirLostError) as lost:  # before its next write (its heartbeat is minutes away)
        holder.confirm()
    message = str(lost.value)
    assert message.startswith(f"checkpoint.run_dir={where[0]} was taken by ray-2 (host ")
    assert message.endswith(": this run stops without writing there again")
    assert "\n" not in message
    holder.release()
    with pytest.raises(RunDirInUseError, match="in use by ray-2"):  # the old holder's release left it alone
        try_to_take(where, "ray-3")
    breaker.release()


def test_the_lease_is_released_when_the_run_ends_by_an_error_or_ctrl_c(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    cfg = compose(["model=tiny", "data.table=s3://b/t.lance", f"checkpoint.run_dir={run_dir}"])
    monkeypatch.setenv(RUN_OWNER, "local-a")

    def fail(error: BaseException) -> None:
        with hold_run_dir(cfg):
            with pytest.raises(RunDirInUseError, match="in use by local-a"):
                try_to_take((run_dir, Storage(), {}), "local-b")
            raise error

    with pytest.raises(KeyError):
        fail(KeyError("the run failed"))
    with pytest.raises(KeyboardInterrupt):
        fail(KeyboardInterrupt())
    lease, note = try_to_take((run_dir, Storage(), {}), "local-b")
    assert note is None  # released, not expired nor taken
    lease.release()


def test_launchers_name_the_owner_that_their_restarts_keep(monkeypatch, tmp_path):
    """Local: a new owner per launch. Slurm: the job id (a requeue keeps it). Ray: one per driver, given to
    the workers in their environment (a restarted worker group gets the same)."""
    import svd.train
    from svd.launch import local, ray, slurm

    seen: list[str] = []
    # The launchers export the rank's variables (RANK, MASTER_ADDR, …): into a copy, not this test session's
    monkeypatch.setattr(os, "environ", os.environ.copy())
    monkeypatch.setattr(local, "run", lambda cfg, stop=None: seen.append(os.environ[RUN_OWNER]))
    monkeypatch.setattr(svd.train, "run", lambda cfg, stop=None: seen.append(os.environ[RUN_OWNER]))
    monkeypatch.delenv(RUN_OWNER, raising=False)
    # metrics.port=0: the launchers' metrics set-up (a node's folder, a Prometheus announcement) needs a real
    # Slurm step's environment and is not what this test checks; training itself is replaced.
    settings = ["model=tiny", "data.table=s3://b/t.lance", f"checkpoint.run_dir={tmp_path}", "metrics.port=0"]
    cfg = compose(settings)
    local.launch_local(cfg)
    local.launch_local(cfg)
    slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_PROCID": "0"}
    for key, value in (slurm_env | {"SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}).items():
        monkeypatch.setenv(key, value)
    slurm.train_rank(cfg, stop=slurm.StopRequest())
    workers = [ray._worker_env(cfg, use_gpu=False)[RUN_OWNER] for _ in range(2)]

    assert [s.split("-")[0] for s in seen] == ["local", "local", "slurm"]
    assert seen[0] != seen[1]
    assert seen[2] == "slurm-4242"
    assert [w.split("-")[0] for w in workers] == ["ray", "ray"]
    assert workers[0] != workers[1]
