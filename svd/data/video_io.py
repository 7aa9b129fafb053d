"""Write sampled videos as .mp4 (H.264 through PyAV's bundled FFmpeg) and .gif (Pillow).

Both writers go through a temporary file and a rename, so a crash never leaves half a video behind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
from PIL import Image
from torch import Tensor


def to_uint8_frames(frames: Tensor) -> np.ndarray:
    """(T, 3, H, W) floats in [-1, 1] → (T, H, W, 3) uint8."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides; repeat the last row/column where a side is odd."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 18, gop: int | None = None) -> bytes:
    """(T, H, W, 3) uint8 → the bytes of an H.264 mp4 at `fps` (keyframe every `gop` frames if given).

    `cpu-independent=1` because without it libx264's assembly gives different bytes for the same frames
    from one call to the next (6 encodings of a textured, noisy video: 6 different files), so curated
    clips and detector scores would drift from run to run; it costs no measurable speed.
    """
    frames = _pad_to_even(frames)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        options = {"crf": str(crf), "x264-params": "cpu-independent=1"}
        stream.options = options | ({"g": str(gop)} if gop else {})
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_mp4(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """(T, H, W, 3) uint8 → H.264 mp4 file at `fps`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_mp4(frames, fps))
    os.replace(tmp, path)
    return path


def encode_gif(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 → the bytes of a looping GIF at `fps`."""
    buffer = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    return buffer.getvalue()


def write_gif(frames: np.ndarray, path: str | Path, fps: float) -> Path:
    """(T, H, W, 3) uint8 → looping GIF file at `fps`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_gif(frames, fps))
    os.replace(tmp, path)
    return path
