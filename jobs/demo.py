"""The end-to-end demo: raw video → curation → clip table → loader → training → sampled video.

    python jobs/demo.py                  # about 3 minutes on 2 CPU cores, also beside a busy program
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
import shutil
from pathlib import Path

import numpy as np
import torch

from svd.config import RunConfig, compose
from svd.curate.config import CurateConfig
from svd.curate.pipeline import run
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.local_s3 import LocalS3
from svd.data.storage import Storage
from svd.data.synthetic import moving_square, panning_texture, video_with_cuts
from svd.data.video_io import encode_mp4, to_uint8_frames, write_gif, write_mp4
from svd.diffusion.edm import Denoiser
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
from svd.environ import scoped_environ
from svd.launch.local import launch_local
from svd.model.video_unet import VideoUNet
from svd.train.distributed import set_cpu_threads
from svd.train.task import SampleRandoms, Task, unet_config
from svd.train.weights import initial_weights

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
    args = p.parse_args(argv)
    for name in ("steps", "batch", "frames", "size", "sample_steps", "factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be ≥ 1")
    for name in ("lr", "fps", "p_std"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if not 0 <= args.ema < 1:
        p.error(f"--ema={args.ema} must be in [0, 1)")
    if args.size % args.factor:
        p.error(f"--size={args.size} must be a multiple of --factor={args.factor}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out={args.out} cannot be a folder ({e.strerror}: {e.filename})")
    return args


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
    set_cpu_threads(local_world_size=1)  # curation and sampling run here too, with a training rank's threads
    torch.manual_seed(args.seed)
    with LocalS3() as s3, scoped_environ(s3.env()):
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
        first = next(iter(loader))
        cfg, losses = train(args, table)
        summary = sample(args, cfg, first)
        return summary | {
            "first_loss": float(np.mean(losses[:10])),
            "last_loss": float(np.mean(losses[-10:])),
        }


def train(args: argparse.Namespace, table: str) -> tuple[RunConfig, list[float]]:
    """Trains through `svd.train`, exactly as `jobs/launch.py stage=video_pretrain model=tiny` would. The
    run directory starts empty: a previous demo's checkpoints would otherwise be resumed."""
    shutil.rmtree(args.out / "run", ignore_errors=True)
    cfg = compose(
        [
            "stage=video_pretrain",
            "model=tiny",
            f"data.table={table}",
            f"data.filter={DEMO_FILTER}",
            f"data.height={args.size}",
            f"data.width={args.size}",
            f"data.frames={args.frames}",
            f"data.fps={args.fps}",
            f"data.micro_batch={args.batch}",
            f"data.cache_dir={args.out / 'row_index'}",
            f"model.autoencoder_factor={args.factor}",
            f"train.steps={args.steps}",
            f"train.global_batch={args.batch}",
            f"train.lr={args.lr}",
            "train.weight_decay=0",
            "train.grad_clip=0",
            f"train.ema_decay={args.ema}",
            f"train.seed={args.seed}",
            "train.log_every=50",
            # Previews stay on, as in production, but three in all: model=tiny's every 8 steps sampled 37
            # videos in the 300-step demo; the demo samples its own video at the end.
            f"train.preview_every={max(1, args.steps // 3)}",
            # The demo overfits one clip: a wide band of noise levels, so every sampling step was trained.
            f"diffusion.p_mean={args.p_mean}",
            f"diffusion.p_std={args.p_std}",
            "diffusion.cond_dropout=0",
            "parallel.sharding=none",
            "data.num_workers=2",  # decoding beside the compute thread, on the core the rank leaves free
            f"checkpoint.run_dir={(args.out / 'run').resolve()}",
            f"checkpoint.every={args.steps}",
        ]
    )
    losses = launch_local(cfg).losses
    print(f"trained {args.steps} steps; loss {np.mean(losses[:10]):.3f} → {np.mean(losses[-10:]):.3f}")
    return cfg, losses


def sample(args: argparse.Namespace, cfg: RunConfig, first: dict) -> dict[str, float]:
    """Samples a video with the run's EMA weights and compares it with the training clip."""
    task = Task.build(cfg, torch.device("cpu"))
    denoiser = Denoiser(VideoUNet(unet_config(cfg, task.latent_channels)))
    denoiser.load_state_dict(initial_weights(cfg.checkpoint.run_dir, Storage.from_env(), cfg.model.cache_dir))
    clip = first["frames"][0].permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8, as decoded from the store
    one = {key: first[key][:1] for key in ("frames", "fps_id", "motion_bucket_id", "caption")}
    latents = task.latents(one)
    randoms = SampleRandoms(
        dropped=torch.zeros(1, dtype=torch.bool),
        sigma=torch.ones(1),
        eps=torch.zeros_like(latents),
        cond_sigma=torch.zeros(1),
        cond_noise=None,
    )
    sampler = EulerEDMSampler(SamplerConfig(num_steps=args.sample_steps, guidance_min=1.0, guidance_max=1.0))
    out = sampler.sample(
        denoiser.eval(),
        tuple(latents.shape),
        task.conditioning(one, latents, randoms),
        seed=args.seed,
        progress=True,
    )
    video = to_uint8_frames(task.autoencoder.decode(out)[0])
    mse = np.mean((video.astype(np.float64) - clip.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
    paths = [
        write_mp4(video, args.out / "sample.mp4", args.fps),
        write_gif(video, args.out / "sample.gif", args.fps),
        write_gif(clip, args.out / "training_clip.gif", args.fps),
    ]
    print(
        f"sampled {args.frames} frames in {args.sample_steps} Euler steps with the EMA weights; "
        "PSNR against the "
        f"training clip {psnr:.1f} dB"
    )
    print("wrote " + ", ".join(str(p) for p in paths))
    return {"psnr": float(psnr)}


if __name__ == "__main__":
    main()
