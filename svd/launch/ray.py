"""Ray: the ranks are the workers of a Ray Train `TorchTrainer`, on a Ray cluster or on a local Ray.

The cluster is `launcher.ray_address`, else `$RAY_ADDRESS` (set by KubeRay for a RayJob's entrypoint), else
a local Ray started here for the job and stopped after it. Ray Train places `nodes × gpus_per_node`
workers, sets their torch.distributed environment and creates the process group (NCCL with GPUs, gloo
without), which `svd.train.distributed.init_distributed` then joins; every worker runs `svd.train.run`.

Failures: when a worker dies, Ray Train stops the others and starts a new worker group, up to
`launcher.max_requeues` times (`FailureConfig.max_failures`). The new group resumes from the latest
checkpoint of `checkpoint.run_dir`, as after a Slurm requeue: Ray's own checkpointing is not used, its
storage (`launcher.ray_storage`, else `<run_dir>/ray`) only keeps the run's state and logs.

Stopping: the ranks run in Ray's worker processes, which no scheduler signals: Kubernetes signals a pod's main
process and `ray job stop` the entrypoint's processes. Two requests reach them, both checked by every rank
once per step (`StopRequest(poll=…)`), and both save the step under way:
- the driver's: SIGTERM or Ctrl-C to the driver (`ray job stop`, a terminal) posts a stop on a `StopBoard`
  actor that rank 0 reads; the ranks save and return, and the launcher exits with status 130. A second Ctrl-C
  quits at once. (TorchTrainer.fit runs in a thread for this: in the main thread it would replace our SIGINT
  handler with one that aborts the workers without saving.)
- a node's: a KubeRay pod's SIGTERM goes to its `ray start --block`, which marks its node draining for
  preemption and keeps it `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S` (30 s by default) before it stops the
  raylet and with it the workers. Ray Train sees the drain (`RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`, 5 s) and
  tells every worker (`ray.train.get_preemption_info`). The ranks save, then wait: Ray Train restarts the
  worker group once the node is gone, and the new group resumes from that checkpoint. Returning instead
  would end the run as finished, and failing would count as a crash. The restart is counted apart from
  failures (`FailureConfig.max_preemption_failures`) only when Ray Train sees the drain deadline pass before
  it sees the node's workers die: both happen at the deadline, and a node that `ray start`'s SIGTERM handler
  ended is not marked preempted, so the workers' deaths, seen first, count as a failure (2 evictions in 7
  on a local Ray, Ray 2.x's PreemptingState checks worker errors first). Keep `launcher.max_requeues` ≥ 1.
  The pod's `terminationGracePeriodSeconds` must exceed the drain timeout, and the drain timeout must cover
  the poll, the rest of a step and the save.
The worker processes' own SIGTERM handler is Ray's (it ends the worker): a worker is only signalled when its
raylet goes down too, and then nothing could be saved anyway. A signal to a local Ray's whole process group
reaches its raylet and GCS, which end at once: signal the launcher's process, as Kubernetes does.

GPUs: with `cluster.gpus` each worker gets one GPU when the cluster has GPUs when the job starts (Ray
Train then picks NCCL), else the workers train on CPUs and see no GPU. An autoscaling cluster that has
no GPU node yet would so train on CPUs: give it a minimum of GPU workers (the chart's RayJob has fixed
worker replicas). The driver stays until the run ends (`launcher.wait` does not apply): it owns the
trainer, and on KubeRay the RayJob is the driver.

Storage: `launcher.ray_storage` must be shared by all nodes (s3://…) on a cluster of several nodes; a
local path serves one host only.

Curation runs its shards as Ray tasks on the same cluster, through `ray_cluster` (svd/curate/shards.py).

The workers import the `svd` the driver imported (its folder leads their PYTHONPATH): the same checkout
on this host and in CI, the same image path in a container. Storage credentials are not shipped: the
workers read the AWS_* variables of their own environment (the pod's, or the local Ray's, which inherits
the driver's).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svd.config import RunConfig, from_yaml, to_yaml
from svd.data.storage import Storage, join, scheme
from svd.train.lease import RUN_OWNER
from svd.train.stop import STOPPED_STATUS, Interruption, StopRequest, interruptible, stopped_line

if TYPE_CHECKING:
    from ray.train import PreemptionInfo

SVD_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds the `svd` package
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a Ray of this host alone, on 127.0.0.1
LOCAL_OBJECT_STORE_BYTES = 128 << 20  # a local Ray moves configs and summaries only, never tensors
# How long Ray Train decides a preempted run's restart when the drain has no deadline (its
# DEFAULT_PREEMPTION_DEADLINE_S), and how long past the deadline the ranks wait for it before failing
PREEMPTION_DEADLINE_S = 120.0
RESTART_MARGIN_S = 60.0


@dataclass(frozen=True)
class TrainerPlan:
    """The settings of the TorchTrainer, from the run's configuration alone (no Ray needed to print them)."""

    address: str  # "" starts a local Ray
    num_workers: int
    gpus: bool  # one GPU per worker, if the cluster has GPUs
    cpus_per_worker: int
    max_failures: int
    name: str
    storage: str  # a local path or an s3:// URI
    collective_timeout_s: int

    def resources(self, use_gpu: bool) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})

    def describe(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray started here"
        gpu = "one GPU each, if the cluster has GPUs" if self.gpus else "no GPUs (cluster.gpus=false)"
        backend = "nccl with GPUs, else gloo" if self.gpus else "gloo"
        return "\n".join(
            [
                f"Ray Train TorchTrainer on {where}",
                f"ScalingConfig(num_workers={self.num_workers}, use_gpu={self.gpus}, "
                f"resources_per_worker={self.resources(self.gpus)})  # {gpu}",
                f"FailureConfig(max_failures={self.max_failures})",
                f"RunConfig(name={self.name!r}, storage_path={self.storage!r})",
                f"TorchConfig(backend={backend}, timeout_s={self.collective_timeout_s})",
            ]
        )


def plan(cfg: RunConfig) -> TrainerPlan:
    return TrainerPlan(
        address=cluster_address(cfg.launcher.ray_address),
        num_workers=cfg.world_size,
        gpus=cfg.cluster.gpus,
        cpus_per_worker=cfg.cluster.cpus_per_task,
        max_failures=cfg.launcher.max_requeues,
        name=cfg.job_name,
        storage=cfg.launcher.ray_storage or join(cfg.checkpoint.run_dir, "ray"),
        collective_timeout_s=int(cfg.parallel.collective_timeout_s),
    )


def cluster_address(configured: str) -> str:
    """The configured address, else $RAY_ADDRESS; empty: start a local Ray."""
    return configured or os.environ.get("RAY_ADDRESS", "")


def dry_run(cfg: RunConfig) -> str:
    return plan(cfg).describe()


def launch(cfg: RunConfig) -> int:
    """Train on Ray and wait for the end: the driver owns the trainer, so `launcher.wait` does not apply.
    Status 0 when done, 130 when SIGTERM or SIGINT stopped it after saving the step under way, 1 if failed."""
    try:
        steps, interruption = train_on_ray(cfg)
    except Exception as e:  # Ray Train already retried max_failures times
        print(f"launch: training on Ray failed: {_failure_line(e)}", file=sys.stderr)
        return 1
    if interruption.signal is not None and (steps or 0) < cfg.steps:
        print(stopped_line(steps or 0, cfg.checkpoint.run_dir, interruption.name))
        return STOPPED_STATUS
    print(f"done: {steps} steps in {cfg.checkpoint.run_dir}")
    return 0


def train_on_ray(cfg: RunConfig) -> tuple[int | None, Interruption]:
    """Run the TorchTrainer to the end, or until SIGTERM or SIGINT stops it: the step of the run's latest
    checkpoint, and the signal that stopped it."""
    from svd.train.checkpoint import Checkpointer

    p = plan(cfg)
    with ray_cluster(
        p.address, cpus=p.num_workers * p.cpus_per_worker, gpus=p.num_workers if p.gpus else 0
    ) as ray:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        use_gpu = p.gpus and ray.cluster_resources().get("GPU", 0) > 0
        print(
            f"ray: {p.num_workers} workers ({'one GPU' if use_gpu else 'no GPU'} and {p.cpus_per_worker} "
            f"CPUs each) on {cluster_description(p.address)}; state in {p.storage}",
            flush=True,
        )
        storage = Storage.from_env()
        filesystem, storage_path = ray_storage(p.storage, storage)
        board = stop_board(ray)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"cfg": to_yaml(cfg), "stop_board": board},
            torch_config=TorchConfig(timeout_s=p.collective_timeout_s),
            scaling_config=ScalingConfig(
                num_workers=p.num_workers, use_gpu=use_gpu, resources_per_worker=p.resources(use_gpu)
            ),
            run_config=RunConfig(
                name=p.name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=p.max_failures),
                worker_runtime_env={"env_vars": _worker_env(cfg, use_gpu)},
            ),
        )
        with interruptible(lambda signum: board.post.remote(signal_name(signum))) as interruption:
            _fit_in_a_thread(trainer)
    with Checkpointer(cfg.checkpoint.run_dir, storage, keep=cfg.checkpoint.keep, async_save=False) as ckpt:
        return ckpt.latest_step(), interruption


def _fit_in_a_thread(trainer: Any) -> None:
    """`trainer.fit()`, with this (main) thread free for our signal handlers: fit installs its own SIGINT
    handler (abort the workers, unsaved) when it runs in the main thread, and a handler runs only between the
    main thread's Python steps."""
    raised: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the main thread
            raised.append(e)

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if raised:
        raise raised[0]


def signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def stop_board(ray: Any) -> Any:
    """A `StopBoard` actor on the driver's node: it lives as long as the driver, while a worker's node may be
    preempted."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(StopBoard).remote()


class StopBoard:
    """A Ray actor: where the driver posts a stop for the ranks (the first request wins)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def post(self, reason: str) -> None:
        self.reason = self.reason or reason

    def read(self) -> str | None:
        return self.reason


def ray_storage(uri: str, storage: Storage) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of Ray Train's storage. Object storage goes through s3fs, configured like
    all of svd's storage (endpoint, credentials, deadlines from the AWS_* and SVD_STORAGE_* variables):
    pyarrow's own S3 client finishes even a small file as a multipart upload, which moto's server (the
    tests' S3) answers with an error."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    if scheme(uri) == "s3":
        fs, path = storage.fsspec(uri)
        return PyFileSystem(FSSpecHandler(fs)), path
    return storage.pyarrow(uri)


def _train_loop(config: dict[str, Any]) -> None:
    """One worker: the node's metrics folder, the device Ray Train gave it, then the rank's training, which
    resumes from the latest checkpoint of the run directory (so a restarted worker group continues where the
    last one saved) and stops when the driver or a preemption asks."""
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    from svd.train import run
    from svd.train.distributed import DEVICE_ENV

    cfg = from_yaml(config["cfg"])
    context = ray.train.get_context()
    # The GPU Ray Train assigned: a worker's visible GPUs need not be in local-rank order
    os.environ[DEVICE_ENV] = str(get_device())
    if cfg.metrics.port:
        from svd.train.metrics import prepare_multiprocess_dir

        if context.get_local_rank() == 0:  # the files of a previous worker group's ranks go
            prepare_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        dist.barrier()
    checks = RankStopChecks(config["stop_board"], context.get_world_rank() == 0)
    result = run(cfg, StopRequest(poll=checks))
    if result.stopped and checks.preemption is not None:
        await_the_restart(checks.preemption, result.steps, context.get_world_rank())
    if context.get_world_rank() == 0:
        resumed = "a fresh start" if result.resumed_from is None else f"step {result.resumed_from}"
        print(f"ray: rank 0 reached step {result.steps}, from {resumed}", flush=True)


class RankStopChecks:
    """What stops a Ray rank, asked by every rank once per step (the trainer's `stop.is_set()`): Ray Train's
    notice that a node of the run is being drained for preemption, which is a collective (every rank asks,
    rank 0's answer is everyone's), then, on rank 0, the driver's `StopBoard`."""

    def __init__(self, board: Any, reads_board: bool) -> None:
        self.board = board
        self.reads_board = reads_board
        self.preemption: PreemptionInfo | None = None

    def __call__(self) -> str | None:
        import ray
        import ray.train

        info = ray.train.get_preemption_info()
        if info is not None:
            self.preemption = info
            return f"the preemption of ranks {info.preempted_ranks}"
        return ray.get(self.board.read.remote()) if self.reads_board else None


def await_the_restart(info: PreemptionInfo, step: int, rank: int) -> None:
    """After the save a preemption asked for: wait for Ray Train to end this worker group when the drained
    node is gone and to start a new one, which resumes from that save. Fails if it has not by the deadline."""
    deadline_s = info.deadline_ms / 1000 if info.deadline_ms else time.time() + PREEMPTION_DEADLINE_S
    if rank == 0:
        left = max(0.0, deadline_s - time.time())
        print(
            f"ray: ranks {info.preempted_ranks} are being preempted: step {step} saved; waiting up to "
            f"{left:.0f} s for Ray Train to restart the workers",
            flush=True,
        )
    time.sleep(max(0.0, deadline_s - time.time()) + RESTART_MARGIN_S)
    raise RuntimeError(
        f"preempted after saving step {step}, but Ray Train did not restart the workers within "
        f"{RESTART_MARGIN_S:.0f} s of the deadline"
    )


def _worker_env(cfg: RunConfig, use_gpu: bool) -> dict[str, str]:
    """What the workers need before Python starts: the driver's `svd`; no visible GPU when they were given
    none (Ray leaves a GPU node's devices visible, and `parallel` would pick CUDA beside Ray's gloo group);
    the node's metrics folder (prometheus_client reads it at import)."""
    # The ranks' prints (progress lines) stay plain output: Ray Train's print patch would log each twice.
    env = {"PYTHONPATH": _pythonpath(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    env[RUN_OWNER] = f"ray-{uuid.uuid4().hex[:12]}"  # this driver's; a restarted worker group keeps it
    if not use_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if cfg.metrics.port:
        from svd.train.metrics import MetricsConfig

        # a folder of this launch's own: another run of the job name on a node must not clear it
        launch = f"{cfg.job_name}-{uuid.uuid4().hex[:8]}"
        env["PROMETHEUS_MULTIPROC_DIR"] = str(MetricsConfig(port=cfg.metrics.port).directory(launch))
    return env


@contextmanager
def ray_cluster(address: str, *, cpus: int, gpus: int = 0) -> Iterator[Any]:
    """Connected to the cluster at `address`, or to a local Ray of `cpus` CPUs (and `gpus` GPUs, where this
    host has them) started quietly for this job and stopped after it. Yields the `ray` module."""
    if not address:  # set before Ray is imported: it reads them then
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # One host: everything on 127.0.0.1 (else Ray advertises the host's outward address, even when
        # given 127.0.0.1)
        os.environ.setdefault(LOCAL_ONLY, "0")
    import ray

    if ray.is_initialized():  # a driver that connected already (a notebook, a test)
        yield ray
        return
    if address:
        ray.init(address=address, runtime_env=runtime_env(), logging_level=logging.WARNING)
    else:
        import torch

        ray.init(
            address="local",  # a new Ray of our own: never one that another job left in /tmp/ray
            num_cpus=cpus,
            num_gpus=min(gpus, torch.cuda.device_count()),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            runtime_env=runtime_env(),
            logging_level=logging.WARNING,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


def runtime_env() -> dict[str, Any]:
    """The job's runtime environment: the driver's `svd` in every worker, and a quiet Ray."""
    return {"env_vars": {"PYTHONPATH": _pythonpath()}, "worker_process_setup_hook": QUIET_HOOK}


QUIET_HOOK = "svd.launch.ray.quiet_ray_internals"


def quiet_ray_internals() -> None:
    """Run in each worker process at start. Ray Train's placement-group cleaner asks the state API every
    second whether the controller lives and warns each time it cannot: on a cluster without a dashboard
    (a local Ray here) that is a warning a second for the whole run."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )


def _pythonpath() -> str:
    """The driver's `svd` first: the workers import the code the driver checked the settings with."""
    return os.pathsep.join(p for p in (SVD_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def cluster_description(address: str) -> str:
    """Where the work runs, for the line that starts it: the cluster at `address`, else a local Ray."""
    return f"the Ray cluster at {address}" if address else "a local Ray on this host"


def _failure_line(e: BaseException) -> str:
    """The error that ended the run, in one line: the lowest failed rank's own exception, not the
    "Training failed due to worker errors:" of Ray Train's WorkerGroupError around it."""
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        return error_line(e)
    rank = min(failures)
    cause = failures[rank]
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError carries the rank's exception
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"rank {rank}{more}: {error_line(cause)}"


def error_line(e: BaseException) -> str:
    """An exception in one line, `Type: first line of its message`: a Ray error's message goes on with the
    remote traceback."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
