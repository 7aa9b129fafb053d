"""The same protocol across runs and steps: a table and a plot of each metric against the step (the paper's
curation ablation is this comparison: same budget, different recipes)."""

from __future__ import annotations

import io
import json
from typing import Any

from svd.data.storage import Storage, join
from svd.train.trained import RunError


def evaluated(run: str, protocol: str, storage: Storage) -> list[dict[str, Any]]:
    """Every `metrics.json` of `protocol` in `run`, by step."""
    folder = join(run, "eval", protocol)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for ms in results.values() for m in ms for k, v in m["values"].items() if _scalar(v)})
    figure, axes = plt.subplots(1, max(1, len(names)), figsize=(5 * max(1, len(names)), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for run, metrics in results.items():
            points = [(m["step"], m["values"][name]) for m in metrics if _scalar(m["values"].get(name))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=run.rstrip("/").rsplit("/", 1)[-1])
        ax.set(title=f"{protocol}: {name}", xlabel="step")
        ax.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def _scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
