"""The end-to-end demo: train the `tiny` VideoUNet on a generated clip, then sample a video from it.

    python jobs/demo.py                  # about 2 minutes on 2 CPU cores
    python jobs/demo.py --steps 1000     # longer training, cleaner video

It encodes a clip of a square gliding over a gradient through the lossless `space_to_depth` autoencoder,
trains with the EDM loss, samples a 14-frame video with the Euler EDM sampler, and writes it as .mp4 and
.gif under --out, next to the training clip for comparison.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from svd.data.synthetic import moving_square
from svd.diffusion.edm import Conditioning, Denoiser, NoiseDistribution, denoising_loss
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
from svd.diffusion.video_io import to_uint8_frames, write_gif, write_mp4
from svd.model.autoencoder import SpaceToDepthAutoencoder
from svd.model.video_unet import VideoUNet, preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="noise levels per step (default: %(default)s)")
    p.add_argument("--frames", type=int, default=14, help="frames per clip (default: %(default)s)")
    p.add_argument(
        "--size", type=int, default=32, help="frame height and width in pixels (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument(
        "--sample-steps", type=int, default=25, help="Euler steps when sampling (default: %(default)s)"
    )
    p.add_argument(
        "--fps", type=float, default=7.0, help="frame rate of the clip and the video (default: %(default)s)"
    )
    p.add_argument(
        "--factor", type=int, default=2, help="space_to_depth pixels per latent side (default: %(default)s)"
    )
    p.add_argument("--p-mean", type=float, default=0.5, help="training ln σ mean (default: %(default)s)")
    p.add_argument("--p-std", type=float, default=1.6, help="training ln σ std (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path("outputs/demo"), help="output folder (default: %(default)s)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    clip = moving_square(args.frames, args.size, args.size, velocity=(0.0, args.size / args.frames))
    pixels = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W) in [-1, 1]
    autoencoder = SpaceToDepthAutoencoder(factor=args.factor)
    latents = autoencoder.encode(pixels[None])  # (1, T, 12, H/2, W/2)

    cfg = preset("tiny", in_channels=autoencoder.latent_channels, out_channels=autoencoder.latent_channels)
    denoiser = Denoiser(VideoUNet(cfg))
    n_params = sum(p.numel() for p in denoiser.parameters())
    print(
        f"model: tiny VideoUNet, {n_params / 1e6:.2f}M parameters; clip {tuple(clip.shape)} → latents "
        f"{tuple(latents.shape[1:])} through space_to_depth"
    )

    def conditioning(batch: int) -> Conditioning:
        return Conditioning(
            context=torch.zeros(batch, 1, cfg.context_dim),
            micro={
                "fps_id": torch.full((batch,), args.fps),
                "motion_bucket_id": torch.full((batch,), 127.0),
                "cond_aug": torch.zeros(batch),
            },
        )

    # The demo overfits one clip: a wide band of noise levels, so that every sampling step was trained.
    noise = NoiseDistribution(p_mean=args.p_mean, p_std=args.p_std)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.lr, weight_decay=0.0)
    # Cosine decay to zero: a short run that ends on settled weights samples far cleaner than a constant rate.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    batch_latents, cond = latents.expand(args.batch, -1, -1, -1, -1), conditioning(args.batch)
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        loss = denoising_loss(denoiser, batch_latents, cond, noise, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step == 1 or step % 50 == 0 or step == args.steps:
            recent = np.mean(losses[-50:])
            print(f"step {step:4d}/{args.steps}  loss {recent:.4f}  ({time.perf_counter() - start:.0f} s)")
    train_seconds = time.perf_counter() - start

    sampler = EulerEDMSampler(SamplerConfig(num_steps=args.sample_steps, guidance_min=1.0, guidance_max=1.0))
    denoiser.eval()
    sample = sampler.sample(denoiser, tuple(latents.shape), conditioning(1), seed=args.seed, progress=True)
    video = to_uint8_frames(autoencoder.decode(sample)[0])

    mse = np.mean((video.astype(np.float64) - clip.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
    paths = [
        write_mp4(video, args.out / "sample.mp4", args.fps),
        write_gif(video, args.out / "sample.gif", args.fps),
        write_gif(clip, args.out / "training_clip.gif", args.fps),
    ]
    print(
        f"trained {args.steps} steps in {train_seconds:.0f} s; loss {np.mean(losses[:10]):.3f} → "
        f"{np.mean(losses[-10:]):.3f}"
    )
    print(
        f"sampled {args.frames} frames in {args.sample_steps} Euler steps; PSNR against the training clip "
        f"{psnr:.1f} dB"
    )
    print("wrote " + ", ".join(str(p) for p in paths))
    return {
        "psnr": float(psnr),
        "first_loss": float(np.mean(losses[:10])),
        "last_loss": float(np.mean(losses[-10:])),
    }


if __name__ == "__main__":
    main()
