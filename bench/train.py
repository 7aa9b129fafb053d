"""Training throughput: two FSDP2 processes against one, and the share of step time spent waiting for data.

    python bench/train.py                       # tiny preset on CPU, 1 vs 2 processes (a few minutes)
    python bench/train.py --preset small --steps 6
    python bench/train.py --preset svd          # on a GPU: 14×320×576, bf16, FSDP2 + activation checkpointing

Both runs read the same generated clip table (local files) with the same global batch, so the ratio of
their samples/s is the scaling of the data-parallel path on this machine; the first step (start-up,
row index, first decode) is left out. The GPU mode trains the released 1.5B UNet for a few steps and prints
step time, peak memory and MFU (FLOPs of one sample's forward and backward counted on the model, × samples/s
÷ the GPU's bf16 peak). It needs no weights: the lossless space_to_depth autoencoder with factor 8 gives
latents of the released shape (40×72), with 192 instead of 4 channels at the input and output convs only.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np


def make_table(folder: Path, videos: int, size: tuple[int, int], seconds: float) -> str:
    from svd.data.storage import Storage
    from svd.data.synthetic import synthetic_corpus
    from svd.data.table import write_clip_table

    (folder / "raw").mkdir(parents=True, exist_ok=True)
    rows = synthetic_corpus(
        str(folder / "raw"), Storage(), videos=videos, seconds=seconds, size=size, clip_seconds=seconds
    )
    table = str(folder / "clips.lance")
    write_clip_table(table, rows, Storage())
    return table


def train(args: argparse.Namespace, table: str, run_dir: Path, processes: int, extra: list[str]):
    from svd.config import compose
    from svd.launch.local import launch_local

    cfg = compose(
        [
            "stage=video_pretrain",
            f"model={'svd' if args.preset == 'svd' else args.preset}",
            f"data.table={table}",
            f"checkpoint.run_dir={run_dir}",
            f"checkpoint.every={args.steps}",
            f"train.steps={args.steps}",
            f"gpus_per_node={processes}",
            f"data.cache_dir={run_dir.parent / 'rows'}",
            "metrics.port=0",
            *extra,
        ]
    )
    return launch_local(cfg)


def cpu_scaling(args: argparse.Namespace, folder: Path) -> None:
    frames, side = (8, 32) if args.preset == "tiny" else (8, 64)
    table = make_table(folder, videos=8, size=(side, side), seconds=2.0)
    common = [
        "model.autoencoder=space_to_depth",
        f"data.height={side}",
        f"data.width={side}",
        f"data.frames={frames}",
        f"data.num_workers={args.workers}",
        f"train.global_batch={args.batch}",
        "parallel.sharding=fsdp",
    ]
    rates, waits = {}, {}
    for processes in (1, 2):
        result = train(args, table, folder / f"run{processes}", processes, common)
        seconds = sum(result.step_seconds[1:])
        rates[processes] = args.batch * (len(result.step_seconds) - 1) / seconds
        waits[processes] = sum(result.data_wait_seconds[1:]) / seconds
    print(
        f"\n{args.preset}, {frames}×{side}×{side}, global batch {args.batch}, "
        f"{args.steps} steps (first left out)"
    )
    print("| processes | samples/s | data wait share |\n|---|---|---|")
    for p in (1, 2):
        print(f"| {p} | {rates[p]:.2f} | {waits[p]:.0%} |")
    print(f"two processes ÷ one: {rates[2] / rates[1]:.2f}× samples/s (same machine, same run)")


def gpu_step(args: argparse.Namespace, folder: Path) -> None:
    import torch

    from svd.config import METRICS_PORT

    if not torch.cuda.is_available():
        raise SystemExit("--preset svd needs a GPU (CUDA); on CPU use --preset tiny or small")
    table = make_table(folder, videos=4, size=(320, 576), seconds=2.0)
    result = train(
        args,
        table,
        folder / "svd",
        1,
        [
            "model.autoencoder=space_to_depth",
            "model.autoencoder_factor=8",
            "data.height=320",
            "data.width=576",
            "data.frames=14",
            "data.num_workers=4",
            "train.global_batch=1",
            "parallel.mixed_precision=bf16",
            "parallel.activation_checkpointing=full",
            f"metrics.port={METRICS_PORT}",  # the trainer counts FLOPs (for MFU) when it serves metrics
            "checkpoint.async_save=true",
        ],
    )
    steps = np.array(result.step_seconds[1:])
    print(f"svd preset, 14×320×576, bf16, FSDP2 + full activation checkpointing, {len(steps)} timed steps")
    print(
        f"step time {steps.mean():.3f} s (min {steps.min():.3f}); "
        f"peak memory {result.peak_memory_bytes / 2**30:.1f} GiB"
    )
    if result.flops_per_sample and result.peak_flops:
        mfu = result.flops_per_sample / steps.mean() / result.peak_flops
        print(f"{result.flops_per_sample / 1e12:.1f} TFLOP per sample (forward + backward); MFU {mfu:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "small", "svd"), default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="global batch (CPU mode)")
    p.add_argument("--workers", type=int, default=1, help="loader workers per process (CPU mode)")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be ≥ 2 (the first step is not timed)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="svd-bench-train-") as tmp:
        (gpu_step if args.preset == "svd" else cpu_scaling)(args, Path(tmp))


if __name__ == "__main__":
    main()
