"""Motion: Farnebäck optical flow between frames 0.5 s apart (2 fps), on frames 16 px on the short side.

`motion_score` is the mean flow magnitude, in short-side fractions per second: scale-free, so it means
the same for a 360p and a 4K source (0.1 = content crossing a tenth of the frame's short side per second).
At 16 px and 2 fps, flow resolves motion up to about a quarter of the frame per second; faster motion
saturates the score (the paper uses it to rank clips, which this keeps).

`camera_motion` comes from the same flow: a least-squares fit of a similarity motion (translation t,
zoom s, rotation r) about the frame centre. Content moving left means the camera pans right; content
expanding from the centre means the camera zooms in. A camera move shifts most of the frame, so the
median pixel moves nearly as fast as the fastest; when it barely moves while some pixels do (an object
on a still background), the camera counts as static.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import cv2
import numpy as np


@dataclass(frozen=True)
class MotionConfig:
    static_below: float = 0.02  # motion_score under which the camera counts as static
    dominance: float = 0.6  # share of the flow the fitted component must explain to name it
    typical_motion: float = 0.25  # a camera move shifts the typical pixel: median speed ≥ this × 90th pct


@dataclass(frozen=True)
class Motion:
    score: float
    camera: str


def _flows(frames: np.ndarray) -> np.ndarray:
    """(M − 1, h, w, 2) flow between consecutive grey frames."""
    return np.stack(
        [
            cv2.calcOpticalFlowFarneback(
                a,
                b,
                None,
                pyr_scale=0.5,
                levels=3,
                winsize=7,
                iterations=3,
                poly_n=5,
                poly_sigma=1.1,
                flags=0,
            )
            for a, b in pairwise(frames)
        ]
    )


def measure_motion(frames: np.ndarray, fps: float, cfg: MotionConfig = MotionConfig()) -> Motion:
    """Motion of a clip from its grey frames (M, h, w) sampled at `fps` (2 by default)."""
    if len(frames) < 2:
        return Motion(0.0, "static")
    flow = _flows(frames)
    short = min(frames.shape[1:])
    speed = np.linalg.norm(flow, axis=-1) / short * fps  # short sides per second, per pixel
    score = float(speed.mean())
    if score < cfg.static_below or np.median(speed) < cfg.typical_motion * np.quantile(speed, 0.9):
        return Motion(score, "static")
    return Motion(score, classify_camera(flow, cfg))


def classify_camera(flow: np.ndarray, cfg: MotionConfig = MotionConfig()) -> str:
    """Name the dominant camera motion of a flow field (N, h, w, 2): one of schema.CAMERA_MOTIONS."""
    n, h, w, _ = flow.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = (xs - (w - 1) / 2).ravel(), (ys - (h - 1) / 2).ravel()
    u, v = flow[..., 0].reshape(n, -1).mean(axis=0), flow[..., 1].reshape(n, -1).mean(axis=0)
    # u = tx + s·x − r·y,  v = ty + r·x + s·y
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate([np.stack([ones, zeros, x, -y], 1), np.stack([zeros, ones, y, x], 1)])
    (tx, ty, s, _r), *_ = np.linalg.lstsq(design, np.concatenate([u, v]), rcond=None)
    radius = np.sqrt(x**2 + y**2).mean()
    translation, zoom = np.hypot(tx, ty), abs(s) * radius
    total = np.hypot(u, v).mean() + 1e-9
    if zoom >= translation and zoom >= cfg.dominance * total:
        return "zoom_in" if s > 0 else "zoom_out"
    if translation >= cfg.dominance * total:
        if abs(tx) >= abs(ty):
            return "pan_right" if tx < 0 else "pan_left"  # content moving left: the camera turns right
        return "tilt_down" if ty < 0 else "tilt_up"  # content moving up: the camera tilts down
    return "other"
