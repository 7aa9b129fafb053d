"""Evaluate a checkpoint of a run under a protocol of jobs/conf/eval/, the way the paper measured models.

    python jobs/evaluate.py run=s3://bucket/runs/i2v eval=motion_adherence
    python jobs/evaluate.py run=s3://bucket/runs/i2v checkpoint=12000 eval=i2v_holdout \\
        eval.feature_network=s3://models/i3d_torchscript.pt eval.feature_sha256=<its sha256>
    python jobs/evaluate.py run=… eval=motion_adherence eval.samples=16 --dry-run    # the plan, nothing run
    python jobs/evaluate.py run=… eval=motion_adherence watch=true    # each checkpoint as training saves it
    python jobs/evaluate.py compare=s3://b/runs/lvd_f,s3://b/runs/unfiltered eval=i2v_holdout  # table, plot

Protocols: i2v_holdout (FVD), ucf101_zero_shot (FVD), interpolation_holdout (PSNR, SSIM), motion_adherence
(Spearman ρ of the motion asked for and measured; no downloaded weights). With eval.clip=<local folder of a
CLIP model in the Hugging Face layout>, every protocol also reports the CLIP similarity of the frames to the
prompt and (of an image-to-video model) to the conditioning image; without it, one line says they are
skipped. Any protocol setting can be overridden as eval.<key>=<value>. Results go to
<run>/eval/<protocol>/step-<N>/ (or out=…): metrics.json, samples.lance, report.md and the sampled videos.

held_out=table samples every held-out clip of the table instead of the run's (its data.filter left out):
runs trained on different filters are then sampled on the same conditions (jobs/ablate.py does this).

watch=true evaluates every checkpoint of the run as it lands (poll_s=60), beside the training, until its last
step; each metric is also a Prometheus gauge svd_eval_metric{job, stage, protocol, metric, step} on
metrics_port (24600, or the next free port). SIGTERM or Ctrl-C stops it after the shard under way.

Preemptible: finished shards are kept, and the same command finishes the rest. Several processes split the
shards between them (RANK and WORLD_SIZE as torch's launchers set them, or Slurm's SLURM_PROCID and
SLURM_NTASKS: `srun -n 8 python jobs/evaluate.py …`); the result does not depend on how many there were.
launcher=slurm submits them as one job of nodes × ranks_per_node tasks (cluster=<site> of jobs/conf/cluster/,
folder= for its logs, wait=false to submit only), launcher=ray runs them as Ray tasks (ray_address=, else
$RAY_ADDRESS, else a local Ray); cpus_per_rank=0 takes the cluster's cpus_per_task. With watch=true that is a
job beside the training's; under Slurm each task's endpoint is announced to Prometheus as training's are.

Exit status: 0 evaluated (or this process's part done); 1 the run, its checkpoint, the store or the feature
network cannot be used (one line on stderr naming it); 2 bad arguments.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from svd.config import ConfigError, parse_settings

if TYPE_CHECKING:
    from svd.eval.job import EvaluateSettings
    from svd.eval.protocol import EvalProtocol
from svd.errors import described


def parse(argv: list[str]) -> tuple[object, object, bool]:
    from svd.eval.job import EvaluateSettings
    from svd.eval.protocol import load_protocol

    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("eval=")), "")
    overrides = [a.removeprefix("eval.") for a in argv if a.startswith("eval.")]
    rest = [a for a in argv if not a.startswith(("eval=", "eval."))]
    if not name:
        raise ConfigError("eval=<protocol> is required (see --help)")
    settings = parse_settings(EvaluateSettings, rest)
    if not settings.run and not settings.compare:
        raise ConfigError("run=<run directory> is required (see --help)")
    return settings, load_protocol(name, overrides), dry_run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        settings, protocol, dry_run = parse(argv)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2

    if settings.compare:
        return compare(settings, protocol.name)
    from svd.launch.evaluation import check_settings, evaluate_elsewhere

    try:
        check_settings(settings)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if not dry_run:
        from svd.eval.job import skipped

        for line in skipped(protocol):
            print(line, flush=True)
    if settings.launcher != "local":
        return evaluate_elsewhere(settings, protocol, dry_run=dry_run)
    return evaluate_here(settings, protocol, dry_run=dry_run)


def evaluate_here(settings: EvaluateSettings, protocol: EvalProtocol, *, dry_run: bool) -> int:
    """This process's share (all of it, unless torchrun or srun started several: their rank variables)."""
    from svd.data.storage import Storage
    from svd.eval.features import FeatureNetworkError
    from svd.eval.job import rank_and_world
    from svd.eval.share import evaluate_share, open_evaluation
    from svd.eval.watch import summary
    from svd.train.trained import RunError

    rank, world, local_rank = rank_and_world()
    try:
        if dry_run:
            evaluation = open_evaluation(
                settings, protocol, Storage.from_env(), rank=rank, world_size=world, local_rank=local_rank
            )
            step = evaluation.step()
            every, todo = evaluation.plan(step)
            print(
                f"{protocol.name} of {settings.run} at step {step}: {protocol.samples} conditions in "
                f"{len(every)} shards; {len(todo)} to sample on rank {rank} of {world}; "
                f"results in {evaluation.folder(step)}"
            )
            return 0
        result = evaluate_share(settings, protocol, rank=rank, world_size=world, local_rank=local_rank)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    except (RunError, FeatureNetworkError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a store that cannot be read or written
        print(f"evaluate: {described(e)}", file=sys.stderr)
        return 1
    if settings.watch:
        return 0  # the watch said what it evaluated as it went
    if not result.merged:
        print(
            f"{protocol.name} at step {result.steps[0]}: rank {rank}'s shards done; the last rank to finish "
            "merges"
        )
        return 0
    metrics = result.merged[0]
    print(f"{summary(metrics)} → {result.folders[metrics['step']]}")
    return 0


def compare(settings: EvaluateSettings, protocol: str) -> int:
    """Print the protocol's evaluations of each run; plot them to out= (default compare-<protocol>.png)."""
    from pathlib import Path

    from svd.data.storage import Storage
    from svd.eval.compare import evaluated, plot, table
    from svd.train.trained import RunError

    storage = Storage.from_env()
    runs = [r for r in settings.compare.split(",") if r]
    try:
        results = {run: evaluated(run, protocol, storage) for run in runs}
    except RunError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    print(table(results))
    out = Path(settings.out or f"compare-{protocol}.png")
    out.write_bytes(plot(results, protocol))
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
