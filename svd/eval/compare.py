"""The same protocol across runs and steps: a table and a plot of each metric against the step (the paper's
curation ablation is this comparison: same budget, different recipes)."""

from __future__ import annotations

import json
from typing import Any

from svd.data.storage import Storage, join
from svd.eval.report import line_plots
from svd.train.trained import RunError


def evaluated(run: str, protocol: str, storage: Storage) -> list[dict[str, Any]]:
    """Every `metrics.json` of `protocol` in `run`, by step."""
    return evaluated_in(join(run, "eval", protocol), storage)


def evaluated_in(folder: str, storage: Storage) -> list[dict[str, Any]]:
    """Every `metrics.json` of the step folders in `folder` (a protocol's results), by step."""
    try:
        fs, path = storage.fsspec(folder)
        fs.invalidate_cache(path)
        files = sorted(fs.glob(f"{path}/step-*/metrics.json"))
        return sorted((json.loads(fs.cat_file(f)) for f in files), key=lambda m: m["step"])
    except Exception as e:  # any storage client's error
        raise RunError(f"cannot read the evaluations in {folder}: {e}") from e


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One line per run and evaluated step: its scalar metrics."""
    names = sorted({k for ms in results.values() for m in ms for k, v in m["values"].items() if _scalar(v)})
    width = max([len(run) for run in results] + [3])
    lines = [f"{'run':{width}}  {'step':>8}  " + "  ".join(f"{n:>14}" for n in names)]
    for run, metrics in results.items():
        if not metrics:
            lines.append(f"{run:{width}}  {'-':>8}  (no evaluation of this protocol)")
        for m in metrics:
            cells = [
                f"{m['values'][n]:14.4g}" if _scalar(m["values"].get(n)) else f"{'-':>14}" for n in names
            ]
            lines.append(f"{run:{width}}  {m['step']:8d}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(results: dict[str, list[dict[str, Any]]], protocol: str) -> bytes:
    """PNG: each scalar metric against the step, a line per run."""
    names = sorted({k for ms in results.values() for m in ms for k, v in m["values"].items() if _scalar(v)})
    panels = [
        (
            f"{protocol}: {name}",
            {
                run.rstrip("/").rsplit("/", 1)[-1]: [
                    (m["step"], m["values"][name]) for m in metrics if _scalar(m["values"].get(name))
                ]
                for run, metrics in results.items()
            },
        )
        for name in names
    ]
    return line_plots(panels, "step")


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
