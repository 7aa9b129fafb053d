"""Training: `svd.train.run(cfg)` is the one entry point of every rank, whichever launcher started it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svd.config import RunConfig
    from svd.train.stop import StopRequest
    from svd.train.trainer import TrainResult


def run(cfg: RunConfig, stop: StopRequest | None = None) -> TrainResult:
    """Joins the process group described by the environment, trains the configured stage (until `stop`
    is set: a checkpoint, then return), leaves."""
    from svd.train.trainer import run as run_rank

    return run_rank(cfg, stop)
