"""Videos sampled from a trained model for a batch of conditions, each with its own seed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from svd.config import RunConfig
from svd.data.video_io import to_uint8_frames
from svd.diffusion.edm import Denoiser
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
from svd.eval.protocol import EvalProtocol
from svd.train.task import Task, sample_seed


def condition_seed(protocol: EvalProtocol, condition: int, motion_bucket: int) -> int:
    """Condition i at motion bucket m is always sampled from the same noise, whichever process samples it."""
    return sample_seed(protocol.seed, motion_bucket, condition)


class VideoSampler:
    """`sampler(batch, seeds, motion_bucket)` → uint8 videos (B, T, H, W, 3) at the batch's clips' size."""

    def __init__(self, run: RunConfig, model: Denoiser, protocol: EvalProtocol, device: torch.device):
        self.device = device
        self.task = Task.build(run, device)
        self.model = model.to(device).eval()
        lo, hi = protocol.guidance
        self.sampler = EulerEDMSampler(
            SamplerConfig(num_steps=protocol.sampler_steps, guidance_min=lo, guidance_max=hi)
        )

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], seeds: list[int], motion_bucket: int) -> np.ndarray:
        batch = batch | {"motion_bucket_id": torch.full((len(seeds),), float(motion_bucket))}
        # The true clips' latents give the shape, and the given frames of interpolation.
        latents = self.task.latents(batch)
        cond, uncond = self.task.sampling_conditioning(batch, latents, seeds)
        sample = self.sampler.sample(
            self.model, tuple(latents.shape), cond, uncond, seed=seeds, device=self.device
        )
        videos = self.task.autoencoder.decode(sample)
        return np.stack([to_uint8_frames(video) for video in videos])
