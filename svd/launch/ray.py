"""Ray: the ranks are the workers of a Ray Train `TorchTrainer`, on a Ray cluster or on a local Ray.

The cluster is `launcher.ray_address`, else `$RAY_ADDRESS` (set by KubeRay for a RayJob's entrypoint), else
a local Ray started here for the job and stopped after it. Ray Train places `nodes × gpus_per_node`
workers, sets their torch.distributed environment and creates the process group (NCCL with GPUs, gloo
without), which `svd.train.distributed.init_distributed` then joins; every worker runs `svd.train.run`.

Failures: when a worker dies, Ray Train stops the others and starts a new worker group, up to
`launcher.max_requeues` times (`FailureConfig.max_failures`). The new group resumes from the latest
checkpoint of `checkpoint.run_dir`, as after a Slurm requeue: Ray's own checkpointing is not used, its
storage (`launcher.ray_storage`, else `<run_dir>/ray`) only keeps the run's state and logs.

GPUs: with `cluster.gpus` each worker gets one GPU when the cluster has GPUs when the job starts (Ray
Train then picks NCCL), else the workers train on CPUs and see no GPU. An autoscaling cluster that has
no GPU node yet would so train on CPUs: give it a minimum of GPU workers (the chart's RayJob has fixed
worker replicas). The driver stays until the run ends (`launcher.wait` does not apply): it owns the
trainer, and on KubeRay the RayJob is the driver.

Storage: `launcher.ray_storage` must be shared by all nodes (s3://…) on a cluster of several nodes; a
local path serves one host only.

Curation: `curate_shards` runs `shards` Ray tasks, each one `shard=i/shards` of the same pipeline.

The workers import the `svd` the driver imported (its folder leads their PYTHONPATH): the same checkout
on this host and in CI, the same image path in a container. Storage credentials are not shipped: the
workers read the AWS_* variables of their own environment (the pod's, or the local Ray's, which inherits
the driver's).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svd.config import RunConfig, from_yaml, to_yaml
from svd.data.storage import Storage, join, scheme
from svd.launch import ShardResults, curate_shard, report_shards, shard_configs

if TYPE_CHECKING:
    from svd.curate.config import CurateConfig

SVD_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds the `svd` package
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a Ray of this host alone, on 127.0.0.1
LOCAL_OBJECT_STORE_BYTES = 128 << 20  # a local Ray moves configs and summaries only, never tensors


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
    """Train on Ray and wait for the end: the driver owns the trainer, so `launcher.wait` does not apply."""
    try:
        steps = train_on_ray(cfg)
    except Exception as e:  # Ray Train already retried max_failures times
        print(f"launch: training on Ray failed: {_failure_line(e)}", file=sys.stderr)
        return 1
    print(f"done: {steps} steps in {cfg.checkpoint.run_dir}")
    return 0


def train_on_ray(cfg: RunConfig) -> int | None:
    """Run the TorchTrainer to the end; the step of the run's latest checkpoint."""
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
            f"CPUs each) on {_where(p.address)}; state in {p.storage}",
            flush=True,
        )
        storage = Storage.from_env()
        filesystem, storage_path = ray_storage(p.storage, storage)
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"cfg": to_yaml(cfg)},
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
        trainer.fit()
    with Checkpointer(cfg.checkpoint.run_dir, storage, keep=cfg.checkpoint.keep, async_save=False) as ckpt:
        return ckpt.latest_step()


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


def _train_loop(config: dict[str, str]) -> None:
    """One worker: the node's metrics folder, then the rank's training, which resumes from the latest
    checkpoint of the run directory (so a restarted worker group continues where the last one saved)."""
    import ray.train
    import torch.distributed as dist

    from svd.train import run

    cfg = from_yaml(config["cfg"])
    context = ray.train.get_context()
    if cfg.metrics.port:
        from svd.train.metrics import prepare_multiprocess_dir

        if context.get_local_rank() == 0:  # the files of a previous worker group's ranks go
            prepare_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        dist.barrier()
    result = run(cfg)
    if context.get_world_rank() == 0:
        resumed = "a fresh start" if result.resumed_from is None else f"step {result.resumed_from}"
        print(f"ray: rank 0 reached step {result.steps}, from {resumed}", flush=True)


def _worker_env(cfg: RunConfig, use_gpu: bool) -> dict[str, str]:
    """What the workers need before Python starts: the driver's `svd`; no visible GPU when they were given
    none (Ray leaves a GPU node's devices visible, and `parallel` would pick CUDA beside Ray's gloo group);
    the node's metrics folder (prometheus_client reads it at import)."""
    # The ranks' prints (progress lines) stay plain output: Ray Train's print patch would log each twice.
    env = {"PYTHONPATH": _pythonpath(), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
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


def _where(address: str) -> str:
    return f"the Ray cluster at {address}" if address else "a local Ray on this host"


def _failure_line(e: BaseException) -> str:
    """The error that ended the run, in one line: the lowest failed rank's own exception, not the
    "Training failed due to worker errors:" of Ray Train's WorkerGroupError around it."""
    failures = getattr(e, "worker_failures", None) or {}
    if not failures:
        return f"{type(e).__name__}: {_first_line(e)}"
    rank = min(failures)
    cause = failures[rank]
    cause = getattr(cause, "cause", None) or cause  # a RayTaskError carries the rank's exception
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return f"rank {rank}{more}: {type(cause).__name__}: {_first_line(cause)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ---- curation ---------------------------------------------------------------------------------------


def curate_shards(cfg: CurateConfig) -> int:
    """`cfg.shards` Ray tasks, each curating shard=i/shards into the same table; a summary per shard and
    in all."""
    return report_shards(curate_on_ray(cfg), cfg.shards)


def curate_on_ray(cfg: CurateConfig) -> ShardResults:
    """Run the shards as Ray tasks on the cluster at $RAY_ADDRESS, else on a local Ray sized to them. A
    task that dies with its worker is retried by Ray (curation skips what is already in the table); an
    error of the pipeline is not."""
    cpus = cfg.cpus_per_shard or cfg.workers + 1
    address = cluster_address("")
    results = ShardResults({}, {})
    # A local Ray of this host's CPUs (at least one shard's): the shards beyond wait their turn
    local_cpus = max(cpus, min(cfg.shards * cpus, os.cpu_count() or 1))
    with ray_cluster(address, cpus=local_cpus, gpus=cfg.shards * cfg.gpus_per_shard) as ray:
        print(f"ray: {cfg.shards} curation shards ({cpus} CPUs each) on {_where(address)}", flush=True)
        task = ray.remote(num_cpus=cpus, num_gpus=cfg.gpus_per_shard)(curate_shard)
        refs = [task.remote(shard) for shard in shard_configs(cfg)]
        for i, ref in enumerate(refs):
            try:
                results.summaries[i] = ray.get(ref)
            except Exception as e:  # the task's error (RayTaskError.cause), or the task's worker died
                cause = getattr(e, "cause", None) or e
                results.failures[i] = f"{type(cause).__name__}: {_first_line(cause)}"
    return results
