"""Launchers decide where the ranks start and how they find each other; every rank then runs the same
`svd.train.run(cfg)`.

Each launcher module (`local`, `slurm`, `ray`) offers the same two functions, so `jobs/launch.py` treats them
alike:

- `dry_run(cfg: RunConfig) -> str`: what would be submitted (the sbatch script, the scaling config …),
  without submitting.
- `launch(cfg: RunConfig) -> int`: start the training job; prints where it runs; the exit status.

Curation runs its shards on the same clusters through `svd.curate.shards`, which uses the `slurm` and `ray`
modules' cluster helpers.
"""

from __future__ import annotations

import importlib
from types import ModuleType

LAUNCHERS = ("local", "slurm", "ray")


def launcher_module(name: str) -> ModuleType:
    if name not in LAUNCHERS:
        raise ValueError(f"launcher {name!r}: expected one of {', '.join(LAUNCHERS)}")
    return importlib.import_module(f"svd.launch.{name}")
