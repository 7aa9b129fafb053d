"""One decoding pass over a video that gathers what the stages need, so nothing decodes it twice:

- small YUV thumbnails of every frame (about `analysis_width` wide) for cut detection, read straight from
  the decoded planes with a stride — converting every frame with swscale cost more than decoding it;
- grey frames sampled at `motion_fps`, `motion_side` pixels on the short side, for optical flow.

The frames used for appearance (CLIP, OCR, captions) are picked afterwards, per clip (`grab_frames`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np

from svd.curate.probe import RejectionError

_PLANAR_420 = ("yuv420p", "yuvj420p")


@dataclass
class Scan:
    thumbnails: np.ndarray  # (T, h, w, 3) uint8 YUV, every frame
    times: np.ndarray  # (T,) seconds
    motion_frames: np.ndarray  # (M, s, s') uint8 grey, at motion_fps
    motion_times: np.ndarray  # (M,) seconds


def scaled_size(
    width: int, height: int, short_side: int | None = None, new_width: int | None = None
) -> tuple[int, int]:
    if new_width is not None:
        return new_width, max(2, round(height * new_width / width))
    scale = short_side / min(width, height)
    return max(2, round(width * scale)), max(2, round(height * scale))


def scan(
    source: str | BinaryIO, *, analysis_width: int = 64, motion_fps: float = 2.0, motion_side: int = 16
) -> Scan:
    thumbnails, times, motion_frames, motion_times = [], [], [], []
    next_motion = 0.0
    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            # Not skip_loop_filter: without deblocking, references drift (+5 grey levels over a GOP of flat,
            # low-contrast material) and snap back at each keyframe, which reads as a cut.
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                thumbnails.append(_thumbnail(frame, analysis_width))
                times.append(frame.time)
                if frame.time + 1e-6 >= next_motion:
                    w, h = scaled_size(frame.width, frame.height, short_side=motion_side)
                    motion_frames.append(
                        frame.reformat(width=w, height=h, format="gray", interpolation="AREA").to_ndarray()
                    )
                    motion_times.append(frame.time)
                    next_motion += 1.0 / motion_fps
    except av.FFmpegError as e:
        if len(thumbnails) < 2:
            raise RejectionError("unreadable", f"decoding failed: {e}") from None
        # a damaged tail: keep what decoded
    if not thumbnails:
        raise RejectionError("unreadable", "no frame decoded")
    return Scan(np.stack(thumbnails), np.array(times), np.stack(motion_frames), np.array(motion_times))


def _plane(frame: av.VideoFrame, index: int, height: int, width: int, stride: int) -> np.ndarray:
    """Every `stride`-th sample, each the mean of a 2×2 block (a cheap guard against aliasing)."""
    plane = frame.planes[index]
    pixels = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: height - 1, : width - 1]
    a, b = pixels[::stride, ::stride], pixels[1::stride, 1::stride]
    c, d = pixels[1::stride, ::stride], pixels[::stride, 1::stride]
    h, w = min(x.shape[0] for x in (a, b, c, d)), min(x.shape[1] for x in (a, b, c, d))
    total = a[:h, :w].astype(np.uint16) + b[:h, :w] + c[:h, :w] + d[:h, :w]
    return (total >> 2).astype(np.uint8)


def _thumbnail(frame: av.VideoFrame, width: int) -> np.ndarray:
    """(h, w, 3) YUV thumbnail: every n-th luma sample and every (n/2)-th chroma sample of an 8-bit 4:2:0
    frame, which costs a copy of a few kilobytes; other formats go through swscale."""
    stride = max(2, frame.width // width) // 2 * 2
    if frame.format.name not in _PLANAR_420:
        w, h = scaled_size(frame.width, frame.height, new_width=frame.width // stride)
        return frame.reformat(width=w, height=h, format="yuv444p").to_ndarray().transpose(1, 2, 0).copy()
    planes = [_plane(frame, 0, frame.height, frame.width, stride)]
    planes += [_plane(frame, i, frame.height // 2, frame.width // 2, stride // 2) for i in (1, 2)]
    h, w = min(p.shape[0] for p in planes), min(p.shape[1] for p in planes)
    return np.stack([p[:h, :w] for p in planes], axis=-1)


def grab_frames(
    source: str | BinaryIO, times: list[float], short_side: int, seek_ahead_s: float = 2.0
) -> list[np.ndarray]:
    """RGB frames (short side `short_side`) at the given sorted times, each the first frame at or after its
    time (or the last frame). It seeks whenever the next time is more than `seek_ahead_s` ahead, so a
    few frames per clip never cost a second decode of the whole video."""
    frames: list[np.ndarray] = []
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded = container.decode(stream)
        current = None
        for t in times:
            if current is None or t - current.time > seek_ahead_s:
                container.seek(int(max(t, 0.0) / stream.time_base), stream=stream, backward=True)
                decoded = container.decode(stream)
                current = None
            while current is None or current.time + 1e-6 < t:
                frame = next(decoded, None)
                if frame is None:
                    break
                if frame.time is not None:
                    current = frame
            if current is None:
                raise RejectionError("unreadable", f"no frame at {t:.2f} s")
            w, h = scaled_size(current.width, current.height, short_side=short_side)
            frames.append(current.reformat(width=w, height=h, format="rgb24").to_ndarray())
    return frames
