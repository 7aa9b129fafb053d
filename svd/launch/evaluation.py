"""Evaluation on Slurm or Ray (`jobs/evaluate.py … launcher=slurm|ray`): where the processes of one evaluation
start. What each runs is `svd.eval.share.evaluate_share`, as by hand; its share of the shards comes from the
rank environment, as training's does: Slurm's SLURM_PROCID and SLURM_NTASKS in the tasks of one job of
`nodes × ranks_per_node` tasks; on Ray, as many tasks, each given its rank and their number. The processes
need no process group: whichever writes the last shard merges.

The clusters are training's: the site settings of jobs/conf/cluster/ and submitit on Slurm, the Ray cluster at
`ray_address` or $RAY_ADDRESS (a RayJob's), else a local Ray. `watch=true` runs the same way beside the
training, as a Slurm job or a RayJob of its own, so evaluation never takes the training's GPUs; on Slurm, each
task's metrics endpoint (the gauge svd_eval_metric) is announced to Prometheus like training's (file_sd).

A rerun of the same command is the retry: finished shards are kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from svd.config import ConfigError
from svd.launch import LAUNCHERS

if TYPE_CHECKING:
    from svd.eval.job import EvaluateSettings
    from svd.eval.protocol import EvalProtocol
    from svd.eval.share import ShareResult


def check_settings(settings: EvaluateSettings) -> None:
    """Raises ConfigError naming the first launcher setting out of range, before anything is submitted."""
    if settings.launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={settings.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    for key in ("nodes", "ranks_per_node"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"{key}={getattr(settings, key)} must be ≥ 1")
    if settings.cpus_per_rank < 0:
        raise ConfigError(f"cpus_per_rank={settings.cpus_per_rank} must be ≥ 0 (0: the cluster's)")
    if settings.launcher == "local" and settings.ranks > 1:
        raise ConfigError(
            f"launcher=local runs this process only (nodes × ranks_per_node = {settings.ranks}): start "
            "several with torchrun or srun, or give launcher=slurm or launcher=ray"
        )


def evaluate_elsewhere(settings: EvaluateSettings, protocol: EvalProtocol, *, dry_run: bool = False) -> int:
    """Run the evaluation's processes on `settings.launcher` (slurm or ray); the exit status of
    jobs/evaluate.py: 0 done (or submitted), 1 a process failed (one line each), 2 the cluster's settings."""
    from svd.launch.slurm import cluster_config

    try:
        cluster = cluster_config(settings.cluster)
        if dry_run:
            print(describe(settings, protocol, cluster.gpus, settings.cpus_per_rank or cluster.cpus_per_task))
            return 0
        if settings.launcher == "slurm":
            return evaluate_on_slurm(settings, protocol)
        return report(evaluate_on_ray(settings, protocol), settings.ranks)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2


def describe(settings: EvaluateSettings, protocol: EvalProtocol, gpus: bool, cpus: int) -> str:
    what = "watch each checkpoint of" if settings.watch else f"checkpoint {settings.checkpoint} of"
    where = "a Slurm job" if settings.launcher == "slurm" else "Ray tasks"
    return (
        f"{protocol.name}: {what} {settings.run} in {settings.ranks} processes ({settings.nodes} × "
        f"{settings.ranks_per_node}) as {where} on cluster {settings.cluster}, {cpus} CPUs"
        f"{' and one GPU' if gpus else ''} each"
    )


def evaluation_task(
    settings: EvaluateSettings, protocol: EvalProtocol, rank: int | None = None, world_size: int | None = None
) -> ShareResult:
    """One process of the evaluation, in a Slurm task (its rank from Slurm's variables) or a Ray task (given
    its rank): its share, its watch endpoint announced to Prometheus under Slurm."""
    from svd.eval.job import rank_and_world
    from svd.eval.share import evaluate_share

    env_rank, env_world, local_rank = rank_and_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    with announced_watch(settings, protocol, rank):
        return evaluate_share(
            settings, protocol, rank=rank, world_size=world_size, local_rank=local_rank, progress=False
        )


@contextmanager
def announced_watch(settings: EvaluateSettings, protocol: EvalProtocol, rank: int) -> Iterator[None]:
    """Under Slurm, a watch's endpoint is announced to Prometheus (file_sd, as training's nodes are) once it
    serves, with the port it bound, and the announcement goes when the watch ends. The target's `job` is the
    evaluation's (`eval-<protocol>`: what `up` reports); the gauge's own series carry the run's job name,
    which Prometheus keeps (honor_labels)."""
    if not (settings.watch and settings.metrics_port and "SLURM_JOB_ID" in os.environ):
        yield
        return
    from svd.train.file_sd import Announcement, targets_dir

    job_id, node = os.environ["SLURM_JOB_ID"], os.environ.get("SLURMD_NODENAME", "localhost")
    job = f"eval-{protocol.name}"
    labels = {"job": job, "slurm_job_id": job_id, "node": node, "eval_rank": str(rank)}
    announcement = Announcement(f"{job}-{job_id}-{rank}", node, labels, str(targets_dir()))
    with announcement.requested():
        yield


def report(results: dict[int, ShareResult | str], ranks: int) -> int:
    """A line per merged evaluation and per failed process; 0 when every process finished."""
    from svd.eval.watch import summary

    for result in results.values():
        if not isinstance(result, str):
            for metrics in result.merged:
                print(f"{summary(metrics)} → {result.folders[metrics['step']]}")
    failed = {rank: error for rank, error in results.items() if isinstance(error, str)}
    for rank, error in sorted(failed.items()):
        print(f"evaluate: rank {rank} of {ranks} failed: {error}", file=sys.stderr)
    if failed:
        print(f"evaluate: {len(failed)} of {ranks} processes failed; rerun the same command", file=sys.stderr)
    return 1 if failed else 0


# ---- Slurm ---------------------------------------------------------------------------------------------
def evaluate_on_slurm(settings: EvaluateSettings, protocol: EvalProtocol) -> int:
    """One job of `nodes × ranks_per_node` tasks on the site of `settings.cluster`; with `wait`, the report
    once it ends."""
    import submitit

    from svd.launch.slurm import cluster_config, executor, job_error, sbatch_error, sbatch_parameters

    cluster = cluster_config(settings.cluster)
    params = sbatch_parameters(
        cluster,
        job_name=f"eval-{protocol.name}",
        nodes=settings.nodes,
        tasks_per_node=settings.ranks_per_node,
        cpus_per_task=settings.cpus_per_rank or cluster.cpus_per_task,
        gpus_per_node=settings.ranks_per_node,
        exclusive=False,  # evaluation shares nodes; the site's `exclusive` is for training
    )
    try:
        job = executor(settings.folder, params).submit(evaluation_task, settings, protocol)
    except submitit.core.utils.FailedJobError as e:
        print(f"evaluate: sbatch refused the job: {sbatch_error(str(e))}", file=sys.stderr)
        return 2
    print(f"slurm job {job.job_id}: {settings.ranks} processes, logs in {settings.folder}", flush=True)
    if not settings.wait:
        return 0
    try:
        results: dict[int, ShareResult | str] = dict(enumerate(job.results()))
    except Exception as e:  # a task failed: its traceback is in the log folder
        print(
            f"evaluate: slurm job {job.job_id} failed: {job_error(str(e))} (logs in {settings.folder}); "
            "rerun the same command",
            file=sys.stderr,
        )
        return 1
    return report(results, settings.ranks)


# ---- Ray -----------------------------------------------------------------------------------------------
def evaluate_on_ray(settings: EvaluateSettings, protocol: EvalProtocol) -> dict[int, ShareResult | str]:
    """As many Ray tasks as processes, on the cluster at `ray_address` or $RAY_ADDRESS, else on a local Ray
    sized to them; each its result, or its error in one line. A task whose worker died is retried by Ray (its
    shards already written are kept)."""
    from svd.launch.ray import cluster_address, cluster_description, error_line, ray_cluster
    from svd.launch.slurm import cluster_config

    cluster = cluster_config(settings.cluster)
    cpus = settings.cpus_per_rank or cluster.cpus_per_task
    address = cluster_address(settings.ray_address)
    local_cpus = max(cpus, min(settings.ranks * cpus, os.cpu_count() or 1))
    results: dict[int, ShareResult | str] = {}
    with ray_cluster(address, cpus=local_cpus, gpus=settings.ranks if cluster.gpus else 0) as ray:
        gpus = 1 if cluster.gpus and ray.cluster_resources().get("GPU", 0) > 0 else 0
        print(
            f"ray: {settings.ranks} evaluation processes ({cpus} CPUs{' and one GPU' if gpus else ''} each) "
            f"on {cluster_description(address)}",
            flush=True,
        )
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(evaluation_task)
        refs = [task.remote(settings, protocol, rank, settings.ranks) for rank in range(settings.ranks)]
        for rank, ref in enumerate(refs):
            try:
                results[rank] = ray.get(ref)
            except Exception as e:  # the task's error (RayTaskError.cause), or its worker died
                results[rank] = error_line(getattr(e, "cause", None) or e)
    return results
