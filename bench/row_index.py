"""Start-up on a large clip table: the row index of a 10M-row table, the way ranks got it before and now, in
one run on the same store (local files, and a local Ceph radosgw):

  before: the first rank of every node scanned the table (all rows, the filter evaluated as a column in
          Python, uint64 offsets) while the others waited at a barrier bounded by the collective timeout;
  now:    rank 0 alone scans (filter pushed down to Lance, uint32 offsets) and publishes the index next to
          the run; every other node copies it once (on a shared file system it maps the published file).

    python bench/row_index.py --rows 10000000 --nodes 8 --store both

Each figure comes from fresh processes: one build alone (seconds, peak RSS above the process's size after
imports, bytes Lance read), then `--nodes` nodes starting at once, simulated as processes on this machine
(they share its cores and the one store): the seconds until every node holds its index and the bytes read
from the store by all of them. Ratios are now / before. The two indexes are checked to hold the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from loader import radosgw_storage  # noqa: E402 (bench/loader.py: start radosgw unless it runs)

from svd.data import buckets as bucketing  # noqa: E402
from svd.data import row_index  # noqa: E402
from svd.data.buckets import Bucket  # noqa: E402
from svd.data.loader import ClipLoader, LoaderConfig, ensure_row_index, open_table  # noqa: E402
from svd.data.local_s3 import create_bucket  # noqa: E402
from svd.data.schema import clip_schema  # noqa: E402
from svd.data.storage import Storage  # noqa: E402
from svd.data.synthetic import clip_table_batches  # noqa: E402

# A curation recipe (LVD-F-like thresholds) without the held-out split, as the trainer composes it.
FILTER = (
    "(motion_score > 0.25 AND aesthetic_score > 4 AND text_area < 0.07) AND (split IS NULL OR split != 'val')"
)
BUCKET = Bucket(256, 384, frames=14, batch_size=1, fps=8)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--nodes", type=int, default=8, help="nodes starting at once (processes here)")
    p.add_argument("--store", choices=("local", "radosgw", "both"), default="both")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # MODE TABLE CACHE SHARED: one measurement
    return p.parse_args()


def previous_build(table: lance.LanceDataset, expression: str, path: Path) -> None:
    """The build before this change, the baseline: every row scanned, the filter computed as a column and
    applied in Python, offsets counted from the batch positions and stored as uint64."""
    columns = dict(row_index._INDEX_COLUMNS) | {"keep": expression}
    offsets, base = [], 0
    for batch in table.scanner(columns=columns, scan_in_order=True, batch_size=1 << 16).to_batches():
        cols = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in row_index._INDEX_COLUMNS}
        assigned = bucketing.assign((BUCKET,), **cols)
        assigned[~batch.column("keep").fill_null(False).to_numpy(zero_copy_only=False)] = -1
        offsets.append(np.nonzero(assigned == 0)[0].astype(np.uint64) + np.uint64(base))
        base += batch.num_rows
    index = pa.table({"offset": np.concatenate(offsets)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, index.schema) as writer:
        writer.write_table(index)


def child(mode: str, table: str, cache: str, shared: str) -> None:
    """One node's start-up, measured from inside its process; prints one JSON line."""
    scans: list = []
    scanner = lance.LanceDataset.scanner

    def observed(self, *args, **kwargs):
        return scanner(self, *args, scan_stats_callback=scans.append, **kwargs)

    lance.LanceDataset.scanner = observed
    storage = Storage.from_env()
    fs, path = storage.fsspec(shared)
    fs.exists(path)  # a trainer's ranks have their storage clients already: the checkpointer probed the run
    print("ready", flush=True)
    sys.stdin.readline()  # every node starts at once, its interpreter and imports ready
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak from here on: the start-up, not the imports
    base = _kib("VmRSS")
    cfg = LoaderConfig(table=table, buckets=(BUCKET,), filter=FILTER, num_workers=0, cache_dir=cache)
    started = time.perf_counter()
    if mode == "before":
        opened = open_table(table, storage)
        row_index.content_id(opened)
        index = Path(cache) / "before.arrow"
        previous_build(opened, row_index.check_filter(opened, FILTER, table), index)
        copied = 0
    elif mode == "build":
        index = ensure_row_index(cfg, storage, shared=shared)
        copied = 0
    else:  # another node: open what rank 0 published
        index = ClipLoader(cfg, storage=storage, build_index=False, shared_index=shared).index.path
        copied = index.stat().st_size if str(index).startswith(cache) else 0
    seconds = time.perf_counter() - started
    result = {
        "seconds": seconds,
        "peak_mib": (_kib("VmHWM") - base) / 1024,
        "lance_bytes": sum(s.bytes_read for s in scans),
        "copied_bytes": copied,
        "index": str(index),
        "index_bytes": index.stat().st_size,
    }
    print(json.dumps(result))


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def run_children(modes: list[str], table: str, work: Path, shared: str) -> tuple[float, list[dict]]:
    """The given start-ups at once, each in its own process and cache folder (its node's disk); returns the
    seconds until the last one had its index, from the moment all were told to start."""
    processes = []
    for mode in modes:
        cache = tempfile.mkdtemp(prefix=f"{mode}-", dir=work)
        argv = [sys.executable, __file__, "--child", mode, table, cache, shared]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        processes.append(subprocess.Popen(argv, text=True, **pipes))
    for process in processes:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {modes[0]} start-up failed: {process.communicate()[1].strip()[-2000:]}")
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode:
            raise RuntimeError(f"a {modes[0]} start-up failed: {err.strip()[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return max(r["seconds"] for r in results), results


def offsets(path: str) -> np.ndarray:
    return pa.ipc.open_file(pa.memory_map(path)).read_all().column("offset").to_numpy().astype(np.int64)


def bench_store(name: str, table: str, shared: str, rows: int, nodes: int, work: Path) -> None:
    written = time.perf_counter()
    storage = Storage.from_env()
    batches = pa.RecordBatchReader.from_batches(clip_schema(), clip_table_batches(rows, "/no/video.mp4"))
    lance.write_dataset(batches, table, storage_options=storage.lance_options(table))
    print(f"\n{rows:,} rows on {name}: written in {time.perf_counter() - written:.1f} s")

    _, (before,) = run_children(["before"], table, work, shared)
    _, (after,) = run_children(["build"], table, work, shared)
    same = np.array_equal(offsets(before["index"]), offsets(after["index"]))
    kept = len(offsets(after["index"]))
    print(f"filter keeps {kept:,} rows; the two indexes hold the same rows: {same}")
    if not same:
        raise SystemExit("the indexes differ")
    print(f"{'one build':34s} {'before':>10s} {'now':>10s} {'now/before':>11s}")
    for label, key, scale in (
        ("  seconds", "seconds", 1),
        ("  peak RSS (MiB)", "peak_mib", 1),
        ("  read by Lance (MB)", "lance_bytes", 1e-6),
        ("  index file (MB)", "index_bytes", 1e-6),
    ):
        a, b = before[key] * scale, after[key] * scale
        print(f"{label:34s} {a:10.2f} {b:10.2f} {b / a:11.2f}")

    old_wall, olds = run_children(["before"] * nodes, table, work, shared)
    build_wall, (built,) = run_children(["build"], table, work, f"{shared}-nodes")
    open_wall, opens = run_children(["open"] * (nodes - 1), table, work, f"{shared}-nodes")
    new_wall = build_wall + open_wall  # the others wait for the build, then copy it at once
    old_bytes = sum(r["lance_bytes"] for r in olds)
    new_bytes = built["lance_bytes"] + sum(r["lance_bytes"] + r["copied_bytes"] for r in opens)
    print(f"{nodes} nodes at once {'':16s} {'before':>10s} {'now':>10s} {'now/before':>11s}")
    print(
        f"{'  seconds until all have it':34s} {old_wall:10.2f} {new_wall:10.2f} {new_wall / old_wall:11.2f}"
    )
    print(f"{'    now: the build, then the copies':34s} {'':10s} {build_wall:5.2f}+{open_wall:4.2f}")
    print(
        f"{'  read from the store (MB)':34s} {old_bytes / 1e6:10.1f} {new_bytes / 1e6:10.1f} "
        f"{new_bytes / old_bytes:11.2f}"
    )
    worst_old, worst_new = (
        max(r["peak_mib"] for r in olds),
        max(built["peak_mib"], *(r["peak_mib"] for r in opens)),
    )
    print(
        f"{'  largest peak RSS (MiB)':34s} {worst_old:10.1f} {worst_new:10.1f} {worst_new / worst_old:11.2f}"
    )


def main() -> None:
    args = parse_args()
    if args.child:
        child(*args.child)
        return
    if args.nodes < 2:
        raise SystemExit(f"--nodes={args.nodes} must be ≥ 2")
    with tempfile.TemporaryDirectory(prefix="bench-row-index-") as tmp:
        work = Path(tmp)
        if args.store in ("local", "both"):
            bench_store(
                "local files",
                str(work / "clips.lance"),
                str(work / "run" / "row_index"),
                args.rows,
                args.nodes,
                work,
            )
        if args.store in ("radosgw", "both"):
            with radosgw_storage() as storage:
                bucket = f"bench-row-index-{os.getpid()}"
                create_bucket(storage, bucket)
                try:
                    bench_store(
                        "radosgw",
                        f"s3://{bucket}/clips.lance",
                        f"s3://{bucket}/run/row_index",
                        args.rows,
                        args.nodes,
                        work,
                    )
                finally:  # the gateway keeps objects in memory
                    fs, path = storage.fsspec(f"s3://{bucket}")
                    fs.rm(path, recursive=True)


if __name__ == "__main__":
    main()
