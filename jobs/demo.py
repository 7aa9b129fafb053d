"""The end-to-end demo: raw video in a local object store → clip table → loader → training → sampled video.

    python jobs/demo.py                  # about 2 minutes on 2 CPU cores
    python jobs/demo.py --steps 1000     # longer training, cleaner video

It starts an S3 server on 127.0.0.1 (moto, no root needed), uploads a generated clip of a square gliding
over a gradient as H.264 and registers it in a Lance clip table there. The data loader streams the clip
back from the server; the `tiny` VideoUNet trains on it with the EDM loss through the lossless
`space_to_depth` autoencoder; the Euler EDM sampler then makes a 14-frame video, written as .mp4 and .gif
under --out next to the training clip for comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.local_s3 import LocalS3
from svd.data.storage import Storage
from svd.data.synthetic import moving_square
from svd.data.table import write_clip_table
from svd.data.video_io import encode_mp4, to_uint8_frames, write_gif, write_mp4
from svd.diffusion.edm import Conditioning, Denoiser, NoiseDistribution, denoising_loss
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
from svd.model.autoencoder import SpaceToDepthAutoencoder
from svd.model.video_unet import VideoUNet, preset

BUCKET = "svd-demo"


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


def publish_clip(storage: Storage, args: argparse.Namespace) -> str:
    """Uploads the generated clip as an mp4 and registers it in a clip table; returns the table URI."""
    clip = moving_square(args.frames, args.size, args.size, velocity=(0.0, args.size / args.frames))
    video_uri = f"s3://{BUCKET}/raw/square.mp4"
    fs, path = storage.fsspec(video_uri)
    fs.pipe_file(path, encode_mp4(clip, args.fps))
    row = {
        "clip_id": "square", "video_uri": video_uri, "start_s": 0.0, "end_s": args.frames / args.fps,
        "fps": args.fps, "width": args.size, "height": args.size, "num_frames": args.frames,
        "captions": ["a red square gliding to the right"], "motion_score": 0.5, "aesthetic_score": None,
        "clip_score": None, "text_area": 0.0, "camera_motion": "static", "source": "demo", "split": "train",
    }  # fmt: skip
    table = f"s3://{BUCKET}/clips.lance"
    write_clip_table(table, [row], storage)
    return table


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalS3() as s3:
        s3.create_bucket(BUCKET)
        table = publish_clip(s3.storage(), args)
        print(f"object store: S3 server on {s3.endpoint}; clip table {table}")
        loader = ClipLoader(
            LoaderConfig(
                table=table,
                buckets=(Bucket(args.size, args.size, args.frames, args.batch, fps=args.fps),),
                num_workers=0,
                cache_dir=str(args.out / "row_index"),
            ),
            storage=s3.storage(),
            rank=0,
            world_size=1,
        )
        return train_and_sample(args, iter(loader))


def to_latents(autoencoder: SpaceToDepthAutoencoder, frames: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) uint8 from the loader → latents."""
    return autoencoder.encode(frames.float() / 127.5 - 1.0)


def conditioning(batch: dict, context_dim: int) -> Conditioning:
    """The model's conditioning from a loader batch (no text encoder in the demo: an empty context)."""
    n = len(batch["clip_id"])
    micro = {
        "fps_id": batch["fps_id"],
        "motion_bucket_id": batch["motion_bucket_id"],
        "cond_aug": torch.zeros(n),
    }
    return Conditioning(context=torch.zeros(n, 1, context_dim), micro=micro)


def train_and_sample(args: argparse.Namespace, batches: Iterator[dict]) -> dict[str, float]:
    autoencoder = SpaceToDepthAutoencoder(factor=args.factor)
    first = next(batches)
    clip = first["frames"][0].permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8, as decoded from the store
    cfg = preset("tiny", in_channels=autoencoder.latent_channels, out_channels=autoencoder.latent_channels)
    denoiser = Denoiser(VideoUNet(cfg))
    n_params = sum(p.numel() for p in denoiser.parameters())
    latent_shape = tuple(to_latents(autoencoder, first["frames"][:1]).shape)
    print(
        f"model: tiny VideoUNet, {n_params / 1e6:.2f}M parameters; clip {tuple(clip.shape)} → latents "
        f"{latent_shape[1:]} through space_to_depth"
    )

    # The demo overfits one clip: a wide band of noise levels, so that every sampling step was trained.
    noise = NoiseDistribution(p_mean=args.p_mean, p_std=args.p_std)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.lr, weight_decay=0.0)
    # Cosine decay to zero: a short run that ends on settled weights samples far cleaner than a constant rate.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    start, losses, batch = time.perf_counter(), [], first
    for step in range(1, args.steps + 1):
        loss = denoising_loss(
            denoiser,
            to_latents(autoencoder, batch["frames"]),
            conditioning(batch, cfg.context_dim),
            noise,
            generator,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step == 1 or step % 50 == 0 or step == args.steps:
            recent = np.mean(losses[-50:])
            print(f"step {step:4d}/{args.steps}  loss {recent:.4f}  ({time.perf_counter() - start:.0f} s)")
        batch = next(batches)
    train_seconds = time.perf_counter() - start

    sampler = EulerEDMSampler(SamplerConfig(num_steps=args.sample_steps, guidance_min=1.0, guidance_max=1.0))
    denoiser.eval()
    one_clip = {key: first[key][:1] for key in ("clip_id", "fps_id", "motion_bucket_id")}
    sample = sampler.sample(
        denoiser, latent_shape, conditioning(one_clip, cfg.context_dim), seed=args.seed, progress=True
    )
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
