"""Three real ranks on two "nodes" starting a loader, for tests/data/test_row_index.py:

    python row_index_worker.py TABLE SHARED OUT BUILD_S

Rank 0 is alone on node A; ranks 1 and 2 share node B (its own row-index cache folder, LOCAL_RANK 0 and 1).
The collective timeout is 10 s and every row-index build takes BUILD_S seconds longer than it would: the
ranks must still start. Each build and each download of an index is recorded in OUT/builds and
OUT/downloads; each rank writes OUT/rank<r>.json (its index file and bucket sizes) and rank 0's output
goes to OUT/rank0.out. Then every rank starts a loader on a table that does not exist and records the
error it got. Ranks are forked before anything has run in Lance or torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from svd.data import row_index
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, share_row_index
from svd.data.local_s3 import free_port
from svd.data.storage import Storage

WORLD = 3
NODE_OF_RANK = ("a", "b", "b")
COLLECTIVE_TIMEOUT_S = 10  # not less: gloo connects the ranks within it, on a busy host too


def record(out: Path, what: str, rank: int) -> None:
    with open(out / what, "a") as f:
        f.write(f"{rank}\n")


def slowed(out: Path, rank: int) -> None:
    """Every build sleeps first (a large table on a busy store); builds and downloads are recorded."""
    build, download = row_index.build, Storage._download

    def slow_build(*args, **kwargs):
        record(out, "builds", rank)
        time.sleep(float(sys.argv[4]))
        return build(*args, **kwargs)

    def counted_download(storage, uri, target):
        download(storage, uri, target)
        record(out, "downloads", rank)  # a download that happened (rank 0 looks for a published index first)

    row_index.build = slow_build
    Storage._download = counted_download


def rank_main(rank: int, port: int, table: str, shared: str, out: str) -> None:
    out_dir = Path(out)
    node = NODE_OF_RANK[rank]
    os.environ["LOCAL_RANK"] = str(NODE_OF_RANK[:rank].count(node))
    slowed(out_dir, rank)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0, timeout=timedelta(seconds=300))
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    cfg = LoaderConfig(
        table=table,
        buckets=(Bucket(16, 24, frames=4, batch_size=2, fps=4),),
        filter="motion_score > 0.5",
        num_workers=0,  # the loader is only opened here: its workers would open the same index file
        cache_dir=str(out_dir / f"cache-{node}"),
        index_timeout_s=300,
    )
    storage = Storage.from_env()
    with open(out_dir / f"rank{rank}.out", "w") as log, contextlib.redirect_stdout(log):
        share_row_index(cfg, storage, shared, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
        loader = ClipLoader(
            cfg, rank=rank, world_size=WORLD, storage=storage, build_index=False, shared_index=shared
        )
    missing, failure = dataclasses.replace(cfg, table=f"{table}-missing"), None
    try:
        share_row_index(missing, storage, shared, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    except Exception as e:  # rank 0's own error there, rank 0's error in one line everywhere else
        failure = f"{type(e).__name__}: {e}"
    result = {"index": str(loader.index.path), "sizes": list(loader.sizes), "failure": failure}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(rank_main, (free_port(), *sys.argv[1:4]), nprocs=WORLD, start_method="fork")
