"""Generated videos whose content is known exactly: for the demo and for tests of every stage."""

from __future__ import annotations

import numpy as np


def moving_square(
    num_frames: int = 14,
    height: int = 32,
    width: int = 32,
    *,
    side: int | None = None,
    color: tuple[int, int, int] = (230, 60, 40),
    velocity: tuple[float, float] = (0.0, 1.0),
    start: tuple[float, float] | None = None,
) -> np.ndarray:
    """A coloured square gliding over a vertical gradient at `velocity` (rows, columns per frame),
    wrapping around the borders. Returns (T, H, W, 3) uint8."""
    side = side or max(2, min(height, width) // 4)
    r0, c0 = start if start is not None else ((height - side) / 2, 0.0)
    gradient = np.linspace(20, 90, height, dtype=np.float32)[:, None, None]
    background = np.broadcast_to(gradient * np.array([0.4, 0.6, 1.0], np.float32), (height, width, 3))
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        top, left = (r0 + velocity[0] * t) % height, (c0 + velocity[1] * t) % width
        inside = (((rows - round(top)) % height) < side) & (((cols - round(left)) % width) < side)
        frames[t] = np.where(inside[..., None], np.array(color, np.float32), background).astype(np.uint8)
    return frames
