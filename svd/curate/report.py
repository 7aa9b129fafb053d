"""A curation report: what each stage kept, how every score is distributed (with the recipe's thresholds
drawn in), what the clips look like, and what the recipe leaves for training.

Writes `report.md` with `scores.png`, `camera_motion.png` and `contact_sheet.png` beside it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lance
import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt
import numpy as np

from svd.curate.ledger import log_uri
from svd.curate.recipes import SCORE_COLUMNS, Recipe, RecipeResult, compute_filter
from svd.curate.scan import grab_frames
from svd.data.schema import CAMERA_MOTIONS
from svd.data.storage import Storage


def _histograms(columns: dict[str, np.ndarray], result: RecipeResult | None, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, name in zip(axes.flat, SCORE_COLUMNS, strict=True):
        values = columns[name][~np.isnan(columns[name])]
        ax.hist(values, bins=40, color="#4c72b0") if len(values) else ax.text(
            0.5, 0.5, "not scored", ha="center"
        )
        for label, threshold in (result.thresholds if result else {}).items():
            if label.startswith(name):
                ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"recipe: {threshold:.3g}")
                ax.legend(fontsize=8)
        ax.set_title(f"{name} ({len(values)} clips)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _camera_chart(cameras: list[str | None], path: Path) -> Counter:
    counts = Counter(c or "unscored" for c in cameras)
    fig, ax = plt.subplots(figsize=(8, 3))
    labels = [c for c in (*CAMERA_MOTIONS, "unscored") if counts[c]]
    ax.bar(labels, [counts[c] for c in labels], color="#55a868")
    ax.set_title("camera motion")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return counts


def _contact_sheet(rows: list[dict], storage: Storage, path: Path) -> None:
    """First, middle and last frame of each sampled clip, one clip per row."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 1.6 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows, strict=True):
        times = [
            row["start_s"],
            (row["start_s"] + row["end_s"]) / 2,
            max(row["start_s"], row["end_s"] - 0.05),
        ]
        try:
            frames = grab_frames(storage.reader(row["video_uri"]), times, short_side=96)
        except Exception as e:  # a report must not fail on one unreadable sample
            frames = [np.zeros((96, 96, 3), np.uint8)] * 3
            ax_row[0].set_title(f"unreadable: {type(e).__name__}", fontsize=7)
        for ax, frame in zip(ax_row, frames, strict=True):
            ax.imshow(frame)
            ax.axis("off")
        scores = ", ".join(f"{k.split('_')[0]} {row[k]:.2f}" for k in SCORE_COLUMNS if row.get(k) is not None)
        ax_row[1].set_title(f"{row['clip_id']} · {row.get('camera_motion')} · {scores}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(
    table_uri: str,
    out_dir: str | Path,
    storage: Storage,
    recipe: Recipe | None = None,
    samples: int = 8,
    seed: int = 0,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = lance.dataset(table_uri, storage_options=storage.lance_options(table_uri))
    data = table.to_table(
        columns=["clip_id", "video_uri", "start_s", "end_s", "camera_motion", *SCORE_COLUMNS]
    )
    columns = {n: data.column(n).to_numpy(zero_copy_only=False).astype(np.float64) for n in SCORE_COLUMNS}
    hours = float((data.column("end_s").to_numpy() - data.column("start_s").to_numpy()).sum() / 3600)
    result = compute_filter(table_uri, recipe, storage) if recipe else None

    _histograms(columns, result, out / "scores.png")
    cameras = _camera_chart(data.column("camera_motion").to_pylist(), out / "camera_motion.png")
    rows = data.to_pylist()
    picks = np.random.default_rng(seed).choice(len(rows), size=min(samples, len(rows)), replace=False)
    _contact_sheet([rows[i] for i in sorted(picks)], storage, out / "contact_sheet.png")

    lines = [f"# Curation report: `{table_uri}` (version {table.version})", "", "## Stages", ""]
    try:
        log = lance.dataset(log_uri(table_uri), storage_options=storage.lance_options(log_uri(table_uri)))
        status = Counter(log.to_table(columns=["status"]).column("status").to_pylist())
        lines.append(f"- videos and images processed: {sum(status.values())}")
        lines += [f"  - {name}: {count}" for name, count in status.most_common()]
    except (ValueError, OSError):
        lines.append("- (no video log beside the table)")
    lines += [f"- clips: {len(rows)} ({hours:.2f} hours)", ""]
    lines += [
        "## Scores",
        "",
        "![scores](scores.png)",
        "",
        "| score | scored | p25 | median | p75 |",
        "|---|---|---|---|---|",
    ]
    for name, values in columns.items():
        v = values[~np.isnan(values)]
        q = np.quantile(v, [0.25, 0.5, 0.75]) if len(v) else [np.nan] * 3
        lines.append(f"| {name} | {len(v)} | {q[0]:.3g} | {q[1]:.3g} | {q[2]:.3g} |")
    lines += ["", "![camera motion](camera_motion.png)", ""]
    lines += [", ".join(f"{k}: {v}" for k, v in cameras.most_common()), ""]
    if result:
        share = result.kept / max(result.total, 1)
        lines += [f"## Recipe `{result.recipe}`", "", f"Filter: `{result.filter}`", ""]
        lines += [f"- {label}: {value:.4g}" for label, value in result.thresholds.items()]
        lines += ["", f"**Kept {result.kept} of {result.total} clips ({share:.1%}).**", ""]
    lines += ["## Sample clips", "", "![contact sheet](contact_sheet.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
