"""Processes on this host: `gpus_per_node` ranks found through a rendezvous on 127.0.0.1.

One rank runs in this process (no start-up cost: the demo and quick runs). Several are started by
PyTorch's elastic agent (what `torchrun` uses): it sets the torch.distributed environment of each rank,
and when one rank dies it stops the others and reports the failure, so a broken run ends instead of
hanging. Every rank then calls `svd.train.run`, like under Slurm or Ray.
"""

from __future__ import annotations

import sys
import uuid

from svd.config import RunConfig, from_yaml, to_yaml
from svd.data.local_s3 import free_port
from svd.train import run
from svd.train.trainer import TrainResult


def _rank_main(config_yaml: str) -> TrainResult:
    return run(from_yaml(config_yaml))


def dry_run(cfg: RunConfig) -> str:
    port = cfg.launcher.master_port or "a free port"
    if cfg.gpus_per_node == 1:
        return "1 rank in this process"
    return (
        f"{cfg.gpus_per_node} processes on this host under torch's elastic agent, rendezvous 127.0.0.1:{port}"
    )


def launch(cfg: RunConfig) -> int:
    try:
        result = launch_local(cfg)
    except Exception as e:  # a rank failed: the elastic agent already stopped the others
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"launch: training failed: {type(e).__name__}: {first_line}", file=sys.stderr)
        return 1
    print(f"done: {result.steps} steps in {cfg.checkpoint.run_dir}")
    return 0


def launch_local(cfg: RunConfig) -> TrainResult:
    if cfg.nodes != 1:
        raise ValueError(f"launcher=local runs on this host only: nodes={cfg.nodes} must be 1")
    from svd.train.metrics import MetricsConfig, launch_multiprocess_dir

    # the metrics module's config (it knows the folder), as the Slurm and Ray launchers build it
    with launch_multiprocess_dir(MetricsConfig(port=cfg.metrics.port), cfg.job_name):
        return run(cfg) if cfg.gpus_per_node == 1 else _launch_ranks(cfg)


def _launch_ranks(cfg: RunConfig) -> TrainResult:
    """`gpus_per_node` ranks on this host, by torch's elastic agent (as torchrun)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cfg.launcher.master_port or free_port()
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=cfg.gpus_per_node,
        run_id=f"svd-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    results = elastic_launch(launch, _rank_main)(to_yaml(cfg))
    return results[0]
