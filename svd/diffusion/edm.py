"""EDM preconditioning with σ_data = 1 and the denoising loss (Karras et al. 2022; SVD eq. 11–14).

D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)) with
  c_skip = 1/(σ²+1),  c_out = −σ/√(σ²+1),  c_in = 1/√(σ²+1),  c_noise = ¼·ln σ.
Training draws ln σ ~ N(P_mean, P_std²) per video and weights the squared error by (σ²+1)/σ². Raising
P_mean from one stage to the next shifts training towards higher noise, as the paper does for video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class NoiseDistribution:
    """ln σ ~ N(p_mean, p_std²). Paper values: Stage I/II −1.2/1.0; Stage II at 320×576 0.0/1.0;
    high-res text-to-video 0.5/1.4; image-to-video 0.7/1.6 (320×576) and 1.0/1.6 (576×1024)."""

    p_mean: float = -1.2
    p_std: float = 1.0

    def __post_init__(self) -> None:
        if self.p_std <= 0:
            raise ValueError(f"noise.p_std={self.p_std} must be > 0")

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> Tensor:
        ln_sigma = torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean
        return ln_sigma.exp()


def edm_scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) for σ_data = 1, elementwise in σ."""
    sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))  # never below fp32
    var = sigma.square() + 1.0
    return 1.0 / var, -sigma / var.sqrt(), 1.0 / var.sqrt(), 0.25 * sigma.log()


def loss_weight(sigma: Tensor) -> Tensor:
    """λ(σ) = (σ²+1)/σ², which makes the effective loss on F unit-weighted across noise levels."""
    return (sigma.square() + 1.0) / sigma.square()


@dataclass
class Conditioning:
    """Everything the network is conditioned on besides the noisy latent, per video in the batch."""

    context: Tensor  # (B, L, D): text tokens (text-to-video) or the CLIP image embedding (image-to-video)
    micro: dict[str, Tensor]  # e.g. fps_id, motion_bucket_id, cond_aug: (B,) or (B, T)
    # (B, C, h, w): the conditioning-frame latent, copied over time (image-to-video); or (B, T, C, h, w)
    # per frame, with `frame_mask` saying which frames are given (interpolation)
    concat: Tensor | None = None
    image_only: Tensor | None = None  # (B,) bool: stills that skip the temporal layers (Stage I)
    frame_mask: Tensor | None = None  # (B, T) bool: frames whose concat latent is given

    def __len__(self) -> int:
        return self.context.shape[0]

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Stack along the batch, e.g. unconditional and conditional halves for guidance."""

        def join(tensors: list[Tensor | None]) -> Tensor | None:
            if all(t is None for t in tensors):
                return None
            if any(t is None for t in tensors):
                raise ValueError("cannot batch conditionings where only some have a field set")
            return torch.cat(tensors)

        return Conditioning(
            context=torch.cat([p.context for p in parts]),
            micro={k: torch.cat([p.micro[k] for p in parts]) for k in parts[0].micro},
            concat=join([p.concat for p in parts]),
            image_only=join([p.image_only for p in parts]),
            frame_mask=join([p.frame_mask for p in parts]),
        )


class Denoiser(nn.Module):
    """Wraps the network F into the preconditioned denoiser D(x; σ, conditioning).

    `missing_frame_channels` > 0 adds the learned embedding that stands in for the latent of frames that
    are not given (interpolation, paper D.5); the network then also receives the binary frame mask as one
    more input channel.
    """

    def __init__(self, network: nn.Module, missing_frame_channels: int = 0):
        super().__init__()
        self.network = network
        self.missing_frame = (
            nn.Parameter(torch.zeros(missing_frame_channels)) if missing_frame_channels else None
        )

    def forward(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """x: (B, T, C, h, w) noisy latents; sigma: (B,)."""
        c_skip, c_out, c_in, c_noise = (s.view(-1, 1, 1, 1, 1) for s in edm_scalings(sigma))
        net_in = (c_in * x).to(x.dtype)
        if cond.concat is not None:
            # The conditioning latent is appended unscaled, as in the released model.
            net_in = torch.cat([net_in, self._concat_input(cond, x.shape[1]).to(x.dtype)], dim=2)
        out = self.network(net_in, c_noise.flatten(), cond.context, cond.micro, cond.image_only)
        return (c_skip * x + c_out * out.float()).to(x.dtype)

    def _concat_input(self, cond: Conditioning, frames: int) -> Tensor:
        concat = cond.concat
        if concat.ndim == 4:
            concat = concat[:, None].expand(-1, frames, -1, -1, -1)
        if cond.frame_mask is None:
            return concat
        if self.missing_frame is None:
            raise ValueError("a frame mask needs Denoiser(missing_frame_channels=latent channels)")
        given = cond.frame_mask[:, :, None, None, None]
        missing = self.missing_frame.view(1, 1, -1, 1, 1).to(concat.dtype)
        mask_channel = given.to(concat.dtype).expand(-1, -1, 1, *concat.shape[-2:])
        return torch.cat([torch.where(given, concat, missing), mask_channel], dim=2)


def denoising_loss(
    denoiser: Denoiser,
    latents: Tensor,
    cond: Conditioning,
    noise: NoiseDistribution,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean over the batch of λ(σ)·‖D(x₀ + σ·n; σ) − x₀‖² (mean over elements), one σ per video."""
    sigma = noise.sample(latents.shape[0], generator, latents.device)
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return weighted_denoising_error(denoiser, latents, cond, sigma, eps).mean()


def weighted_denoising_error(
    denoiser: Denoiser, latents: Tensor, cond: Conditioning, sigma: Tensor, eps: Tensor
) -> Tensor:
    """(B,) per-video λ(σ)·‖D(x₀ + σ·ε; σ) − x₀‖² for given σ and ε: the trainer draws them per sample, so
    that a sample's loss does not depend on which rank or batch it lands in."""
    noisy = latents + sigma.view(-1, 1, 1, 1, 1) * eps
    denoised = denoiser(noisy, sigma, cond)
    per_video = (denoised.float() - latents.float()).square().flatten(1).mean(dim=1)
    return loss_weight(sigma) * per_video
