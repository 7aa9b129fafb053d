"""`report.md` of an evaluated checkpoint and its pictures: the metrics, each metric against the step over
every checkpoint of the run evaluated so far, FVD against the sample count, and a contact sheet of the first
conditions' samples (middle frame) beside their references."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

CONTACT_SHEET_CONDITIONS = 8  # conditions shown (each shard keeps middle frames for these only)
THUMBNAIL_SIDE = 96  # pixels on the short side of a contact-sheet frame


def thumbnail(video: np.ndarray) -> np.ndarray:
    """The middle frame of a (T, H, W, 3) uint8 video, THUMBNAIL_SIDE px on its short side."""
    from PIL import Image

    frame = Image.fromarray(video[len(video) // 2])
    scale = THUMBNAIL_SIDE / min(frame.size)
    size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    return np.asarray(frame.resize(size, Image.Resampling.BILINEAR))


def contact_sheet(samples: list[np.ndarray], references: list[np.ndarray]) -> bytes:
    """PNG: a row of samples above a row of their references."""
    from PIL import Image

    h, w = samples[0].shape[:2]
    sheet = Image.new("RGB", (w * len(samples), 2 * h), "white")
    for i, (sample, reference) in enumerate(zip(samples, references, strict=True)):
        sheet.paste(Image.fromarray(sample), (i * w, 0))
        sheet.paste(Image.fromarray(reference).resize((w, h)), (i * w, h))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str) -> bytes:
    """PNG: one line per series of (x, y) points."""
    return line_plots([(title, series)], xlabel)


def line_plots(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], xlabel: str) -> bytes:
    """PNG: the panels side by side, each (title, series) drawn as one line per series of (x, y) points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, len(panels))
    figure, axes = plt.subplots(1, count, figsize=(5 * count, 3.5), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels, strict=False):
        for label, points in series.items():
            if points:
                ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label)
        ax.set(title=title, xlabel=xlabel)
        if len(series) > 1:
            ax.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def report(metrics: dict[str, Any], pictures: list[tuple[str, str]]) -> str:
    """Markdown: the metrics of this step, then each (caption, file) picture."""
    lines = [
        f"# {metrics['protocol']} at step {metrics['step']}",
        "",
        f"Run `{metrics['run']}`, {metrics['samples']} samples, code {metrics['code_version']}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {json.dumps(value)} |" for key, value in metrics["values"].items()]
    lines += ["", *(f"- {line}" for line in metrics.get("skipped", []))] if metrics.get("skipped") else []
    for caption, name in pictures:
        lines += ["", f"## {caption}", "", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"
