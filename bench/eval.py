"""What evaluation adds to sampling, in one run: feature extraction and statistics against the sampling of
the same videos, and the cost of merging statistics against the number of samples behind them.

    python bench/eval.py                         # CPU: the tiny preset, 8 videos of 16 frames at 64×64
    python bench/eval.py --preset svd --size 576 1024 --frames 14 --videos 4    # one GPU: the paper's model
    python bench/eval.py --i3d path/to/i3d_torchscript.pt   # the real FVD network instead of the stand-in

Printed:
- sampling: seconds per video (Euler steps of the protocol, classifier-free guidance: two UNet passes);
- features: seconds per video for the feature network at 224×224 (I3D's cost; the stand-in is a random
  3D-convolution network calibrated to I3D's FLOPs per 16-frame clip, about 27 GFLOP, when no file is
  given), statistics included; the ratio to sampling (goal < 10 % at the paper's size, on a GPU);
- merge: seconds to merge two statistics of 400-dim features built from 1 000 and from 100 000 samples, and
  their ratio (goal ≈ 1: the merge is O(dim²), independent of the sample count).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

I3D_FLOPS_16_FRAMES = 27e9  # Inception-3D at 224×224: ~108 GFLOP for 64 frames


class I3DCost(nn.Module):
    """A random network with I3D's calling convention and about its FLOPs: a stand-in for timing only."""

    def __init__(self, width: int = 46, dim: int = 400):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3)),
            nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            nn.Conv3d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d((2, 3, 3), 2, (0, 1, 1)),
            nn.Conv3d(2 * width, 4 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2, 2),
            nn.Conv3d(4 * width, 8 * width, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(8 * width, dim)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True
    ):
        return self.head(self.body(x).mean(dim=(2, 3, 4)))


def flops(module: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return float(counter.get_total_flops())


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "svd"])
    p.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--steps", type=int, default=25, help="Euler steps (the protocols' default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--i3d", default="", help="the real I3D TorchScript file (default: the stand-in)")
    args = p.parse_args()

    from svd.diffusion.edm import Conditioning, Denoiser
    from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig
    from svd.eval.features import FeatureNetwork
    from svd.eval.frechet import FeatureStats
    from svd.model.autoencoder import AutoencoderConfig, build_autoencoder
    from svd.model.video_unet import VideoUNet, preset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    autoencoder = build_autoencoder(AutoencoderConfig(kind="space_to_depth", factor=8)).to(device)
    channels = autoencoder.latent_channels
    unet = VideoUNet(preset(args.preset, in_channels=channels, out_channels=channels))
    model = Denoiser(unet).to(device).eval()
    n, t = args.videos, args.frames
    h, w = args.size[0] // 8, args.size[1] // 8
    context = torch.zeros(n, 1, preset(args.preset).context_dim, device=device)
    micro = {k: torch.zeros(n, device=device) for k in ("fps_id", "motion_bucket_id", "cond_aug")}
    cond = Conditioning(context, micro)
    sampler = EulerEDMSampler(SamplerConfig(num_steps=args.steps, guidance_min=1.0, guidance_max=3.0))

    def sample() -> torch.Tensor:
        with torch.no_grad():
            latents = sampler.sample(
                model, (n, t, channels, h, w), cond, cond, seed=list(range(n)), device=device
            )
            return autoencoder.decode(latents)

    videos = sample()
    sampling = timed(sample, args.repeats) / n
    pixels = ((videos.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2).cpu()

    if args.i3d:
        import hashlib
        from pathlib import Path

        digest = hashlib.sha256(Path(args.i3d).read_bytes()).hexdigest()
        network = FeatureNetwork.load(args.i3d, sha256=digest, cache_dir="/tmp", device=device)
        which = args.i3d
    else:
        stand_in = I3DCost().to(device).eval()
        probe = torch.zeros(1, 3, 16, 224, 224, device=device)
        which = f"stand-in, {flops(stand_in, probe) / 1e9:.0f} GFLOP per 16-frame clip (I3D: ~27)"
        network = FeatureNetwork(torch.jit.script(stand_in), "stand-in", "", device=device)

    def features() -> None:
        FeatureStats.of(network(pixels))

    extraction = timed(features, args.repeats) / n

    rng = np.random.default_rng(0)
    few, many = (FeatureStats.of(rng.normal(size=(count, 400))) for count in (1_000, 100_000))
    merge_few = timed(lambda: few + few, 20)
    merge_many = timed(lambda: many + many, 20)

    size = f"{t}×{args.size[0]}×{args.size[1]}"
    print(f"{args.preset} preset, {n} videos of {size}, {args.steps} Euler steps, {device}")
    print(f"sampling     {sampling:8.3f} s/video")
    print(f"features     {extraction:8.3f} s/video  {extraction / sampling:.1%} of sampling ({which})")
    print(
        f"merge        {merge_few * 1e3:8.3f} ms (1 000 samples), {merge_many * 1e3:.3f} ms (100 000): "
        f"ratio {merge_many / merge_few:.2f}"
    )


if __name__ == "__main__":
    main()
