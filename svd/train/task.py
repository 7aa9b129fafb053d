"""From a loader batch to what the denoiser trains on, for each task of the paper.

    task = Task.build(cfg, device)
    latents, cond, randoms = task.prepare(batch)        # randoms: σ, ε and the rest, drawn per sample

- text_to_video / image (Stage I–III): latents of the clip, caption tokens as context (dropped to the
  empty caption with probability `cond_dropout`, for classifier-free guidance), fps and motion bucket as
  micro-conditioning; stills go through the image-only path.
- image_to_video (and the camera LoRA built on it): the first frame, noise-augmented with
  ln σ_aug ~ N(−3, 0.5²), encoded and concatenated over time (unscaled, as released); its clean CLIP image
  embedding is the context; σ_aug is the `cond_aug` micro-conditioning. Dropout zeroes both.
- interpolation: the first and last frames' latents are given, the others replaced by a learned
  embedding, plus a binary mask channel (paper D.5).
- multiview: image-to-video conditioning on the first view, with camera elevation and azimuth per frame
  (SV3D's micro-conditioning: cond_aug, polar angle, azimuth).

Every random quantity of a sample — dropout, σ, ε, σ_aug and its noise — is drawn from a generator seeded
by (run seed, bucket, stream position of the sample), on the training device. A sample's loss is then the
same whatever the number of ranks, the micro-batch or the step it lands in, which makes "2 processes equal
1 process" and "resume equals uninterrupted" exact properties rather than statistical ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from svd.config import RunConfig
from svd.diffusion.edm import Conditioning
from svd.model.autoencoder import Autoencoder, AutoencoderConfig, build_autoencoder
from svd.model.encoders import ImageEncoder, TextEncoder
from svd.model.video_unet import VideoUNetConfig, preset

CONDITIONED_ON_IMAGE = ("image_to_video", "multiview")


def unet_config(cfg: RunConfig, latent_channels: int) -> VideoUNetConfig:
    """The stage's UNet: input channels from the task, micro-conditioning from the model settings."""
    base = preset(cfg.model.preset)
    in_channels = {
        "image_to_video": 2 * latent_channels,
        "multiview": 2 * latent_channels,
        "interpolation": 2 * latent_channels + 1,
    }.get(cfg.stage.task, latent_channels)
    micro = base.micro_conditioning
    if cfg.model.micro_conditioning == "sv3d":
        width = micro[0][1]
        micro = (("cond_aug", width), ("polars_rad", 2 * width), ("azimuths_rad", 2 * width))
    return preset(
        cfg.model.preset, in_channels=in_channels, out_channels=latent_channels, micro_conditioning=micro
    )


def autoencoder_config(cfg: RunConfig) -> AutoencoderConfig:
    return AutoencoderConfig(
        kind=cfg.model.autoencoder,
        pretrained=cfg.model.autoencoder_path,
        scale_factor=cfg.model.scale_factor,
        factor=cfg.model.autoencoder_factor,
    )


def sample_seed(seed: int, bucket: int, position: int) -> int:
    return int(
        np.random.SeedSequence([seed & 0xFFFFFFFF, bucket, position]).generate_state(1, np.uint64)[0] >> 1
    )


@dataclass
class SampleRandoms:
    """Everything random about one batch, drawn per sample (see the module docstring)."""

    dropped: Tensor  # (B,) bool
    sigma: Tensor  # (B,)
    eps: Tensor  # like the latents
    cond_sigma: Tensor  # (B,) conditioning-frame noise level (image tasks), else zeros
    cond_noise: Tensor | None  # (B, 3, H, W) noise for the conditioning frame (image tasks)


@dataclass
class Task:
    cfg: RunConfig
    device: torch.device
    autoencoder: Autoencoder
    text_encoder: TextEncoder | None
    image_encoder: ImageEncoder | None
    context_dim: int

    @staticmethod
    def build(cfg: RunConfig, device: torch.device) -> Task:
        autoencoder = build_autoencoder(autoencoder_config(cfg)).to(device)
        context_dim = preset(cfg.model.preset).context_dim
        on_image = cfg.stage.task in CONDITIONED_ON_IMAGE  # the image embedding replaces the text
        text, image = None, None
        if cfg.model.text_encoder and not on_image:
            text = TextEncoder(_local(cfg.model.text_encoder, cfg)).to(device)
        if cfg.model.image_encoder and on_image:
            image = ImageEncoder(_local(cfg.model.image_encoder, cfg)).to(device)
        for key, encoder in (("model.text_encoder", text), ("model.image_encoder", image)):
            if encoder is not None and encoder.dim != context_dim:
                raise ValueError(
                    f"{key} gives {encoder.dim}-d features, "
                    f"model {cfg.model.preset} has context_dim={context_dim}"
                )
        return Task(cfg, device, autoencoder, text, image, context_dim)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def draw(self, batch: dict[str, Any], latent_shape: tuple[int, ...], seed: int) -> SampleRandoms:
        d = self.cfg.diffusion
        image_cond = self.cfg.stage.task in CONDITIONED_ON_IMAGE  # those batches carry frames
        frame_shape = tuple(batch["frames"].shape[2:]) if image_cond else ()
        dropped, sigma, cond_sigma, eps, cond_noise = [], [], [], [], []
        for position in batch["position"].tolist():
            g = torch.Generator(self.device).manual_seed(sample_seed(seed, int(batch["bucket"]), position))
            dropped.append(torch.rand((), generator=g, device=self.device) < d.cond_dropout)
            sigma.append((torch.randn((), generator=g, device=self.device) * d.p_std + d.p_mean).exp())
            eps.append(torch.randn(latent_shape, generator=g, device=self.device))
            if image_cond:
                ln = torch.randn((), generator=g, device=self.device) * d.cond_aug_std + d.cond_aug_mean
                cond_sigma.append(ln.exp())
                cond_noise.append(torch.randn(frame_shape, generator=g, device=self.device))
        n = len(sigma)
        return SampleRandoms(
            dropped=torch.stack(dropped),
            sigma=torch.stack(sigma),
            eps=torch.stack(eps),
            cond_sigma=torch.stack(cond_sigma) if image_cond else torch.zeros(n, device=self.device),
            cond_noise=torch.stack(cond_noise) if image_cond else None,
        )

    def latents(self, batch: dict[str, Any]) -> Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, torch.float32)
        return self.autoencoder.encode(_pixels(batch["frames"], self.device))

    def prepare(self, batch: dict[str, Any], seed: int) -> tuple[Tensor, Conditioning, SampleRandoms]:
        latents = self.latents(batch)
        randoms = self.draw(batch, tuple(latents.shape[1:]), seed)
        return latents, self.conditioning(batch, latents, randoms), randoms

    def conditioning(self, batch: dict[str, Any], latents: Tensor, randoms: SampleRandoms) -> Conditioning:
        task, b, t = self.cfg.stage.task, latents.shape[0], latents.shape[1]
        keep = (~randoms.dropped).float()
        micro = self.micro(batch, randoms.cond_sigma, b, t)
        if task in CONDITIONED_ON_IMAGE:
            first = _pixels(batch["frames"][:, 0], self.device)
            noisy_first = first + randoms.cond_sigma.view(-1, 1, 1, 1) * randoms.cond_noise
            scale = getattr(self.autoencoder, "scale_factor", 1.0)  # the released concat latent is unscaled
            concat = self.autoencoder.encode(noisy_first[:, None])[:, 0] / scale
            context = self.image_context(first)
            return Conditioning(
                context=context * keep.view(-1, 1, 1), micro=micro, concat=concat * keep.view(-1, 1, 1, 1)
            )
        captions = [
            ("" if drop else c) for c, drop in zip(batch["caption"], randoms.dropped.tolist(), strict=True)
        ]
        cond = Conditioning(context=self.text_context(captions), micro=micro)
        if task == "image":
            cond.image_only = torch.ones(b, dtype=torch.bool, device=self.device)
        if task == "interpolation":
            given = torch.zeros(b, t, dtype=torch.bool, device=self.device)
            given[:, 0] = given[:, -1] = True
            cond.concat = latents
            cond.frame_mask = given & ~randoms.dropped[:, None]
        return cond

    def sampling_conditioning(
        self, batch: dict[str, Any], latents: Tensor, seeds: Sequence[int]
    ) -> tuple[Conditioning, Conditioning]:
        """Conditioning to sample with, and its unconditional twin (everything dropped) for guidance. The
        conditioning frame is noised at σ_aug = 0.02, as the released sampling script does, with noise drawn
        from each sample's own seed."""
        b = latents.shape[0]
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b} samples")
        image_cond = "frames" in batch and self.cfg.stage.task in CONDITIONED_ON_IMAGE
        noise = None
        if image_cond:
            frame = batch["frames"][0, 0].shape
            generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
            noise = torch.stack([torch.randn(frame, generator=g, device=self.device) for g in generators])

        def randoms(dropped: bool) -> SampleRandoms:
            return SampleRandoms(
                dropped=torch.full((b,), dropped, device=self.device),
                sigma=torch.ones(b, device=self.device),
                eps=torch.zeros_like(latents),
                cond_sigma=torch.full((b,), 0.02 if image_cond else 0.0, device=self.device),
                cond_noise=noise,
            )

        cond = self.conditioning(batch, latents, randoms(False))
        return cond, self.conditioning(batch, latents, randoms(True))

    def text_context(self, captions: list[str]) -> Tensor:
        if self.text_encoder is None:
            return torch.zeros(len(captions), 1, self.context_dim, device=self.device)
        return self.text_encoder(captions)

    def image_context(self, images: Tensor) -> Tensor:
        if self.image_encoder is None:
            return torch.zeros(images.shape[0], 1, self.context_dim, device=self.device)
        return self.image_encoder(images)

    def micro(self, batch: dict[str, Any], cond_sigma: Tensor, b: int, t: int) -> dict[str, Tensor]:
        if self.cfg.model.micro_conditioning == "sv3d":
            polar = math.radians(90.0 - self.cfg.data.elevation_deg)
            azimuth = torch.arange(t, device=self.device, dtype=torch.float32) * (2 * math.pi / t)
            return {
                "cond_aug": cond_sigma,
                "polars_rad": torch.full((b, t), polar, device=self.device),
                "azimuths_rad": azimuth.expand(b, t),
            }
        return {
            "fps_id": batch["fps_id"].to(self.device),
            "motion_bucket_id": batch["motion_bucket_id"].to(self.device),
            "cond_aug": cond_sigma,
        }


def _pixels(frames: Tensor, device: torch.device) -> Tensor:
    """uint8 frames from the loader → floats in [-1, 1] on the device."""
    return frames.to(device).float() / 127.5 - 1.0


def _local(uri: str, cfg: RunConfig) -> str:
    """Encoders load from local folders; weights in object storage are copied once per node."""
    from svd.data.storage import Storage

    return Storage.from_env().local_copy(uri, cfg.model.cache_dir)
