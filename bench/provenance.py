"""Provenance of a checkpoint at scale: which of a 10M-row table's clips a run of 1M steps at global batch
1536 (1.5·10⁹ samples, ~150 epochs) trained on, answered by `jobs/provenance.py` from its lineage.

    python bench/provenance.py                                   # 10M rows, 1M steps (minutes to set up)
    python bench/provenance.py --rows 20000 --steps 300 --global-batch 192       # seconds

Set-up (not timed): a synthetic clip table (`clip_table_batches`), its row index, and a run directory holding
one checkpoint whose lineage has three segments (the run resumed on other world sizes, batch sizes and
accumulations) and `--replaced` replaced positions. Timed: `jobs/provenance.py run=… checkpoint=… out=….arrow`
in a fresh process; printed: its wall time, its peak RSS, and the rows written.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lance
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svd.config import compose, to_yaml  # noqa: E402
from svd.data.loader import ClipLoader  # noqa: E402
from svd.data.schema import clip_schema  # noqa: E402
from svd.data.storage import Storage, join  # noqa: E402
from svd.data.synthetic import clip_table_batches  # noqa: E402
from svd.train import lineage as lineages  # noqa: E402
from svd.train.checkpoint import Checkpointer  # noqa: E402
from svd.train.run_files import RunFiles  # noqa: E402
from svd.train.trainer import loader_config  # noqa: E402

BUCKET = ("data.height=256", "data.width=384", "data.frames=14", "data.fps=8")


def write_table(uri: str, rows: int) -> None:
    """A clip table of `rows` synthetic rows (clip_id `clip-<row>`), unless one is there."""
    if Path(uri).exists():
        return
    batches = clip_table_batches(rows, "s3://bucket/raw/video.mp4")
    lance.write_dataset(pa.RecordBatchReader.from_batches(clip_schema(), batches), uri)


def run_config(table: str, run: str, world: int, micro_batch: int, accumulation: int, seed: int):
    return compose(
        [
            "stage=video_pretrain",
            "model=tiny",
            f"data.table={table}",
            f"checkpoint.run_dir={run}",
            *BUCKET,
            f"data.micro_batch={micro_batch}",
            f"nodes={world}",
            "gpus_per_node=1",
            f"train.global_batch={world * micro_batch * accumulation}",
            f"train.seed={seed}",
        ]
    )


def synthetic_run(
    table: str,
    run: str,
    segments: list[tuple[int, int, int, int]],
    *,
    replaced: int,
    seed: int = 0,
    storage: Storage | None = None,
) -> dict[str, Any]:
    """A run directory whose one checkpoint records what a run of these segments (steps, world size, micro
    batch, accumulation) would: the loader state after them and its lineage, with `replaced` replacements
    at random consumed positions. Returns the checkpoint's `data` part."""
    storage = storage or Storage()
    rng = np.random.default_rng(seed)
    lineage, step, loader = None, 0, None
    for steps, world, micro_batch, accumulation in segments:
        cfg = run_config(table, run, world, micro_batch, accumulation, seed)
        config = loader_config(cfg, validation=False)
        if loader is None:
            loader = ClipLoader(
                config, rank=0, world_size=1, storage=storage, shared_index=join(run, "row_index")
            )
        loader.cfg = config  # this segment's batch size
        lineage = lineages.begin(
            lineage,
            step=step,
            loader=loader,
            world_size=world,
            accumulation=accumulation,
            config_yaml=to_yaml(cfg),
            init_from=None,
            curation={},
        )
        sampler = loader.sampler(world, (micro_batch,), loader.state)
        sampler.schedule(steps * accumulation)
        loader.state = sampler.state
        step += steps
    consumed = loader.state.consumed[0]
    positions = rng.choice(consumed, size=min(replaced, consumed), replace=False)
    by = rng.integers(0, consumed + loader.sizes[0], positions.size)
    lineage = lineages.with_replaced(
        lineage, [[0, int(p), int(b), "corrupt"] for p, b in zip(positions, by, strict=True)]
    )
    data = loader.state_dict() | {"lineage": lineage}
    with Checkpointer(run, storage, async_save=False, keep=None) as checkpointer:
        checkpointer.save(step, {"data": data, "train": {"step": step}})
    RunFiles(run, storage).write("config.yaml", lineage["segments"][-1]["config"])
    return data


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--global-batch", type=int, default=1536)
    p.add_argument("--replaced", type=int, default=10_000)
    p.add_argument("--workdir", default=None, help="keeps the table between runs (default: a temporary one)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="provenance-bench-"))
    table, run = str(work / f"clips-{args.rows}.lance"), str(work / f"run-{args.rows}-{args.steps}")
    g = args.global_batch
    # three world sizes, each with the same global batch: half the run on g/3 ranks of 3, then g/6 of 6, then
    # g/12 ranks of 3 with 4 micro-batches (a run of 1536 on 512, 256 and 128 GPUs)
    third = args.steps // 4
    segments = [(args.steps - 3 * third, g // 3, 3, 1), (2 * third, g // 6, 6, 1), (third, g // 12, 3, 4)]
    started = time.perf_counter()
    write_table(table, args.rows)
    if not Path(run).exists():
        synthetic_run(table, run, segments, replaced=args.replaced)
    print(f"set-up: {time.perf_counter() - started:.1f} s ({work})")
    out = work / "clips.arrow"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "jobs" / "provenance.py"), f"run={run}", f"checkpoint={args.steps}"]
    started = time.perf_counter()
    subprocess.run([*command, f"out={out}"], check=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with pa.memory_map(str(out)) as source:
        written = pa.ipc.open_file(source).read_all()
    samples = args.steps * g
    print(
        f"provenance of {samples:,} samples ({args.steps:,} steps × {g}) over {args.rows:,} rows: "
        f"{seconds:.1f} s, peak RSS {peak_mib:.0f} MiB, {written.num_rows:,} clips, "
        f"{int(np.asarray(written.column('times_seen')).sum()):,} reads"
    )


if __name__ == "__main__":
    main()
