"""The frozen autoencoder between frames and latents, behind one interface.

- `kl_temporal`: the released SVD autoencoder — the SD 2.1 image encoder with a temporally-aware
  deflickering decoder (diffusers `AutoencoderKLTemporalDecoder`).
- `kl`: a plain image `AutoencoderKL` (the `*_image_decoder` variants, or SD's VAE).
- `space_to_depth`: pixel-unshuffle, no weights, lossless. A CPU-sized model trained on it shows what it
  learned in real pixels, which makes it the autoencoder of the demo and of end-to-end tests.

Frames are (B, T, 3, H, W) in [-1, 1]; latents are (B, T, C, H/f, W/f), already multiplied by the
scale factor (0.18215 for the SD encoder) so the diffusion model sees roughly unit variance. Work runs in
chunks of frames so that a 25-frame 576×1024 video does not need all its activations at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("space_to_depth", "kl", "kl_temporal")


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: str = "kl_temporal"
    # Local folder or hub id (e.g. "stabilityai/stable-video-diffusion-img2vid"). None builds a tiny randomly
    # initialised network of the same class: for tests of the code path, never for training.
    pretrained: str | None = None
    subfolder: str | None = "vae"
    scale_factor: float = 0.18215
    factor: int = 2  # space_to_depth only: pixels per latent along each side
    chunk_frames: int = 14  # frames encoded/decoded at once (SVD decodes 14 at a time)
    sample_posterior: bool = False  # encode to a sample of the posterior instead of its mode

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"autoencoder.kind={self.kind!r}; choose one of {KINDS}")
        if self.chunk_frames < 1:
            raise ValueError(f"autoencoder.chunk_frames={self.chunk_frames} must be ≥ 1")


class Autoencoder(nn.Module):
    """Frames ↔ scaled latents. Subclasses implement `_encode_frames`/`_decode_frames` on (N, C, H, W)."""

    latent_channels: int
    downscale: int

    def __init__(self, chunk_frames: int):
        super().__init__()
        self.chunk_frames = chunk_frames

    @torch.no_grad()
    def encode(self, frames: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, t = frames.shape[:2]
        flat = frames.flatten(0, 1)
        chunks = [self._encode_frames(c, generator) for c in flat.split(self.chunk_frames)]
        return torch.cat(chunks).view(b, t, *chunks[0].shape[1:])

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        # Chunks never straddle two videos: the temporal decoder mixes neighbouring frames.
        videos = [
            torch.cat([self._decode_frames(c) for c in video.split(self.chunk_frames)]) for video in latents
        ]
        return torch.stack(videos)

    def _encode_frames(self, frames: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _decode_frames(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


class SpaceToDepthAutoencoder(Autoencoder):
    """Lossless: each f×f patch of RGB becomes 3·f² channels. No weights."""

    def __init__(self, factor: int = 2, chunk_frames: int = 14):
        super().__init__(chunk_frames)
        self.downscale = factor
        self.latent_channels = 3 * factor * factor

    def _encode_frames(self, frames: Tensor, generator: torch.Generator | None) -> Tensor:
        return F.pixel_unshuffle(frames, self.downscale)

    def _decode_frames(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.downscale)


class DiffusersAutoencoder(Autoencoder):
    """A diffusers `AutoencoderKL` or `AutoencoderKLTemporalDecoder`, frozen."""

    def __init__(self, vae: nn.Module, scale_factor: float, chunk_frames: int, sample_posterior: bool):
        super().__init__(chunk_frames)
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = scale_factor
        self.sample_posterior = sample_posterior
        self.temporal = type(vae).__name__ == "AutoencoderKLTemporalDecoder"
        self.latent_channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)

    def _encode_frames(self, frames: Tensor, generator: torch.Generator | None) -> Tensor:
        posterior = self.vae.encode(frames.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return z.float() * self.scale_factor

    def _decode_frames(self, latents: Tensor) -> Tensor:
        z = (latents / self.scale_factor).to(self.vae.dtype)
        out = self.vae.decode(z, num_frames=z.shape[0]) if self.temporal else self.vae.decode(z)
        return out.sample.float()


def _tiny_random_vae(kind: str) -> nn.Module:
    """A two-level (downscale 2) randomly initialised network of the released class."""
    from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

    common = {"block_out_channels": (32, 32), "layers_per_block": 1, "latent_channels": 4}
    if kind == "kl_temporal":
        return AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 2, **common)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **common
    )


def build_autoencoder(cfg: AutoencoderConfig) -> Autoencoder:
    if cfg.kind == "space_to_depth":
        return SpaceToDepthAutoencoder(cfg.factor, cfg.chunk_frames)
    if cfg.pretrained is None:
        vae = _tiny_random_vae(cfg.kind)
    else:
        from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

        cls = AutoencoderKLTemporalDecoder if cfg.kind == "kl_temporal" else AutoencoderKL
        vae = cls.from_pretrained(cfg.pretrained, subfolder=cfg.subfolder)
    return DiffusersAutoencoder(vae, cfg.scale_factor, cfg.chunk_frames, cfg.sample_posterior)
