"""Euler sampling of the EDM probability-flow ODE on the Karras σ grid, with frame-wise guidance.

SVD's guidance scale rises linearly over the frames (1.0 → 2.5 for SVD, 1.5 → 3.0 for SVD-XT): frames far
from the conditioning image need a stronger pull towards it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor
from tqdm.auto import tqdm

from svd.diffusion.edm import Conditioning, Denoiser


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 25
    sigma_min: float = 0.002
    sigma_max: float = 700.0
    rho: float = 7.0
    guidance_min: float = 1.0  # scale at the first frame
    guidance_max: float = 2.5  # scale at the last frame

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps={self.num_steps} must be ≥ 1")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"need 0 < sampler.sigma_min < sampler.sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < n, then a final 0 (n+1 values)."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def frame_guidance_scales(num_frames: int, lo: float, hi: float) -> Tensor:
    """Guidance per frame, linear from `lo` (first frame) to `hi` (last); shape (1, T, 1, 1, 1)."""
    return torch.linspace(lo, hi, num_frames).view(1, -1, 1, 1, 1)


class EulerEDMSampler:
    """Deterministic Euler steps (no churn) from σ_max down to 0, as the released sampler."""

    def __init__(self, cfg: SamplerConfig):
        self.cfg = cfg
        self.sigmas = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        shape: tuple[int, ...],
        cond: Conditioning,
        uncond: Conditioning | None = None,
        *,
        seed: int | Sequence[int] = 0,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> Tensor:
        """Latents of `shape` (B, T, C, h, w). Guidance applies when `uncond` is given and the scale ≠ 1;
        the same seed gives the same video. With one seed per sample, each sample's starting noise is its
        own seed's, whatever else is in the batch (an evaluation's results then do not depend on how its
        conditions were batched)."""
        sigmas = self.sigmas.to(device)
        # Start on the prior: x ~ N(0, (1 + σ_max²)·I), the marginal of a unit-variance signal at σ_max.
        x = _prior_noise(shape, seed, device) * math.sqrt(1.0 + self.cfg.sigma_max**2)
        guided = uncond is not None and (self.cfg.guidance_min, self.cfg.guidance_max) != (1.0, 1.0)
        both = Conditioning.cat([uncond, cond]) if guided else cond
        scale = frame_guidance_scales(shape[1], self.cfg.guidance_min, self.cfg.guidance_max).to(device)
        for sigma, sigma_next in tqdm(list(pairwise(sigmas)), desc="sampling", disable=not progress):
            if guided:
                d_uncond, d_cond = denoiser(torch.cat([x, x]), sigma.expand(2 * shape[0]), both).chunk(2)
                denoised = d_uncond + scale * (d_cond - d_uncond)
            else:
                denoised = denoiser(x, sigma.expand(shape[0]), both)
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        return x


def _prior_noise(shape: tuple[int, ...], seed: int | Sequence[int], device: torch.device | str) -> Tensor:
    if isinstance(seed, int):
        return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    if len(seed) != shape[0]:
        raise ValueError(f"{len(seed)} seeds for a batch of {shape[0]} samples")
    generators = [torch.Generator(device).manual_seed(s) for s in seed]
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generators])
