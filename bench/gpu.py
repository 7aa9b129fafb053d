"""One GPU against the capacity plan: step time, MFU and peak memory of the svd preset, measured and planned.

    python bench/gpu.py                  # the 1.5B UNet, 14×320×576, bf16, FSDP2 + full checkpointing
    python bench/gpu.py --steps 10 --gpu h100-80gb

Trains the `svd` preset for a few steps on one GPU exactly as bench/train.py --preset svd does (a generated
clip table; the lossless space_to_depth autoencoder with factor 8 gives latents of the released 40×72 size,
so no weights are needed), then plans the same configuration with svd/launch/plan.py and prints, for each
quantity, the measurement, the plan and their ratio. The first step (start-up) is not timed. Feed the
measured MFU back as `plan.mfu=…` to plan larger runs. About 2–3 minutes on one H100 (most of it start-up
and the final checkpoint).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

RUN = [
    "stage=video_pretrain",
    "model=svd",
    "model.autoencoder=space_to_depth",
    "model.autoencoder_factor=8",
    "data.height=320",
    "data.width=576",
    "data.frames=14",
    "train.global_batch=1",
    "gpus_per_node=1",
    "parallel.mixed_precision=bf16",
    "parallel.activation_checkpointing=full",
]
# jobs/conf/gpu/ options by the name CUDA reports (the longest match wins)
GPU_KINDS = {"H100": "h100-80gb", "H200": "h200-141gb", "A100-SXM4-80GB": "a100-80gb", "A100": "a100-40gb"}


@dataclass(frozen=True)
class Measured:
    step_seconds: float  # mean over the timed steps
    peak_allocated: float  # bytes, torch.cuda.max_memory_allocated
    peak_reserved: float  # bytes, torch.cuda.max_memory_reserved (what the allocator held)
    flops_per_sample: float  # counted by the trainer on the real model (forward, backward, recompute)
    peak_flops: float  # of the device, FLOP/s

    @property
    def mfu(self) -> float:
        return self.flops_per_sample / self.step_seconds / self.peak_flops


def gpu_kind(device_name: str) -> str:
    """The jobs/conf/gpu option of a CUDA device name, e.g. "NVIDIA H100 80GB HBM3" → h100-80gb."""
    from svd.train.metrics import match_device_name

    kind = match_device_name(device_name, GPU_KINDS)
    if kind is None:
        raise SystemExit(f"bench/gpu.py: no jobs/conf/gpu entry for {device_name!r}; pass --gpu")
    return kind


def planned(gpu: str):
    from svd.config import compose
    from svd.launch.plan import plan

    return plan(compose([*RUN, f"gpu={gpu}", "data.table=unread"]))


def comparison(p, m: Measured) -> list[tuple[str, float, float]]:
    """(quantity, measured, planned) rows; memory in GiB, time in seconds, FLOPs in TFLOP."""
    gib = 2**30
    mem = p.memory
    executed = p.flops["forward"] + p.flops["backward"] + p.flops["recompute"]
    return [
        ("step time (s)", m.step_seconds, p.step_seconds),
        ("utilisation (MFU as the trainer counts it)", m.mfu, p.mfu),
        ("UNet FLOPs per sample, incl. recompute (TFLOP)", m.flops_per_sample / 1e12, executed / 1e12),
        (
            "peak allocated (GiB) vs plan without allowance",
            m.peak_allocated / gib,
            (mem.peak - mem.workspace) / gib,
        ),
        ("peak reserved (GiB) vs plan with allowance", m.peak_reserved / gib, mem.peak / gib),
    ]


def format_comparison(rows: list[tuple[str, float, float]]) -> str:
    lines = [f"{'':50s}{'measured':>10s}{'planned':>10s}{'ratio':>8s}"]
    lines += [f"{name:50s}{got:>10.3f}{want:>10.3f}{got / want:>8.2f}" for name, got, want in rows]
    return "\n".join(lines)


def measure(steps: int, folder: Path, gpu: str) -> Measured:
    import numpy as np
    import torch

    from svd.config import METRICS_PORT, compose
    from svd.launch.local import launch_local

    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    table = bench_train.make_table(folder, videos=4, size=(320, 576), seconds=2.0)
    peak = compose([f"gpu={gpu}", "data.table=unread"]).gpu.bf16_tflops * 1e12
    run_dir = folder / "run"
    cfg = compose(
        [
            *RUN,
            f"data.table={table}",
            f"checkpoint.run_dir={run_dir}",
            f"checkpoint.every={steps}",
            f"train.steps={steps}",
            f"data.cache_dir={folder / 'rows'}",
            "data.num_workers=4",
            f"metrics.port={METRICS_PORT}",  # the trainer counts FLOPs (for MFU) when it serves metrics
            f"metrics.gpu={gpu}",  # MFU against the catalogue's peak, as the plan's
            f"metrics.gpu_peak_flops.{gpu}={peak}",
        ]
    )
    result = launch_local(cfg)
    timed = np.array(result.step_seconds[1:])
    return Measured(
        step_seconds=float(timed.mean()),
        peak_allocated=float(result.peak_memory_bytes),
        peak_reserved=float(torch.cuda.max_memory_reserved()),
        flops_per_sample=float(result.flops_per_sample),
        peak_flops=float(result.peak_flops),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is not timed)")
    p.add_argument("--gpu", default=None, help="jobs/conf/gpu option; default: from the device name")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be ≥ 2 (the first step is not timed)")
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py measures a step on a CUDA GPU; none is available here", file=sys.stderr)
        return 2
    gpu = args.gpu or gpu_kind(torch.cuda.get_device_name())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="svd-bench-gpu-") as tmp:
        measured = measure(args.steps, Path(tmp), gpu)
    plan = planned(gpu)
    print(
        f"\nsvd preset, 14×320×576, bf16, FSDP2 + full activation checkpointing, 1 × {gpu}, "
        f"{args.steps - 1} timed steps"
    )
    print(format_comparison(comparison(plan, measured)))
    print(f"plan with the measured utilisation: python jobs/plan.py gpu={gpu} plan.mfu={measured.mfu:.3f} …")
    return 0


if __name__ == "__main__":
    sys.exit(main())
