"""Run one curation as N shards on Ray tasks or a Slurm job array: task i curates `shard=i/N` of the same
input into the same table, and the submitter prints a line per shard and the total, whichever ran them.

The clusters are training's (the same Ray cluster, the same site settings of jobs/conf/cluster/), so where the
tasks start is the launchers' (`svd.launch.ray`, `svd.launch.slurm`); what each task runs and what is reported
is curation's. The launch modules are imported when used: each needs its own extra (ray, or slurm's submitit),
and every task imports this module to run `curate_shard`.

A rerun of the same command is the retry: a shard skips the videos already in the table.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svd.curate.config import CurateConfig
    from svd.curate.pipeline import RunSummary


def run_shards(cfg: CurateConfig) -> int:
    """Curate `cfg.shards` shards where `cfg.launcher` (ray or slurm) runs them; the exit status of
    jobs/curate.py."""
    if cfg.launcher == "ray":
        return report_shards(curate_on_ray(cfg), cfg.shards)
    if cfg.launcher == "slurm":
        return curate_on_slurm(cfg)
    raise ValueError(f"launcher={cfg.launcher!r}: shards run on launcher=ray or launcher=slurm")


def shard_configs(cfg: CurateConfig) -> list[CurateConfig]:
    """What each of the `cfg.shards` tasks curates: shard i/shards, locally."""
    return [
        dataclasses.replace(cfg, shard=f"{i}/{cfg.shards}", shards=1, launcher="local")
        for i in range(cfg.shards)
    ]


def curate_shard(cfg: CurateConfig) -> RunSummary:
    """One task: the local curation of one shard; its summary goes back to the submitter."""
    from svd.curate.pipeline import run

    return run(cfg, progress=False)


@dataclass
class ShardResults:
    """What came back from the curation shards."""

    summaries: dict[int, RunSummary]  # by shard index, of the shards that finished
    failures: dict[int, str]  # by shard index: the error, in one line

    @property
    def total(self) -> RunSummary:
        from svd.curate.pipeline import RunSummary

        total = RunSummary(videos_in_shard=0, skipped_existing=0, status=Counter())
        for s in self.summaries.values():
            total.videos_in_shard += s.videos_in_shard
            total.skipped_existing += s.skipped_existing
            total.curated += s.curated
            total.clips += s.clips
            total.status.update(s.status)
            total.errors += s.errors
        return total


def report_shards(results: ShardResults, shards: int) -> int:
    """A line per shard and the total, whichever launcher ran them; 0 when every shard finished without
    transient failures, else 1 (a rerun of the same command retries what is missing)."""
    for i in range(shards):
        if i in results.summaries:
            print(f"shard {i}/{shards}: {_summary_line(results.summaries[i])}")
        else:
            print(f"curate: shard {i}/{shards} failed: {results.failures[i]}", file=sys.stderr)
    total = results.total
    print(f"{len(results.summaries)} of {shards} shards: {_summary_line(total)}")
    for status, count in total.status.most_common():
        print(f"  {status}: {count}")
    if total.transient:
        print(
            f"curate: {total.transient} videos failed for a reason a rerun may not meet again; rerun the "
            "same command to retry them",
            file=sys.stderr,
        )
    if results.failures:
        print(
            f"curate: {len(results.failures)} of {shards} shards failed; rerun the same command",
            file=sys.stderr,
        )
    return 1 if results.failures or total.transient else 0


def _summary_line(s: RunSummary) -> str:
    return (
        f"{s.videos_in_shard} inputs, {s.skipped_existing} already in the table, {s.curated} curated → "
        f"{s.clips} clips"
    )


def _cpus_per_shard(cfg: CurateConfig) -> int:
    return cfg.cpus_per_shard or cfg.workers + 1


# ---- Ray -----------------------------------------------------------------------------------------------
def curate_on_ray(cfg: CurateConfig) -> ShardResults:
    """Run the shards as Ray tasks on the cluster at $RAY_ADDRESS, else on a local Ray sized to them. A
    task that dies with its worker is retried by Ray (curation skips what is already in the table); an
    error of the pipeline is not."""
    from svd.launch.ray import cluster_address, cluster_description, error_line, ray_cluster

    cpus = _cpus_per_shard(cfg)
    address = cluster_address("")
    results = ShardResults({}, {})
    # A local Ray of this host's CPUs (at least one shard's): the shards beyond wait their turn
    local_cpus = max(cpus, min(cfg.shards * cpus, os.cpu_count() or 1))
    with ray_cluster(address, cpus=local_cpus, gpus=cfg.shards * cfg.gpus_per_shard) as ray:
        print(
            f"ray: {cfg.shards} curation shards ({cpus} CPUs each) on {cluster_description(address)}",
            flush=True,
        )
        task = ray.remote(num_cpus=cpus, num_gpus=cfg.gpus_per_shard)(curate_shard)
        refs = [task.remote(shard) for shard in shard_configs(cfg)]
        for i, ref in enumerate(refs):
            try:
                results.summaries[i] = ray.get(ref)
            except Exception as e:  # the task's error (RayTaskError.cause), or the task's worker died
                results.failures[i] = error_line(getattr(e, "cause", None) or e)
    return results


# ---- Slurm ---------------------------------------------------------------------------------------------
def curate_on_slurm(cfg: CurateConfig) -> int:
    """A job array of `cfg.shards` tasks on the site of `cfg.cluster`, each curating one shard into the same
    table; with `cfg.wait`, the report of every shard once all have ended. Status 2 when the cluster's
    settings are wrong or sbatch refuses the array."""
    import submitit

    from svd.config import ConfigError
    from svd.launch.slurm import cluster_config, executor, job_error, sbatch_error, sbatch_parameters

    try:
        params = sbatch_parameters(
            cluster_config(cfg.cluster),
            job_name="curate",
            nodes=1,
            tasks_per_node=1,
            cpus_per_task=_cpus_per_shard(cfg),
            gpus_per_node=cfg.gpus_per_shard,
            exclusive=False,  # shards share nodes; the site's `exclusive` is for training
        )
        jobs = executor(cfg.folder, params).map_array(curate_shard, shard_configs(cfg))
    except ConfigError as e:
        print(f"curate: {e}", file=sys.stderr)
        return 2
    except submitit.core.utils.FailedJobError as e:
        print(f"curate: sbatch refused the job array: {sbatch_error(str(e))}", file=sys.stderr)
        return 2
    print(
        f"slurm job array {jobs[0].job_id.split('_')[0]}: {cfg.shards} shards, logs in {cfg.folder}",
        flush=True,
    )
    if not cfg.wait:
        return 0
    results = ShardResults({}, {})
    for i, job in enumerate(jobs):
        try:
            results.summaries[i] = job.result()
        except Exception as e:
            results.failures[i] = f"{job_error(str(e))} (job {job.job_id}, logs in {cfg.folder})"
    return report_shards(results, cfg.shards)
