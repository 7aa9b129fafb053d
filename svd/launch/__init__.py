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
import sys
from collections import Counter
from dataclasses import dataclass
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


@dataclass
class ShardResults:
    """What came back from a launcher's curation shards."""

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
