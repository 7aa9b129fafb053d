"""Launchers decide where the ranks start and how they find each other; every rank then runs the same
`svd.train.run(cfg)`.

Each launcher module (`local`, `slurm`, `ray`) offers the same three functions, so `jobs/launch.py` and
`jobs/curate.py` treat them alike:

- `dry_run(cfg: RunConfig) -> str`: what would be submitted (the sbatch script, the scaling config …),
  without submitting.
- `launch(cfg: RunConfig) -> int`: start the training job; prints where it runs; the exit status.
- `curate_shards(cfg: CurateConfig) -> int`: run `cfg.shards` curation shards (not `local`).
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from svd.curate.config import CurateConfig
    from svd.curate.pipeline import RunSummary

LAUNCHERS = ("local", "slurm", "ray")


def launcher_module(name: str) -> ModuleType:
    if name not in LAUNCHERS:
        raise ValueError(f"launcher {name!r}: expected one of {', '.join(LAUNCHERS)}")
    return importlib.import_module(f"svd.launch.{name}")


def shard_configs(cfg: CurateConfig) -> list[CurateConfig]:
    """What each of the `cfg.shards` tasks of a launcher curates: shard i/shards, locally."""
    return [
        dataclasses.replace(cfg, shard=f"{i}/{cfg.shards}", shards=1, launcher="local")
        for i in range(cfg.shards)
    ]


def curate_shard(cfg: CurateConfig) -> RunSummary:
    """One task: the local curation of one shard; its summary goes back to the submitter."""
    from svd.curate.pipeline import run

    return run(cfg, progress=False)
