"""A checkpoint's lineage: what it takes to recompute which clip every rank read at every step (DESIGN 11).

The sample order is a pure function of (seed, table version, filter, buckets) and the samples consumed, so
nothing per sample is logged. What the loader state alone does not say is recorded here, beside it in the
checkpoint's `data` part (`data["lineage"]`):

- the table (URI, pinned version, content digest), filter, bucket shapes and order seed;
- `segments`: one per start of the run directory (fresh or resumed): the step it began after, its world size,
  per-rank batch sizes and gradient accumulation, the samples consumed per bucket at its start, its resolved
  config and code version. Stream positions map to (step, rank) through them;
- `replaced`: (bucket, position, position read instead, reason) for every sample replaced because it could not
  be decoded or was excluded: they depend on which videos failed, so the ranks gather them at each checkpoint;
- `exclusions`: each takedown list in force (`data.exclude`), from the step after which it applies;
- `curation`: the curation provenance the table carries in its schema metadata (`svd.*` keys), if any;
- `init_from`: the checkpoint folder this stage started from, whose own lineage continues the story.

`jobs/provenance.py` (svd/train/provenance.py) answers from it.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lance

from svd.data.loader import ClipLoader
from svd.data.schema import VERSION_KEY

FORMAT = 1


def begin(
    previous: dict[str, Any] | None,
    *,
    step: int,
    loader: ClipLoader,
    world_size: int,
    accumulation: int,
    config_yaml: str,
    init_from: dict[str, Any] | None,
    curation: dict[str, Any],
) -> dict[str, Any]:
    """The lineage of a run that starts (or resumes, continuing `previous`) after `step`: a new segment, and
    a new exclusion entry when the takedown list changed."""
    state = loader.state
    lineage = previous or {
        "format": FORMAT,
        "table": loader.cfg.table,
        "table_version": state.table_version,
        "table_content": state.table_content,
        "filter": state.filter,
        "buckets": state.buckets,
        "seed": state.seed,
        "curation": curation,
        "init_from": init_from,
        "segments": [],
        "replaced": [],
        "exclusions": [],
    }
    now = _now()
    lineage["segments"].append(
        {
            "step": step,
            "world_size": world_size,
            "batch_sizes": [b.batch_size for b in loader.cfg.buckets],
            "accumulation": accumulation,
            "consumed": list(state.consumed),
            "time": now,
            "code": code_version(),
            "config": config_yaml,
        }
    )
    exclusion = loader.exclusion
    current = (exclusion.uri, exclusion.digest) if exclusion else (None, None)
    last = lineage["exclusions"][-1] if lineage["exclusions"] else {"uri": None, "digest": None}
    if current != (last["uri"], last["digest"]):
        lineage["exclusions"].append(
            {
                "step": step,  # in force for the steps after it
                "uri": current[0],
                "digest": current[1],
                "names": len(exclusion.names) if exclusion else 0,
                "time": now,
            }
        )
    return lineage


def with_replaced(lineage: dict[str, Any], replaced: list[list[Any]]) -> dict[str, Any]:
    """The lineage at a checkpoint: the replacements every rank made since the last one added (sorted, so
    every rank holds the same document)."""
    lineage["replaced"] = sorted(lineage["replaced"] + [list(r) for r in replaced])
    return lineage


def exclusion_in_force(earlier: dict[str, Any] | None) -> str | None:
    """The takedown list a run (or the stage it started from) last had in force. A takedown stays in force:
    a resumed run, or a later stage, that names no list of its own goes on excluding it."""
    exclusions = (earlier or {}).get("exclusions") or []
    return exclusions[-1]["uri"] if exclusions else None


def curation_provenance(table: lance.LanceDataset) -> dict[str, Any]:
    """The `svd.*` schema metadata a curated table carries (recipe, config hash, scoring models' checksums,
    when written, latents' encoding), JSON-decoded where it is JSON; the schema version is left out."""
    found: dict[str, Any] = {}
    for key, raw in (table.schema.metadata or {}).items():
        if not key.startswith(b"svd.") or key == VERSION_KEY:
            continue
        try:
            found[key.decode()] = json.loads(raw)
        except ValueError:
            found[key.decode()] = raw.decode(errors="replace")
    return found


def code_version() -> dict[str, Any]:
    """svd's package version and, in a git checkout, the commit and whether files differ from it."""
    try:
        version: str | None = importlib.metadata.version("svd")
    except importlib.metadata.PackageNotFoundError:
        version = None
    root = str(Path(__file__).resolve().parents[2])
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"svd": version, "git": commit, "dirty": bool(dirty) if commit else None}


def _git(root: str, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
