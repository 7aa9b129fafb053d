"""Decode one training sample from a video (or image): seek, sample N frames at a target rate, resize+crop.

The source is anything PyAV can read: a local path, an fsspec file object doing ranged reads on object
storage, or a Lance blob file. Images (PNG, JPEG, WebP) take the same call with num_frames = 1.

Failures are typed: `DecodeError.reason` is one of REASONS, so the loader can skip, count by reason and
replace the sample instead of stopping the run.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

REASONS = ("missing", "corrupt", "too_short")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8")


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float  # the rate the frames were sampled at (the model's fps conditioning)


def sample_times(start_s: float, end_s: float, num_frames: int, fps: float, offset: float) -> np.ndarray:
    """Timestamps of `num_frames` frames `1/fps` apart inside [start_s, end_s]; `offset` ∈ [0, 1] places
    the window (0: at the start, 1: flush with the end). Raises DecodeError('too_short') if they don't fit."""
    span = (num_frames - 1) / fps
    slack = (end_s - start_s) - span
    if slack < -1e-6:
        raise DecodeError(
            "too_short",
            f"{num_frames} frames at {fps:g} fps need {span:.2f} s, clip has {end_s - start_s:.2f} s",
        )
    return start_s + max(slack, 0.0) * offset + np.arange(num_frames) / fps


def resize_crop_size(width: int, height: int, out_h: int, out_w: int) -> tuple[int, int]:
    """The size to resize to so that the frame covers (out_h, out_w) with its aspect ratio kept."""
    scale = max(out_h / height, out_w / width)
    return max(out_w, math.ceil(width * scale - 1e-9)), max(out_h, math.ceil(height * scale - 1e-9))


def _center_crop(pixels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    top, left = (h - out_h) // 2, (w - out_w) // 2
    return pixels[top : top + out_h, left : left + out_w]


def decode_clip(
    source: str | BinaryIO,
    *,
    start_s: float,
    end_s: float,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
    offset: float = 0.0,
) -> Clip:
    """Frames of one sample, resized to cover `size` = (H, W) and centre-cropped to it.

    The sampling rate is `fps`, or the source's own rate if that is lower (frames are never repeated).
    """
    if is_image(peek_header(source)):
        return _decode_image(source, num_frames, size)
    try:
        container = av.open(source, mode="r")
    except FileNotFoundError as e:
        raise DecodeError("missing", str(e)) from None
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError("corrupt", f"cannot open: {e}") from None
    with container:
        if not container.streams.video:
            raise DecodeError("corrupt", "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate or stream.guessed_rate or fps)
        fps = min(fps, source_fps)
        # Frames sit at the start of their interval: the last one of [start_s, end_s) is 1/fps before the end.
        times = sample_times(start_s, end_s - 1.0 / source_fps, num_frames, fps, offset)
        half_frame = 0.5 / source_fps
        out_h, out_w = size
        frames: list[np.ndarray] = []
        try:
            if times[0] > half_frame:
                container.seek(int(times[0] / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                while len(frames) < num_frames and frame.time >= times[len(frames)] - half_frame:
                    width, height = resize_crop_size(frame.width, frame.height, out_h, out_w)
                    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
                    frames.append(_center_crop(rgb.to_ndarray(), out_h, out_w))
                if len(frames) == num_frames:
                    break
        except av.FFmpegError as e:
            raise DecodeError("corrupt", f"decoding failed after {len(frames)} frames: {e}") from None
    if len(frames) < num_frames:
        raise DecodeError("too_short", f"stream ended after {len(frames)} of {num_frames} frames")
    return Clip(np.stack(frames), fps)


def is_image(head: bytes) -> bool:
    """PNG, JPEG, GIF or WebP, from a file's first 12 bytes. RIFF is only a container: WebP says `WEBP` at
    byte 8, AVI says `AVI `, WAV says `WAVE`."""
    return head.startswith(_IMAGE_MAGIC) or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")


def peek_header(source: str | BinaryIO) -> bytes:
    """The first 16 bytes of a file or file object (its position unchanged): enough to tell images apart."""
    if isinstance(source, str):
        try:
            with open(source, "rb") as f:
                return f.read(16)
        except FileNotFoundError as e:
            raise DecodeError("missing", str(e)) from None
    position = source.tell()
    head = source.read(16)
    source.seek(position)
    return head


def _decode_image(source: str | BinaryIO, num_frames: int, size: tuple[int, int]) -> Clip:
    if num_frames != 1:
        raise DecodeError("too_short", f"an image has 1 frame, {num_frames} requested")
    try:
        with Image.open(source if isinstance(source, str) else io.BytesIO(source.read())) as image:
            image = image.convert("RGB")
            width, height = resize_crop_size(image.width, image.height, *size)
            pixels = np.asarray(image.resize((width, height), Image.Resampling.BOX))
    except (UnidentifiedImageError, OSError) as e:
        raise DecodeError("corrupt", f"image: {e}") from None
    return Clip(_center_crop(pixels, *size)[None].copy(), 0.0)  # PIL's buffer is read-only
