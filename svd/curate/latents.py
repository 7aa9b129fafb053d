"""Optional: encode each clip with the VAE once during curation, so training skips the encoder.

The latents go into the `latents` blob column as .npy bytes of (T, C, h, w) float16; the loader serves
them instead of frames when the table has them.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import torch

from svd.data.video import decode_clip
from svd.model.autoencoder import Autoencoder


def encode_clip(
    source: str | BinaryIO,
    autoencoder: Autoencoder,
    *,
    start_s: float,
    end_s: float,
    num_frames: int,
    fps: float,
    size: tuple[int, int],
) -> bytes:
    clip = decode_clip(source, start_s=start_s, end_s=end_s, num_frames=num_frames, fps=fps, size=size)
    frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    latents = autoencoder.encode(frames[None])[0].to(torch.float16).numpy()
    buffer = io.BytesIO()
    np.save(buffer, latents)
    return buffer.getvalue()
