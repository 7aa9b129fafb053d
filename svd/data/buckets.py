"""Buckets: (resolution, frames) shapes with their own batch size; a batch never mixes buckets.

Each row goes to the bucket whose aspect ratio is closest to its own among those it can fill: images to
1-frame buckets, videos to buckets whose frames fit in the clip at the bucket's frame rate. Every step,
all ranks pick the same bucket: the choice is a seeded function of the loader state, which every rank
holds identically. Buckets are chosen in proportion to their size, so all of them move through their
epochs at about the same pace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int  # 1 for an image bucket
    batch_size: int  # per rank
    fps: float = 8.0  # rate at which a video's frames are sampled (lower if the source is slower)

    def __post_init__(self) -> None:
        for name in ("height", "width", "frames", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"bucket {name}={getattr(self, name)} must be ≥ 1")
        if self.fps <= 0:
            raise ValueError(f"bucket fps={self.fps} must be > 0")


def assign(
    buckets: tuple[Bucket, ...],
    *,
    width: np.ndarray,
    height: np.ndarray,
    num_frames: np.ndarray,
    fps: np.ndarray,
    duration: np.ndarray,
) -> np.ndarray:
    """Bucket index per row (int16), −1 where no bucket fits the row."""
    aspect = np.log(width.astype(np.float64) / np.maximum(height, 1))
    best = np.full(len(width), -1, np.int16)
    best_distance = np.full(len(width), np.inf)
    is_image = num_frames <= 1
    for i, bucket in enumerate(buckets):
        if bucket.frames == 1:
            fits = is_image
        else:
            source_fps = np.where(fps > 0, fps, bucket.fps)
            rate = np.minimum(bucket.fps, source_fps)
            # the last frame of a clip starts 1/fps before its end (see video.decode_clip)
            fits = ~is_image & (duration - 1.0 / source_fps + 1e-6 >= (bucket.frames - 1) / rate)
        distance = np.abs(aspect - np.log(bucket.width / bucket.height))
        better = fits & (distance < best_distance)
        best[better] = i
        best_distance[better] = distance[better]
    return best


def choose(seed: int, consumed: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """The bucket of the next step: random ∝ bucket size, seeded by the whole loader state."""
    weights = np.asarray(sizes, dtype=np.float64)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, *consumed])
    return int(rng.choice(len(sizes), p=weights / weights.sum()))
