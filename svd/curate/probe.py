"""Probe: what a file is (duration, frame rate, size, codec) before any work is spent on it.

A rejection is final (the input itself is at fault) only when the bytes were read and judged; a failure to
read them (storage down, time-out) propagates as it is, for the run to retry (DESIGN decision 7).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import av

from svd.data.video import DecodeError, is_image, peek_header

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
REJECTIONS = ("unreadable", "no_video", "too_short", "too_long")  # final: rerunning cannot change them


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    width: int
    height: int
    codec: str
    is_image: bool = False


class RejectionError(Exception):
    """A video that curation skips, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def probe(
    source: str | BinaryIO, *, min_duration_s: float = 0.0, max_duration_s: float = float("inf")
) -> VideoInfo:
    """Reads the container header only.

    Raises RejectionError with reason 'unreadable', 'no_video', 'too_short' or 'too_long'.
    """
    try:
        head = peek_header(source)
    except DecodeError as e:
        raise RejectionError("unreadable", str(e)) from None
    if is_image(head):
        return _probe_image(source)
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise RejectionError("no_video", "the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = (stream.frames or 0) / fps if fps else 0.0
            info = VideoInfo(
                duration,
                fps,
                stream.codec_context.width,
                stream.codec_context.height,
                stream.codec_context.name,
            )
    except av.FFmpegError as e:  # FFmpeg judged the bytes; an OSError of the reader itself propagates
        raise RejectionError("unreadable", str(e)) from None
    if info.fps <= 0 or info.width <= 0 or info.height <= 0:
        raise RejectionError("unreadable", f"no frame rate or size ({info})")
    if info.duration_s < min_duration_s:
        raise RejectionError("too_short", f"{info.duration_s:.2f} s < {min_duration_s} s")
    if info.duration_s > max_duration_s:
        raise RejectionError("too_long", f"{info.duration_s:.0f} s > {max_duration_s:.0f} s")
    return info


def _probe_image(source: str | BinaryIO) -> VideoInfo:
    from PIL import Image, UnidentifiedImageError

    data = source if isinstance(source, str) else io.BytesIO(source.read())  # read errors are not judged
    try:
        with Image.open(data) as image:
            return VideoInfo(
                0.0, 0.0, image.width, image.height, (image.format or "image").lower(), is_image=True
            )
    except (UnidentifiedImageError, OSError) as e:
        raise RejectionError("unreadable", f"image: {e}") from None
