"""Whether a model follows its micro-conditioning: the rank correlation between the value asked for
(`motion_bucket_id`, `fps_id`) and the value measured on the samples (curation's own optical-flow motion
score), the paper's claim that micro-conditioning controls motion. Needs no downloaded weights."""

from __future__ import annotations

import numpy as np


def spearman(requested: np.ndarray, measured: np.ndarray) -> float:
    """Spearman's ρ: Pearson's correlation of the ranks, ties given their average rank. NaN when either
    side is constant (no order to follow)."""
    x, y = np.asarray(requested, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"requested {x.shape} and measured {y.shape} must be two vectors of one length")
    if len(x) < 2:
        raise ValueError(f"a rank correlation needs at least 2 samples, got {len(x)}")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    scale = np.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / scale) if scale > 0 else float("nan")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, equal values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 … end
    return ranks


def motion_score(video: np.ndarray, fps: float) -> float:
    """Curation's motion score of a generated video (frames, height, width, 3) uint8 at `fps`: grey frames at
    2 fps, 16 px on the short side (INTER_AREA, as the curation scan reads them), Farnebäck flow."""
    import cv2

    from svd.curate.motion import measure_motion
    from svd.curate.scan import scaled_size

    motion_fps, side = 2.0, 16
    times = np.arange(len(video)) / fps
    picked, next_time = [], 0.0
    for frame, time in zip(video, times, strict=True):
        if time + 1e-6 >= next_time:
            picked.append(frame)
            next_time += 1.0 / motion_fps
    size = scaled_size(video.shape[2], video.shape[1], short_side=side)  # (width, height), as curation's
    grey = [
        cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in picked
    ]
    return measure_motion(np.stack(grey), motion_fps).score
