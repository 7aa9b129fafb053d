"""Forward+backward of our VideoUNet vs diffusers' UNetSpatioTemporalConditionModel, same config, weights and
inputs, in one run. Prints the median time ratio ours/diffusers and the peak-memory ratio.

    python bench/unet.py                      # image-to-video at a CPU-sized config
    python bench/unet.py --context-tokens 77  # text-to-video style context

Timings alternate between the two models so that machine noise hits both alike; peak memory is measured
in a fresh process per model (the kernel's high-water mark of resident memory, reset after warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from svd.model.video_unet import VideoUNet, VideoUNetConfig
from svd.model.weights import from_diffusers_state_dict, to_diffusers_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 4, 4])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=24, help="latent height")
    p.add_argument("--width", type=int, default=40, help="latent width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context-tokens", type=int, default=1, help="1 = CLIP image embedding (image-to-video)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--memory-child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """Both models with the same weights, and one batch of inputs for each."""
    torch.manual_seed(0)
    cfg = VideoUNetConfig(
        model_channels=args.model_channels,
        channel_mult=tuple(args.channel_mult),
        attention_levels=tuple(i < len(args.channel_mult) - 1 for i in range(len(args.channel_mult))),
        head_channels=32,
    )
    from diffusers import UNetSpatioTemporalConditionModel

    config = {k: v for k, v in to_diffusers_config(cfg, args.frames).items() if not k.startswith("_")}
    theirs = UNetSpatioTemporalConditionModel(**config)
    ours = VideoUNet(cfg)
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)

    b, t = args.batch, args.frames
    x = torch.randn(b, t, cfg.in_channels, args.height, args.width)
    c_noise = torch.full((b,), 0.25)
    context = torch.randn(b, args.context_tokens, cfg.context_dim)
    ids = torch.tensor([[6.0, 127.0, 0.02]]).repeat(b, 1)
    micro = {name: ids[:, i] for i, (name, _) in enumerate(cfg.micro_conditioning)}

    def step_ours() -> None:
        ours(x, c_noise, context, micro).square().mean().backward()

    def step_theirs() -> None:
        theirs(x, c_noise, context, ids).sample.square().mean().backward()

    return {"ours": (ours, step_ours), "diffusers": (theirs, step_theirs)}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints the resident-memory peak of one fwd+bwd above the resting level."""
    model, step = build(args)[args.memory_child]
    step()  # warm-up allocates gradients
    model.zero_grad(set_to_none=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = rss_kib("VmRSS")
    step()
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - base) / 1024}))


def measure_peak(args: argparse.Namespace, which: str) -> float:
    # Large allocations through mmap, so freed tensors leave resident memory and RSS tracks live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    argv = [sys.executable, __file__, *sys.argv[1:], "--memory-child", which]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(args)
        return
    models = build(args)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model, step in models.values():
        step()  # warm-up
        model.zero_grad(set_to_none=True)
    for _ in range(args.repeats):
        for name, (model, step) in models.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    peak = {name: measure_peak(args, name) for name in models}
    print(
        f"config: channels {args.model_channels}×{args.channel_mult}, B={args.batch} T={args.frames} "
        f"latent {args.height}×{args.width}, context tokens {args.context_tokens}, threads {args.threads}"
    )
    for name in models:
        print(f"{name:>10}: fwd+bwd median {median[name] * 1e3:10.3f} ms   peak memory {peak[name]:8.1f} MiB")
    print(f"time ratio ours/diffusers:   {median['ours'] / median['diffusers']:.4g}")
    print(f"memory ratio ours/diffusers: {peak['ours'] / peak['diffusers']:.4g}")


if __name__ == "__main__":
    main()
