"""What a run reports about its model besides the training loss, both with the EMA weights:

- `Validator`: the denoising loss on the held-out split (`split = data.val_split`) at fixed noise levels
  (`train.val_sigmas`) and fixed noise, so the numbers are comparable across steps, runs and world sizes
  (the σ-weighted loss varies far more with σ than with the model; a random σ would drown the signal).
- `Previewer`: a short video sampled with the Euler EDM sampler from the conditioning of the run's first
  training sample, written to `<run_dir>/previews/` as mp4 and gif, to look at what the model learned.

The held-out set is read, encoded and conditioned once, at the first validation, and kept on the device: it
is the same at every validation (the table version that first one read, from its start, with fixed noise), so
later ones run only the model, without a loader, its workers, video decoding or the frozen encoders. That
costs each rank its share of `train.val_samples` latents and their conditioning in memory.

Every rank calls both at the same step: the sharded forward is collective. Neither changes training: the
EMA swap gives the trained weights back bit for bit (`EMA.applied`), and their random draws come from
their own seeded generators, never from a global one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from svd.config import RunConfig
from svd.data.loader import ClipLoader
from svd.data.video_io import encode_gif, encode_mp4, to_uint8_frames
from svd.diffusion.edm import Conditioning, weighted_denoising_error
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
from svd.train.distributed import DistEnv
from svd.train.ema import EMA
from svd.train.run_files import RunFiles
from svd.train.task import SampleRandoms, Task

VALIDATION_FILE = "validation.jsonl"


class Validator:
    """`validator(model, ema, step)` → {"sigma_<σ>": loss, …, "mean": …}; {} when nothing is held out."""

    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        task: Task,
        held_out: Callable[[], ClipLoader],
        files: RunFiles,
    ):
        self.cfg, self.env, self.task, self.files = cfg, env, task, files
        self.held_out = held_out  # a fresh loader over the held-out rows, at their start
        self.unavailable: str | None = None  # why there is nothing to validate on, once found
        self._encoded: list[tuple[Tensor, Conditioning, SampleRandoms]] | None = None

    @torch.no_grad()
    def __call__(self, model: nn.Module, ema: EMA, step: int) -> dict[str, float]:
        encoded = self._held_out()
        if encoded is None:
            return {}
        sigmas = self.cfg.train.val_sigmas
        sums = torch.zeros(len(sigmas) + 1, device=self.env.device)
        with ema.applied(model):
            for latents, cond, randoms in encoded:
                for i, sigma in enumerate(sigmas):
                    fixed = torch.full_like(randoms.sigma, sigma)
                    sums[i] += weighted_denoising_error(model, latents, cond, fixed, randoms.eps).sum()
                sums[-1] += latents.shape[0]
        dist.all_reduce(sums)
        losses = {f"sigma_{s:g}": float(v) for s, v in zip(sigmas, sums[:-1] / sums[-1], strict=True)}
        losses["mean"] = sum(losses.values()) / len(sigmas)
        if self.env.is_main:
            self.files.append_line(VALIDATION_FILE, json.dumps({"step": step, **losses}))
            print(
                f"validation at step {step}: loss {losses['mean']:.4f} (EMA weights, {len(sigmas)} σ)",
                flush=True,
            )
        return losses

    def _held_out(self) -> list[tuple[Tensor, Conditioning, SampleRandoms]] | None:
        """This rank's held-out batches as latents, conditioning and fixed noise; read at the first call."""
        if self._encoded is not None or self.unavailable is not None:
            return self._encoded
        try:
            loader = self.held_out()
        except ValueError as e:  # no held-out row (the same on every rank: they read one table version)
            self.unavailable = str(e)
            if self.env.is_main:
                print(f"validation skipped from now on: {e}", flush=True)
            return None
        per_step = self.env.world_size * self.cfg.data.micro_batch
        batches = iter(loader)
        self._encoded = []
        try:
            for _, batch in zip(range(-(-self.cfg.train.val_samples // per_step)), batches, strict=False):
                latents = self.task.latents(batch)
                randoms = self.task.draw(batch, tuple(latents.shape[1:]), self.cfg.train.seed + 1)
                randoms.dropped.zero_()
                self._encoded.append((latents, self.task.conditioning(batch, latents, randoms), randoms))
        finally:
            batches.close()  # its workers end now, not whenever the generator is collected
        return self._encoded


class Previewer:
    """`previewer(model, ema, step, batch)`: a video sampled from the first sample of `batch`."""

    def __init__(self, cfg: RunConfig, env: DistEnv, task: Task, files: RunFiles):
        self.cfg, self.env, self.task, self.files = cfg, env, task, files
        lo, hi = cfg.train.preview_guidance
        self.sampler = EulerEDMSampler(
            SamplerConfig(num_steps=cfg.train.preview_steps, guidance_min=lo, guidance_max=hi)
        )

    @torch.no_grad()
    def __call__(self, model: nn.Module, ema: EMA, step: int, batch: dict[str, Any]) -> bytes | None:
        """The preview's GIF on the main rank (for the experiment trackers), None on the others."""
        one = {k: (v[:1] if isinstance(v, Tensor | list) else v) for k, v in batch.items()}
        latents = self.task.latents(one)
        cond, uncond = self.task.sampling_conditioning(one, latents, [self.cfg.train.seed])
        with ema.applied(model):
            sample = self.sampler.sample(
                model, tuple(latents.shape), cond, uncond, seed=self.cfg.train.seed, device=self.env.device
            )
        if self.env.is_main:
            video = to_uint8_frames(self.task.autoencoder.decode(sample)[0].cpu())
            fps = self.cfg.data.fps
            gif = encode_gif(video, fps)
            self.files.write(f"previews/step-{step:08d}.mp4", encode_mp4(video, fps))
            self.files.write(f"previews/step-{step:08d}.gif", gif)
            print(f"preview at step {step}: {self.files.uri('previews')}", flush=True)
            return gif
        return None
