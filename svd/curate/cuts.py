"""Cut detection: a cascade of change detectors at three time scales, so hard cuts *and* gradual
transitions (dissolves, fades through black) are found — the paper's remedy for a single detector that
misses fades (§3.1: "a cascade of 3 cut detectors operating at different frame rates").

For a stride of k frames, d_k(t) is the mean absolute difference of the (half-size, RGB) thumbnails of
frames t − k and t; between neighbours it is taken at the best of nine one-pixel offsets, so that small
motion cancels while a new scene does not. A hard cut is a spike in d_1; a dissolve over n frames barely
moves d_1 but makes d_k peak for k ≳ n. Camera motion raises d_k steadily rather than in a peak, so each
detector compares d_k with its running median (a local baseline) as well as with an absolute floor.
Blank frames (black or white, as in the middle of a fade) count as part of a transition. Detections of all
scales are merged; each transition's frames belong to no clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class Detector:
    stride_s: float  # time between the compared frames; 0 means adjacent frames
    min_change: float  # mean absolute difference (0..255) a transition must reach
    min_ratio: float  # and how many times its local baseline


@dataclass(frozen=True)
class CutConfig:
    cascade: tuple[Detector, ...] = (
        Detector(0.0, 20.0, 3.0),  # hard cuts
        Detector(0.25, 22.0, 2.0),  # short dissolves and fades
        Detector(1.0, 25.0, 1.8),  # long ones
    )
    blank_std: float = 8.0  # a thumbnail with less pixel spread than this is blank
    baseline_s: float = 2.0  # half-width of the window of the running median
    min_clip_s: float = 2.0  # shorter segments between transitions are dropped
    max_clip_s: float | None = None  # longer ones are split into equal parts no longer than this


@dataclass(frozen=True)
class Transition:
    """Frames [first, last] that belong to no clip. A hard cut before frame t is (t, t − 1): empty."""

    first: int
    last: int

    @property
    def center(self) -> float:
        return (self.first + self.last) / 2


def _running_median(values: np.ndarray, half_width: int) -> np.ndarray:
    padded = (
        np.pad(values, half_width, mode="reflect")
        if len(values) > half_width
        else np.pad(values, half_width, mode="edge")
    )
    return np.median(sliding_window_view(padded, 2 * half_width + 1), axis=1)[: len(values)]


def _peaks(score_ok: np.ndarray, values: np.ndarray) -> list[int]:
    """The middle of the near-maximal part of each run of qualifying values (a plateau's centre)."""
    peaks = []
    idx = np.flatnonzero(score_ok)
    if not len(idx):
        return peaks
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    for run in runs:
        top = run[values[run] >= 0.95 * values[run].max()]
        peaks.append(int(top[len(top) // 2]))
    return peaks


_YUV_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], np.float32)


def _half_rgb(thumbnails: np.ndarray) -> np.ndarray:
    """2×2 box-filtered RGB thumbnails from YUV ones: halves the apparent motion and the noise; RGB so
    that the detectors' thresholds mean the same whatever the colour of a scene."""
    t, h, w, c = thumbnails.shape
    x = thumbnails[:, : h // 2 * 2, : w // 2 * 2].astype(np.float32)
    x = x.reshape(t, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)) - np.array([0, 128, 128], np.float32)
    return x @ _YUV_TO_RGB.T


def frame_differences(frames: np.ndarray, k: int) -> np.ndarray:
    """d[i] = change from frame i to frame i + k. Between neighbours (k = 1): the smallest mean absolute
    difference over the nine one-pixel offsets (borders cropped), so that small motion is not mistaken for
    change. Over longer strides motion exceeds a pixel anyway; those detectors rely on their baseline."""
    a, b = frames[:-k], frames[k:]
    if k > 1:
        return np.abs(a - b).reshape(len(a), -1).mean(axis=1)
    inner = b[:, 1:-1, 1:-1]
    buffer = np.empty_like(inner)
    best = None
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            np.subtract(a[:, 1 + dy : a.shape[1] - 1 + dy, 1 + dx : a.shape[2] - 1 + dx], inner, out=buffer)
            mean = np.abs(buffer, out=buffer).reshape(len(buffer), -1).mean(axis=1)
            best = mean if best is None else np.minimum(best, mean)
    return best


def detect_transitions(thumbnails: np.ndarray, fps: float, cfg: CutConfig = CutConfig()) -> list[Transition]:
    """Transitions in a video from its YUV thumbnails (T, h, w, 3), in frame order."""
    frames = _half_rgb(thumbnails)
    n = len(frames)
    if n < 2:
        return []
    d1 = frame_differences(frames, 1)
    spans: list[tuple[int, int]] = []
    for detector in cfg.cascade:
        k = max(1, round(detector.stride_s * fps))
        if n <= k:
            continue
        d = d1 if k == 1 else frame_differences(frames, k)  # d[i]: frames i → i + k
        baseline = _running_median(d, max(2 * k, round(cfg.baseline_s * fps)))
        ok = (d >= detector.min_change) & (d >= detector.min_ratio * np.maximum(baseline, 1.0))
        for i in _peaks(ok, d):
            spans.append(_refine(i, k, d1, d[i]))
    blank = frames.reshape(n, -1).std(axis=1) < cfg.blank_std
    spans += [(int(i), int(i)) for i in np.flatnonzero(blank)]
    return _merge(spans)


def _refine(i: int, k: int, d1: np.ndarray, change: float) -> tuple[int, int]:
    """The frames a change between frames i and i + k occupies: one boundary if a single step is as large
    as half the whole change (a hard cut seen at a coarse scale), else the frames strictly between."""
    steps = d1[i : i + k]
    j = int(np.argmax(steps))
    if k == 1 or steps[j] >= 0.5 * change:
        return (i + j + 1, i + j)  # hard cut before frame i + j + 1
    return (i + 1, i + k - 1)


def _merge(spans: list[tuple[int, int]]) -> list[Transition]:
    """Union of overlapping or adjacent spans (a hard cut (t, t − 1) touches frames t − 1 and t)."""
    merged: list[list[int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 2:
            merged[-1][1] = max(merged[-1][1], last)
            merged[-1][0] = min(merged[-1][0], first)
        else:
            merged.append([first, last])
    return [Transition(first, last) for first, last in merged]


def clips_between(
    transitions: list[Transition], num_frames: int, fps: float, cfg: CutConfig = CutConfig()
) -> list[tuple[int, int]]:
    """Clips as [start, end) frame ranges between transitions, at least `min_clip_s` long."""
    clips, start = [], 0
    for t in [*transitions, Transition(num_frames, num_frames - 1)]:
        end = t.first
        if end - start >= cfg.min_clip_s * fps:
            clips += _split(start, end, fps, cfg.max_clip_s)
        start = max(start, t.last + 1)
    return clips


def _split(start: int, end: int, fps: float, max_clip_s: float | None) -> list[tuple[int, int]]:
    if max_clip_s is None or end - start <= max_clip_s * fps:
        return [(start, end)]
    parts = int(np.ceil((end - start) / (max_clip_s * fps)))
    bounds = np.linspace(start, end, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in pairwise(bounds)]


def match(
    detected: list[Transition], truth: list[tuple[int, int]], tolerance: int = 2
) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives): a detection matches an unmatched true
    transition [first, last] if its centre lies within it, widened by `tolerance` frames."""
    unmatched = list(truth)
    tp = 0
    for t in detected:
        hit = next((g for g in unmatched if g[0] - tolerance <= t.center <= g[1] + tolerance), None)
        if hit is not None:
            unmatched.remove(hit)
            tp += 1
    return tp, len(detected) - tp, len(unmatched)
