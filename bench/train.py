"""The trainer's overhead: its step time in the production configuration ÷ a bare PyTorch loop, in one run.

    python bench/train.py                   # CPU, one process: the tiny UNet at 8×32×32 (about 3 minutes)
    python bench/train.py --preset small    # CPU, one process: the small UNet at 8×64×64
    python bench/train.py --preset svd      # one GPU: the 1.5B UNet at 14×320×576, bf16, full activation
                                            # checkpointing; also prints peak memory and MFU
    python bench/train.py parallel.sharding=none    # settings for both loops, as jobs/launch.py takes them
    python bench/train.py --profile         # also: a profiled step (profile.steps) ÷ an unprofiled one

Every mode compares two loops on one process, in the same run:

- the trainer (`svd.train`, launched as `jobs/launch.py` launches it) in the production configuration:
  2 loader workers reading a generated clip table from object storage, the metrics endpoint on a free
  port, validation and a preview every 2 × --checkpoint-every steps, an asynchronous checkpoint every
  --checkpoint-every steps to radosgw (the AWS_* variables that `infra/local/radosgw.sh start` prints; when
  they are not set the benchmark runs that script itself; --store local writes to a local folder instead);
- a bare loop: the same model (sharded as the trainer shards it), batch and AdamW and nothing else:
  forward, backward and optimizer step over tensors made once (no loader, EMA, gradient clipping,
  metrics, loss all-reduce, checkpoints, validation or previews).

The bare loop runs before and after the trainer and the mean of both is the baseline: the machine may be
shared and noisy, so only ratios within one run mean much. The trainer's steps are timed in windows that
each start with a checkpoint (every other one with a validation and a preview too). The last steps of each
window, once the save's background work is done, give the trainer's own step time; each window's excess
over it is what a checkpoint (or a validation and a preview) costs, stall and background work included.
Printed, against the bare step:
- the trainer's step between those events;
- the checkpoint stall: the longest time `Checkpointer.save` held the loop (goal < 10 %), and what a
  checkpoint costs in all; the run's first save, which allocates the CPU copy that later saves refresh,
  is reported on its own;
- what a validation and a preview cost;
- the production step: the trainer's step with each event spread over the interval the stage's full-size
  configuration has for it (checkpoint.every, train.val_every): the step time of a production run
  (goal ≤ 1.10).

With --profile, a second trainer run traces the settled steps of its first window (`profile.steps`) and the
benchmark prints what a traced step costs against the same run's steps outside the trace, and what those
cost against the unprofiled run's (outside its window the profiler costs nothing: ≈ 1).
"""

# No `from __future__ import annotations`: bench/gpu.py loads this file by path, without registering it as
# a module, and dataclasses resolve string annotations through their module.

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    frames: int
    height: int
    width: int
    batch: int  # global batch = micro-batch: one process, one forward per step in both loops
    factor: int  # space_to_depth pixels per latent side


# The svd preset at the released latent size (40×72) through the lossless space_to_depth autoencoder, with
# 192 instead of 4 channels at the input and output convs only: no weights needed.
SHAPES = {"tiny": Shape(8, 32, 32, 4, 2), "small": Shape(8, 64, 64, 2, 2), "svd": Shape(14, 320, 576, 1, 8)}
SETTLED_AFTER = 2  # steps after a checkpoint or validation by which its background work is assumed done


@dataclass(frozen=True)
class TrainerRun:
    loop_seconds: list[float]  # per step: the step and the checkpoint, validation and preview after it
    blocked: list[float]  # per checkpoint: how long `Checkpointer.save` held the loop
    peak_memory_bytes: int
    flops_per_sample: float | None
    peak_flops: float | None


@dataclass(frozen=True)
class Costs:
    """Seconds, from one run."""

    bare: float  # a bare step (mean of the runs before and after the trainer)
    step: float  # a trainer step between checkpoints and validations
    first_stall: float  # the run's first save: it allocates the CPU copy (once per process)
    stall: float  # the longest stall of the saves after it
    checkpoint: float  # a checkpoint in all: its stall and its slowing of the steps after it
    validation: float  # a validation and a preview
    checkpoint_every: int  # steps between them in the stage's full-size configuration
    validation_every: int

    @property
    def production(self) -> float:
        return self.step + self.checkpoint / self.checkpoint_every + self.validation / self.validation_every


def make_table(
    folder: Path | str, videos: int, size: tuple[int, int], seconds: float, *, held_out: int = 0, storage=None
) -> str:
    """A generated clip table (moving squares, one clip per video, the last `held_out` in the val split)
    under `folder` (a path or a URI); returns the table's URI."""
    from svd.data.storage import Storage, join, scheme
    from svd.data.synthetic import synthetic_corpus
    from svd.data.table import write_clip_table

    storage = storage or Storage()
    base = str(folder)
    if scheme(base) == "file":
        Path(base.removeprefix("file://"), "raw").mkdir(parents=True, exist_ok=True)
    rows = synthetic_corpus(
        join(base, "raw"), storage, videos=videos, seconds=seconds, size=size, clip_seconds=seconds
    )
    for row in rows[len(rows) - held_out :]:
        row["split"] = "val"
    table = join(base, "clips.lance")
    write_clip_table(table, rows, storage)
    return table


@contextlib.contextmanager
def object_store(kind: str, folder: Path) -> Iterator[tuple[str, Any]]:
    """(base URI, Storage) of a fresh place for the table and the run: a bucket on the S3 endpoint of the
    AWS_* variables, else on the radosgw that infra/local/radosgw.sh starts (and leaves running: others may
    use it); or a local folder. The bucket is deleted on the way out."""
    from svd.data.local_s3 import create_bucket
    from svd.data.storage import Storage

    if kind == "local":
        yield str(folder / "store"), Storage()
        return
    if not os.environ.get("AWS_ENDPOINT_URL_S3"):
        done = subprocess.run([str(ROOT / "infra/local/radosgw.sh"), "start"], capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"bench/train.py: radosgw did not start ({last}); pass --store local")
        exports = (line.removeprefix("export ") for line in done.stdout.splitlines())
        os.environ.update(dict(line.split("=", 1) for line in exports if "=" in line))
    storage = Storage.from_env()
    bucket = f"bench-train-{uuid.uuid4().hex[:8]}"
    create_bucket(storage, bucket)
    try:
        yield f"s3://{bucket}", storage
    finally:
        fs, _ = storage.fsspec(f"s3://{bucket}")
        fs.rm(bucket, recursive=True)


def run_config(
    args: argparse.Namespace, shape: Shape, table: str, run_dir: str, folder: Path, *extra: str
) -> Any:
    """The trainer's configuration: the stage's, sized by the preset, with every part of production on."""
    from svd.config import compose
    from svd.data.local_s3 import free_port

    every = args.checkpoint_every
    gpu = (
        ["parallel.mixed_precision=bf16", "parallel.activation_checkpointing=full"]
        if args.preset == "svd"
        else []
    )
    return compose(
        [
            "stage=video_pretrain",
            f"model={args.preset}",
            "model.autoencoder=space_to_depth",
            f"model.autoencoder_factor={shape.factor}",
            f"data.table={table}",
            f"data.frames={shape.frames}",
            f"data.height={shape.height}",
            f"data.width={shape.width}",
            f"data.micro_batch={shape.batch}",
            f"data.num_workers={args.workers}",
            f"data.cache_dir={folder / 'rows'}",
            f"train.global_batch={shape.batch}",
            f"train.steps={(args.windows + 1) * every}",
            f"train.val_every={2 * every}",
            f"train.preview_every={2 * every}",
            f"checkpoint.run_dir={run_dir}",
            f"checkpoint.every={every}",
            "checkpoint.async_save=true",
            f"metrics.port={free_port()}",
            "gpus_per_node=1",
            *gpu,
            *args.overrides,
            *extra,
        ]
    )


def production_intervals() -> tuple[int, int]:
    """(checkpoint.every, the more frequent of train.val_every and train.preview_every) of the stage's
    full-size configuration (the test presets switch validation and previews off)."""
    from svd.config import compose

    cfg = compose(["stage=video_pretrain", "model=svd", "data.table=unread"])
    return cfg.checkpoint.every, min(
        every for every in (cfg.train.val_every, cfg.train.preview_every) if every
    )


def bare_loop(cfg: Any, steps: int, warmup: int) -> list[float]:
    """Seconds of each timed step of a plain forward/backward/AdamW loop over one pre-made batch, on the model
    the trainer trains: built, sharded (FSDP2 over this one process where the configuration shards) and
    optimised as the trainer does it."""
    import torch
    import torch.distributed as dist

    from svd.data.local_s3 import free_port
    from svd.diffusion.edm import Denoiser, weighted_denoising_error
    from svd.model.video_unet import VideoUNet
    from svd.train import distributed, parallel
    from svd.train.optim import build_optimizer
    from svd.train.task import Task, unet_config

    os.environ["MASTER_PORT"] = str(free_port())
    env = distributed.init_distributed(cfg.parallel.collective_timeout_s)
    try:
        task = Task.build(cfg, env.device)
        torch.manual_seed(cfg.train.seed)
        with torch.device(env.device):
            model = Denoiser(VideoUNet(unet_config(cfg, task.latent_channels)))
        mesh = parallel.build_mesh(env, cfg.parallel.sharding, cfg.parallel.collective_timeout_s)
        parallel.parallelize(model, list(model.network.block_pairs()), mesh, cfg.parallel, env.device)
        optimizer = build_optimizer(model, cfg.train)
        latents, cond, randoms = task.prepare(example_batch(cfg), cfg.train.seed)
        seconds = []
        for _ in range(warmup + steps):
            synchronize(env.device)
            started = time.perf_counter()
            weighted_denoising_error(model, latents, cond, randoms.sigma, randoms.eps).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(env.device)
            seconds.append(time.perf_counter() - started)
        del model, optimizer
    finally:
        dist.destroy_process_group()
    release_memory(env.device)
    return seconds[warmup:]


def example_batch(cfg: Any) -> dict[str, Any]:
    """A batch as the loader delivers one (uint8 frames, captions, micro-conditioning, stream positions)."""
    import torch

    b, d = cfg.train.global_batch, cfg.data
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return {
        "frames": torch.randint(0, 256, (b, d.frames, 3, d.height, d.width), generator=generator).byte(),
        "caption": [""] * b,
        "fps_id": torch.full((b,), d.fps - 1),
        "motion_bucket_id": torch.full((b,), 127.0),
        "position": torch.arange(b),
        "bucket": 0,
    }


def trainer_loop(cfg: Any) -> TrainerRun:
    from svd.data.local_s3 import free_port
    from svd.launch.local import launch_local

    os.environ["MASTER_PORT"] = str(free_port())
    result = launch_local(cfg)
    run = TrainerRun(
        loop_seconds=result.loop_seconds,
        blocked=result.checkpoint_blocked_seconds,
        peak_memory_bytes=result.peak_memory_bytes,
        flops_per_sample=result.flops_per_sample,
        peak_flops=result.peak_flops,
    )
    del result
    release_memory(default_device())
    return run


def costs(bare: list[float], run: TrainerRun, every: int, production: tuple[int, int]) -> Costs:
    """Splits the trainer's time into its step and its events. Window w (from 1) holds the steps
    w·every … (w+1)·every − 1: a checkpoint at its first step, with a validation and a preview in even
    windows; its steps from SETTLED_AFTER on are the trainer's plain steps."""
    windows = [
        run.loop_seconds[w * every - 1 : (w + 1) * every - 1]
        for w in range(1, len(run.loop_seconds) // every)
    ]
    step = statistics.fmean(s for window in windows for s in window[SETTLED_AFTER:])
    excess = [sum(window) - every * step for window in windows]
    checkpoint = statistics.fmean(excess[0::2])
    return Costs(
        bare=statistics.fmean(bare),
        step=step,
        first_stall=run.blocked[0],
        stall=max(run.blocked[1 : len(windows)]),
        checkpoint=checkpoint,
        validation=statistics.fmean(excess[1::2]) - checkpoint,
        checkpoint_every=production[0],
        validation_every=production[1],
    )


def profiled_window(every: int) -> list[int]:
    """profile.steps of the profiled run: the settled steps of window 1 (see `costs`)."""
    return [every + SETTLED_AFTER, 2 * every - 1]


def profile_report(profiled: TrainerRun, every: int, unprofiled_step: float) -> str:
    """A traced step against the same run's steps outside the trace, and those against the unprofiled run's
    (the trace's export, after its last step, is in no step's time)."""
    windows = [
        profiled.loop_seconds[w * every - 1 : (w + 1) * every - 1]
        for w in range(1, len(profiled.loop_seconds) // every)
    ]
    traced = statistics.fmean(windows[0][SETTLED_AFTER:])
    outside = statistics.fmean(s for window in windows[1:] for s in window[SETTLED_AFTER:])
    first, last = profiled_window(every)
    return "\n".join(
        [
            f"profiled run (profile.steps=[{first},{last}]):",
            f"{'traced step':22s}{traced:7.3f} s/step  {traced / outside:.3f} × its steps outside the trace",
            f"{'step outside the trace':22s}{outside:7.3f} s/step  {outside / unprofiled_step:.3f} × the "
            "unprofiled run's step",
        ]
    )


def report(title: str, c: Costs, bare_runs: tuple[float, float]) -> str:
    def row(name: str, seconds: float, unit: str, versus_bare: str) -> str:
        return f"{name:22s}{seconds:7.3f} {unit:8s}{versus_bare}"

    b = c.bare
    return "\n".join(
        [
            title,
            row(
                "bare loop", b, "s/step", f"(before the trainer {bare_runs[0]:.3f}, after {bare_runs[1]:.3f})"
            ),
            row(
                "trainer step",
                c.step,
                "s/step",
                f"{c.step / b:.3f} × bare (between checkpoints, validations)",
            ),
            row("first save's stall", c.first_stall, "s", f"{c.first_stall / b:.1%} of a bare step (once)"),
            row("checkpoint stall", c.stall, "s", f"{c.stall / b:.1%} of a bare step (goal < 10 %)"),
            row(
                "checkpoint in all",
                c.checkpoint,
                "s",
                f"{c.checkpoint / b:.1f} bare steps (stall, copy, upload)",
            ),
            row("validation + preview", c.validation, "s", f"{c.validation / b:.1f} bare steps"),
            row("production step", c.production, "s/step", f"{c.production / b:.3f} × bare (goal ≤ 1.10)")
            + f": checkpoint every {c.checkpoint_every}, validation + preview every {c.validation_every}",
        ]
    )


def default_device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(SHAPES), default="tiny", help="tiny, small: CPU; svd: one GPU")
    p.add_argument(
        "--steps", type=int, default=30, help="timed steps of each bare loop (default: %(default)s)"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed first bare steps (default: %(default)s)")
    p.add_argument("--windows", type=int, default=6, help="timed trainer windows (default: %(default)s)")
    p.add_argument(
        "--checkpoint-every", type=int, default=6, help="trainer steps per window (default: %(default)s)"
    )
    p.add_argument("--workers", type=int, default=2, help="loader workers (default: %(default)s)")
    p.add_argument("--store", choices=("radosgw", "local"), default="radosgw", help="table and run directory")
    p.add_argument("--profile", action="store_true", help="also time a run with profile.steps on")
    p.add_argument("overrides", nargs="*", help="settings for both loops, e.g. parallel.sharding=none")
    args = p.parse_args(argv)
    for name, least in (("steps", 1), ("warmup", 0), ("windows", 2), ("checkpoint_every", SETTLED_AFTER + 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be ≥ {least}")
    if args.workers < 2:
        p.error(f"--workers={args.workers}: production runs 2 or more loader workers")
    import torch

    if args.preset == "svd" and not torch.cuda.is_available():
        raise SystemExit("bench/train.py: --preset svd needs a GPU (CUDA); on CPU use --preset tiny or small")
    if not torch.cuda.is_available():
        from svd.train.distributed import set_cpu_threads

        set_cpu_threads(local_world_size=1)  # the bare loop computes with the threads a rank gets
    shape = SHAPES[args.preset]
    with (
        tempfile.TemporaryDirectory(prefix="svd-bench-train-") as tmp,
        object_store(args.store, Path(tmp)) as (
            base,
            storage,
        ),
    ):
        table = make_table(base, 4, (shape.height, shape.width), 2.0, held_out=1, storage=storage)
        cfg = run_config(args, shape, table, f"{base}/run", Path(tmp))
        before = bare_loop(cfg, args.steps, args.warmup)
        run = trainer_loop(cfg)
        after = bare_loop(cfg, args.steps, args.warmup)
        if args.profile:
            window = ",".join(map(str, profiled_window(args.checkpoint_every)))
            profiled_cfg = run_config(
                args, shape, table, f"{base}/run-profiled", Path(tmp), f"profile.steps=[{window}]"
            )
            profiled = trainer_loop(profiled_cfg)
    c = costs(before + after, run, args.checkpoint_every, production_intervals())
    store = f"radosgw at {os.environ['AWS_ENDPOINT_URL_S3']}" if args.store == "radosgw" else "local files"
    size = f"{shape.frames}×{shape.height}×{shape.width}"
    title = (
        f"\n{args.preset} preset, {size}, batch {shape.batch}, 1 process, sharding {cfg.parallel.sharding}, "
        f"{torch.get_num_threads()} CPU threads; {args.windows} windows of {args.checkpoint_every} trainer "
        f"steps, {args.steps} bare steps (after {args.warmup}) before and after; checkpoints to {store}"
    )
    print(report(title, c, (statistics.fmean(before), statistics.fmean(after))))
    if args.profile:
        print(profile_report(profiled, args.checkpoint_every, c.step))
    if args.preset == "svd":
        line = f"peak memory {run.peak_memory_bytes / 2**30:.1f} GiB"
        if run.flops_per_sample and run.peak_flops:
            mfu = run.flops_per_sample * shape.batch / c.step / run.peak_flops
            line += (
                f"; {run.flops_per_sample / 1e12:.1f} TFLOP per sample (forward + backward); MFU {mfu:.1%}"
            )
        print(line)


if __name__ == "__main__":
    main()
