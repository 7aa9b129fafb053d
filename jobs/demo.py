"""The end-to-end demo: raw video → curation → clip table → loader → training → sampled video.

    python jobs/demo.py                  # about 3 minutes on 2 CPU cores
    python jobs/demo.py --steps 1000     # longer training, cleaner video

It starts an S3 server on 127.0.0.1 (moto, no root needed) and uploads a generated raw video of two shots
joined by a hard cut: a square gliding over a still background, then a camera pan over a texture.
Curation cuts it into clips, scores their motion and writes them to a Lance clip table in the bucket.
The data loader streams back the clips that pass a filter on those scores (dropping the pan); the `tiny`
VideoUNet trains on them with the EDM loss through the lossless `space_to_depth` autoencoder, and the
Euler EDM sampler makes a 14-frame video, written as .mp4 and .gif under --out next to the training clip.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from svd.curate.config import CurateConfig
from svd.curate.pipeline import run
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.local_s3 import LocalS3
from svd.data.storage import Storage
from svd.data.synthetic import moving_square, panning_texture, video_with_cuts
from svd.data.video_io import encode_mp4, to_uint8_frames, write_gif, write_mp4
from svd.diffusion.edm import Conditioning, Denoiser, NoiseDistribution, denoising_loss
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
from svd.model.autoencoder import SpaceToDepthAutoencoder
from svd.model.video_unet import VideoUNet, preset

BUCKET = "svd-demo"
DEMO_FILTER = "camera_motion != 'pan_right'"  # curation names the second shot a pan: train on the square


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="noise levels per step (default: %(default)s)")
    p.add_argument("--frames", type=int, default=14, help="frames per clip (default: %(default)s)")
    p.add_argument(
        "--size", type=int, default=32, help="frame height and width in pixels (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
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
    p.add_argument(
        "--ema", type=float, default=0.97, help="EMA decay of the sampled weights (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", type=Path, default=Path("outputs/demo"), help="output folder (default: %(default)s)"
    )
    return p.parse_args(argv)


def publish_raw_video(storage: Storage, args: argparse.Namespace) -> str:
    """Uploads the generated raw video; returns its folder."""
    side = 2 * args.size  # the raw video is larger than the training frames: the loader resizes
    square = moving_square(args.frames + 1, side, side, velocity=(0.0, side / args.frames))
    pan = panning_texture(round(3 * args.fps), side, side, velocity=(0.0, 3.0))
    frames, _ = video_with_cuts([square, pan], [("cut", 0)])
    fs, path = storage.fsspec(f"s3://{BUCKET}/raw/two_shots.mp4")
    fs.pipe_file(path, encode_mp4(frames, args.fps))
    return f"s3://{BUCKET}/raw/"


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with LocalS3() as s3, patched_env(s3.env()):
        s3.create_bucket(BUCKET)
        raw = publish_raw_video(s3.storage(), args)
        table = f"s3://{BUCKET}/clips.lance"
        min_clip_s = args.frames / args.fps  # the square's shot is one frame longer than a training clip
        summary = run(CurateConfig(input=raw, output=table, workers=0, min_clip_s=min_clip_s), progress=False)
        print(f"object store: S3 server on {s3.endpoint}")
        print(f"curation: {summary.curated} raw video → {summary.clips} clips in {table} (tag {summary.tag})")
        loader = ClipLoader(
            LoaderConfig(
                table=table,
                filter=DEMO_FILTER,
                buckets=(Bucket(args.size, args.size, args.frames, args.batch, fps=args.fps),),
                num_workers=0,
                cache_dir=str(args.out / "row_index"),
            ),
            storage=s3.storage(),
            rank=0,
            world_size=1,
        )
        print(f"loader: {loader.sizes[0]} clip passes the filter {DEMO_FILTER}")
        return train_and_sample(args, iter(loader))


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """The demo's S3 server in the environment, where curation (and Lance) look for it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    # Samples come from an exponential moving average of the weights, as in every diffusion training run:
    # it smooths out the last steps' noise (measured here: 17.4 dB against 17.1 without, at 300 steps).
    ema = AveragedModel(denoiser, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
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
        ema.update_parameters(denoiser)
        losses.append(loss.item())
        if step == 1 or step % 50 == 0 or step == args.steps:
            recent = np.mean(losses[-50:])
            print(f"step {step:4d}/{args.steps}  loss {recent:.4f}  ({time.perf_counter() - start:.0f} s)")
        batch = next(batches)
    train_seconds = time.perf_counter() - start

    sampler = EulerEDMSampler(SamplerConfig(num_steps=args.sample_steps, guidance_min=1.0, guidance_max=1.0))
    denoiser = ema.module.eval()
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
