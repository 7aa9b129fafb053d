"""A real two-node Slurm cluster (infra/slurm/local.sh) for the launcher tests, started once per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from svd.data.local_s3 import create_bucket

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "slurm" / "local.sh"
BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@dataclass(frozen=True)
class SlurmCluster:
    """What a test needs to use the cluster; SLURM_CONF is already in os.environ (and so in every job)."""

    conf: Path  # slurm.conf
    directory: Path  # the state directory; the daemons' logs are in directory / "log"
    partition: str
    nodes: tuple[str, ...]

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def state(self, job_id: str) -> str:
        """The job's state as accounting has it ("" until slurmctld has reported the job to slurmdbd, which
        lags the job by a moment); "CANCELLED by 0" reads "CANCELLED"."""
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0] if out else ""

    def wait_until_finished(self, job_id: str, timeout_s: float = 60) -> str:
        """The job's final state, once accounting reports one and the job has left the queue: a cancelled job
        is CANCELLED at once, while its processes may still run (saving) for up to KillWait seconds."""
        deadline = time.monotonic() + timeout_s
        while (state := self.state(job_id)) not in FINAL_STATES or self.in_queue(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state or 'unknown to sacct'} after {timeout_s} s")
            time.sleep(0.2)
        return state

    def in_queue(self, job_id: str) -> bool:
        """Whether squeue still lists the job (pending, running or completing)."""
        listed = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        return listed.returncode == 0 and bool(listed.stdout.strip())


def free_port_block(size: int) -> int:
    """The first of `size` consecutive free ports on 127.0.0.1, below the ephemeral range (clients' ports
    never land on them); the search starts at a per-process offset so that concurrent sessions differ."""
    bases = list(range(20000, 32000, 10))
    first = os.getpid() % len(bases)
    for base in bases[first:] + bases[:first]:
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports between 20000 and 32000")


class LocalSlurm:
    """infra/slurm/local.sh for one state directory, on five free ports: `start()`, then `stop()`."""

    def __init__(self, directory: Path, env: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.env = dict(env or os.environ) | {
            "SVD_SLURM_DIR": str(directory),
            "SVD_SLURM_PORT": str(free_port_block(5)),
        }

    def start(self) -> subprocess.CompletedProcess:
        return self._script("start")

    def stop(self) -> subprocess.CompletedProcess:
        return self._script("stop")

    def _script(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), command], env=self.env, capture_output=True, text=True, check=False
        )


@pytest.fixture(scope="session")
def slurm_installed() -> None:
    """Skips where Slurm is not installed (`infra/slurm/local.sh install` installs it), except in CI, where
    that is a failure."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if all(shutil.which(binary, path=path) for binary in BINARIES):
        return
    message = "Slurm is not installed: `infra/slurm/local.sh install` installs it (Debian, root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_installed, tmp_path_factory) -> Iterator[SlurmCluster]:
    """Slurm with accounting and requeue, nodes n1 and n2 in partition "local", in a fresh state directory:
    job ids start at 1, so each test gives submitit a folder of its own."""
    directory = tmp_path_factory.mktemp("slurm")
    local = LocalSlurm(directory)
    started = local.start()
    if started.returncode != 0:
        local.stop()
        pytest.fail(f"infra/slurm/local.sh start failed:\n{started.stderr}")
    cluster = SlurmCluster(directory / "slurm.conf", directory, partition="local", nodes=("n1", "n2"))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stopped = local.stop()
        assert stopped.returncode == 0, f"infra/slurm/local.sh stop failed:\n{stopped.stderr}"


@pytest.fixture(autouse=True)
def no_job_left_running(request) -> Iterator[None]:
    """After a test on the session's cluster, its jobs are cancelled: a test that fails mid-job must not leave
    the next one sharing the two nodes (and this machine's cores) with it."""
    yield
    if "slurm_cluster" not in request.fixturenames:
        return
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=False).stdout
    if jobs.split():
        subprocess.run(["scancel", *jobs.split()], capture_output=True, check=False)


@pytest.fixture
def local_slurm() -> Iterator[Callable[..., LocalSlurm]]:
    """`local_slurm(directory, env)`: a cluster of its own for a test of local.sh itself, stopped after it."""
    made: list[LocalSlurm] = []

    def make(directory: Path, env: Mapping[str, str] | None = None) -> LocalSlurm:
        made.append(LocalSlurm(directory, env))
        return made[-1]

    yield make
    for cluster in made:
        stopped = cluster.stop()
        assert stopped.returncode == 0, f"infra/slurm/local.sh stop failed:\n{stopped.stderr}"


@pytest.fixture
def job_env(s3_env, monkeypatch) -> dict[str, str]:
    """What a job needs from its submitter's environment (Slurm passes it on): the S3 server, this checkout's
    svd ahead of any installed one, one thread per rank (both nodes share this machine's cores)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return dict(os.environ)


@pytest.fixture
def radosgw_job_env(radosgw, job_env, monkeypatch) -> dict[str, str]:
    """job_env with radosgw, a real object store, instead of moto."""
    for key, value in radosgw.env.items():
        monkeypatch.setenv(key, value)
    return dict(os.environ)


@pytest.fixture(scope="session")
def radosgw_train_table(train_table, moto_s3, radosgw) -> dict:
    """train_table copied to radosgw, object by object into a bucket of the same name, so that the URIs its
    rows hold (videos, images) name the copies. The table and its raw media only: the runs other tests
    trained into that bucket (checkpoints of tens of MB each) are not the table's, and copying them all
    filled radosgw's memstore once the evaluation tests had trained a few runs there."""
    bucket = train_table["bucket"]
    create_bucket(radosgw.storage, bucket.removeprefix("s3://"))
    source, root = moto_s3.storage.fsspec(bucket)
    target, _ = radosgw.storage.fsspec(bucket)
    for part in ("clips.lance", "raw"):
        for path in source.find(f"{root}/{part}"):
            target.pipe_file(path, source.cat_file(path))
    return train_table
