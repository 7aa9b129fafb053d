"""Slurm: `nodes` × `gpus_per_node` tasks started by `srun`, one rank each, submitted through submitit.

One sbatch job holds the whole run. Every task reads its rank from Slurm through submitit's
`TorchDistributedEnvironment` and finds rank 0 on the first node of the job, on a port derived from the job
id, so that two jobs sharing a node never meet. The same rank entry serves submitit and a hand-written sbatch
script (`python -m svd.launch.slurm run.yaml`, jobs/slurm/train.sbatch).

Slurm warns `cluster.signal_delay_s` before the time limit, and on preemption, with SIGUSR2 (submitit's
`--signal=USR2@delay`). Every rank then finishes its step and the run saves a checkpoint of it; after that,
rank 0 requeues the job, which resumes from that checkpoint (the trainer resumes from `checkpoint.run_dir`).
When Slurm ends the step itself (`scancel`, `scontrol requeue`, preemption that requeues), the ranks get
SIGTERM `KillWait` seconds before they are killed: they save the step under way the same way and return,
and Slurm ends or requeues the job on its own. A crash is requeued by whichever rank raised it, at most
`launcher.max_requeues` times (crashes counted apart from the other requeues: svd/launch/slurm_requeue.py),
then given up with the error. A configuration error is never requeued: it would fail the same way again.

Curation runs its shards as a job array through this module's `executor` (svd/curate/shards.py).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import submitit
from omegaconf import OmegaConf

from svd.config import (
    CONF_DIR,
    ClusterConfig,
    ConfigError,
    RunConfig,
    check_cluster_settings,
    config_errors,
    from_yaml,
    to_yaml,
)
from svd.launch.slurm_requeue import CrashLedger, RequeueError, requeue_job
from svd.train.lease import RUN_OWNER
from svd.train.stop import StopRequest

if TYPE_CHECKING:
    from svd.train.trainer import TrainResult

REQUEUE_SIGNAL = signal.SIGUSR2  # what submitit asks Slurm to send before the time limit, and on preemption
# Slurm's own end of a job step (scancel, `scontrol requeue`, preemption by requeue): Slurm itself ends or
# requeues the job, and KillWait later kills the ranks, so they save the step under way and return.
END_SIGNAL = signal.SIGTERM
MASTER_PORTS = (15000, 5000)  # first port, count: job id → port, below the ephemeral range (32768+)
# A time limit or a preemption always requeues (the run resumes from its checkpoint, losing nothing); submitit
# counts them against this, so it is large rather than a limit anyone should meet.
TIME_LIMIT_REQUEUES = 10_000


class CrashedTooOftenError(RuntimeError):
    """A job whose runs crashed more often than launcher.max_requeues allows."""


# ---- what is submitted ---------------------------------------------------------------------------------
def sbatch_parameters(
    cluster: ClusterConfig,
    *,
    job_name: str,
    nodes: int,
    tasks_per_node: int,
    cpus_per_task: int,
    gpus_per_node: int,
    exclusive: bool,
) -> dict[str, Any]:
    """submitit's Slurm parameters (sbatch's options, `_` for `-`) of a job on `cluster`."""
    check_cluster(cluster)
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": nodes,
        "ntasks_per_node": tasks_per_node,
        "cpus_per_task": cpus_per_task,
        "time": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
        "additional_parameters": {},
    }
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    if cluster.gpus and gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if exclusive:
        params["exclusive"] = True
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cluster, key):
            params[key] = getattr(cluster, key)
    # --mem as sbatch reads it (submitit's own `mem` takes GB and cannot say 0, the whole node)
    if cluster.mem_gb or exclusive:
        params["additional_parameters"]["mem"] = f"{cluster.mem_gb}G" if cluster.mem_gb else "0"
    params["additional_parameters"].update(cluster.sbatch_extra)
    return params


def check_cluster(cluster: ClusterConfig) -> None:
    """Raises ConfigError naming the first setting that sbatch would refuse, or that makes no sense."""
    check_cluster_settings(cluster)
    for key in cluster.sbatch_extra:
        if key.replace("_", "-") in ("nodes", "ntasks-per-node", "array", "output", "error", "signal"):
            raise ConfigError(f"cluster.sbatch_extra.{key}: set by the launcher; use the run's settings")


def cluster_config(name: str) -> ClusterConfig:
    """The `cluster:` settings of jobs/conf/cluster/<name>.yaml, for a job composed without a run's config
    (curation's job array)."""
    path = CONF_DIR / "cluster" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"cluster={name!r}: no {path}")
    with config_errors(ClusterConfig):
        merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.load(path).get("cluster", {}))
        return OmegaConf.to_object(merged)


def train_parameters(cfg: RunConfig) -> dict[str, Any]:
    return sbatch_parameters(
        cfg.cluster,
        job_name=cfg.job_name,
        nodes=cfg.nodes,
        tasks_per_node=cfg.gpus_per_node,
        cpus_per_task=cfg.cluster.cpus_per_task,
        gpus_per_node=cfg.gpus_per_node,
        exclusive=cfg.cluster.exclusive,
    )


def executor(folder: str | Path, params: dict[str, Any]) -> submitit.SlurmExecutor:
    """submitit's Slurm executor: its parameters are sbatch's, the same ones `dry_run` shows."""
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=TIME_LIMIT_REQUEUES)
    ex.update_parameters(**params)
    return ex


def dry_run(cfg: RunConfig) -> str:
    """The sbatch script submitit would submit (no cluster needed)."""
    # What SlurmExecutor writes, without submitting: submitit has no public dry run, and a script written
    # here instead could drift from the one it submits.
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(cfg.launcher.folder).resolve()
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **train_parameters(cfg))


# ---- the submitter's side ------------------------------------------------------------------------------
def launch(cfg: RunConfig) -> int:
    try:
        ex = executor(cfg.launcher.folder, train_parameters(cfg))
        job = ex.submit(SlurmTraining(to_yaml(cfg)))
    except submitit.core.utils.FailedJobError as e:  # sbatch refused (submitit echoed its error output)
        print(f"launch: sbatch refused the job: {sbatch_error(str(e))}", file=sys.stderr)
        return 2
    print(f"slurm job {job.job_id}: logs in {cfg.launcher.folder}", flush=True)
    if not cfg.launcher.wait:
        return 0
    try:
        result: TrainResult = job.results()[0]
    except Exception as e:  # the job failed: its traceback is in the log folder
        print(f"launch: slurm job {job.job_id} failed: {job_error(str(e))}", file=sys.stderr)
        return 1
    print(f"done: {result.steps} steps in {cfg.checkpoint.run_dir}")
    return 0


def sbatch_error(text: str) -> str:
    """sbatch's first error line: the one naming the option it refused."""
    errors = [line.strip() for line in text.splitlines() if line.strip().startswith("sbatch: error:")]
    return errors[0] if errors else _last_line(text)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def job_error(failure: str) -> str:
    """The exception that ended a job, from submitit's report of it (a traceback, then the log paths),
    without its module: `CrashedTooOftenError: gave up …`."""
    raised = [m for line in failure.splitlines() if (m := re.match(r"(?:\w+\.)*(\w+): (.*)", line))]
    return f"{raised[-1][1]}: {raised[-1][2]}" if raised else _last_line(failure)


# ---- each rank -----------------------------------------------------------------------------------------
class SlurmTraining(submitit.helpers.Checkpointable):
    """What submitit runs in every task. On the requeue signal, submitit resubmits `checkpoint()`: this
    object as it is, since the state worth keeping is in the run directory (and the crash count in the
    launcher's folder)."""

    def __init__(self, config_yaml: str) -> None:
        self.config_yaml = config_yaml

    def __call__(self) -> TrainResult:
        cfg = from_yaml(self.config_yaml)
        stop = StopRequest()
        try:
            result = train_rank(cfg, stop)
        except ConfigError:
            raise  # the job fails with it: a requeued job would fail the same way
        except Exception as e:
            requeue_after_crash(cfg, e)
        if result.stopped and stop.signal == REQUEUE_SIGNAL:
            _requeue_through_submitit()
        return result


def requeue_after_crash(cfg: RunConfig, error: Exception) -> NoReturn:
    """Counts the crash of this run of the job (once, however many ranks crash in it), then requeues the job,
    or raises CrashedTooOftenError past `launcher.max_requeues`. Every rank that crashes does this itself:
    under NCCL's asynchronous error handling the other ranks are torn down without a Python exception, so
    none of them can be relied on to requeue for it."""
    job_id, restarts = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", 0))
    failure = f"{type(error).__name__}: {error}"
    ledger = CrashLedger(cfg.launcher.folder, job_id)
    try:
        crashes = ledger.record(restarts, failure)
    except OSError as e:  # uncounted, a crash could be requeued forever
        raise RequeueError(f"cannot count the crash ({failure}) in {ledger.folder}: {e}") from error
    if crashes > cfg.launcher.max_requeues:
        raise CrashedTooOftenError(
            f"gave up after {crashes - 1} requeues (launcher.max_requeues={cfg.launcher.max_requeues}): "
            f"{failure}"
        ) from error
    rank, limit = os.environ["SLURM_PROCID"], cfg.launcher.max_requeues
    print(f"svd: rank {rank} crashed ({failure}); requeue {crashes} of {limit}", flush=True)
    requeue_job(job_id, restarts)
    _leave_for_the_requeue()


def _requeue_through_submitit() -> NoReturn:
    """submitit's own handler of the signal requeues the job on rank 0 (resubmitting `checkpoint()`) and
    exits; the other ranks leave without a result, as the requeue would end them anyway. They leave with
    status 0: a site with KillOnBadExit would otherwise end rank 0 before it requeues."""
    signal.raise_signal(REQUEUE_SIGNAL)
    _leave_for_the_requeue()


def _leave_for_the_requeue() -> NoReturn:
    print(f"svd: rank {os.environ['SLURM_PROCID']} leaves for the requeue", flush=True)
    raise SystemExit(0)


def train_rank(cfg: RunConfig, stop: StopRequest) -> TrainResult:
    """One rank of the run: the torch.distributed environment from Slurm's, the node's metrics endpoint
    announced to Prometheus, training until done or until a signal (`stop.signal`: REQUEUE_SIGNAL or
    END_SIGNAL) asks for a checkpoint of the step under way."""
    from svd.train import run

    export_rendezvous(cfg.launcher.master_port)
    os.environ[RUN_OWNER] = f"slurm-{os.environ['SLURM_JOB_ID']}"  # kept by a requeue: takes its lease back
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != cfg.world_size:
        raise ConfigError(
            f"the job has {world_size} tasks but the run wants nodes={cfg.nodes} × "
            f"gpus_per_node={cfg.gpus_per_node}: give sbatch --nodes={cfg.nodes} "
            f"--ntasks-per-node={cfg.gpus_per_node}"
        )
    with node_metrics(cfg), stop.on_signals([REQUEUE_SIGNAL, END_SIGNAL]):
        return run(cfg, stop)


def export_rendezvous(master_port: int = 0) -> None:
    """torch.distributed's variables from Slurm's, by submitit's TorchDistributedEnvironment: rank 0 is the
    first task of the first node. Three things are ours: the port (`master_port`, else one derived from the
    job id below the ephemeral range, where submitit's own pick can collide with a client's socket);
    CUDA_VISIBLE_DEVICES stays as Slurm set it (submitit would narrow it to the local rank, a wrong GPU where
    Slurm gave the job other devices than 0…n-1; the trainer picks `local_rank % device_count`); and a plain
    sbatch script is told apart from submitit's by SUBMITIT_EXECUTOR, which only submitit's script exports."""
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    os.environ["MASTER_PORT"] = str(master_port or job_port(os.environ["SLURM_JOB_ID"]))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def job_port(job_id: str) -> int:
    first, count = MASTER_PORTS
    return first + int(job_id) % count


@contextmanager
def node_metrics(cfg: RunConfig) -> Iterator[None]:
    """With metrics.port: the node's ranks share a multiprocess folder new to this run of the job (a
    requeued run never serves the files of the last), and local rank 0 has its endpoint announce host:port to
    Prometheus (file_sd) once it serves, with the port it bound (metrics.port, or the next free one when that
    is taken); the announcement goes when the run ends."""
    if not cfg.metrics.port:
        yield
        return
    from svd.train.file_sd import Announcement, targets_dir
    from svd.train.metrics import ENV_DIR, MetricsConfig

    job_id, restarts = os.environ["SLURM_JOB_ID"], os.environ.get("SLURM_RESTART_COUNT", "0")
    folder = MetricsConfig(port=cfg.metrics.port).directory(f"{cfg.job_name}-{job_id}-{restarts}")
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_DIR] = str(folder)
    if os.environ["LOCAL_RANK"] != "0":
        yield
        return
    node = os.environ["SLURMD_NODENAME"]
    labels = {"job": cfg.job_name, "slurm_job_id": job_id, "node": node}
    announcement = Announcement(f"{cfg.job_name}-{job_id}-{node}", node, labels, str(targets_dir()))
    with announcement.requested():
        yield


def main(argv: list[str] | None = None) -> int:
    """The rank entry of a hand-written sbatch script: `srun python -m svd.launch.slurm run.yaml`. Without
    submitit, rank 0 requeues the job itself on the requeue signal; a crash is requeued as under submitit."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: srun python -m svd.launch.slurm run.yaml  (from `jobs/launch.py … --cfg > run.yaml`)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cfg = from_yaml(Path(argv[0]).read_text())
    stop = StopRequest()
    try:
        result = train_rank(cfg, stop)
    except ConfigError as e:  # the job does not fit the run: a requeue would not change that
        print(f"svd: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        try:
            requeue_after_crash(cfg, e)
        except (CrashedTooOftenError, RequeueError) as not_requeued:
            print(f"svd: {not_requeued}", file=sys.stderr)
            return 1
    if result.stopped and stop.signal == REQUEUE_SIGNAL:
        if os.environ["SLURM_PROCID"] == "0":
            requeue_job(os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        _leave_for_the_requeue()
    if result.stopped:
        print(f"stopped by Slurm after step {result.steps}, saved in {cfg.checkpoint.run_dir}")
        return 0
    print(f"done: {result.steps} steps in {cfg.checkpoint.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
