"""A rank that stops answering (SIGSTOP: a hung driver, a node swapping to death) fails the run within
`parallel.collective_timeout_s` instead of hanging it: every process group and collective honours it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from svd.data.local_s3 import free_port

from ..processes import alive, descendants, launched_ranks
from ..settings import production_settings
from .conftest import ROOT

COLLECTIVE_TIMEOUT_S = 20
# The healthy rank's training collective and its checkpoint thread's time out (at most one after the other),
# then the elastic agent gives the stopped rank 30 s to honour SIGTERM before it kills it; the rest is slack
# for a loaded machine (measured: 58 s). Before every group had the timeout, the run hung for torch's
# default of 30 minutes.
ENDS_WITHIN_S = 2 * COLLECTIVE_TIMEOUT_S + 30 + 60


FREEZE_THE_LAST_RANK = """
import os, signal, sys, time
import torch, torch.distributed as dist
from svd.train.checkpoint import Checkpointer
from svd.train.distributed import init_distributed
from svd.train.parallel import build_mesh
run_dir, timeout_s, what, table = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
env = init_distributed(300)  # the default group's timeout: the rendezvous waits for slow starts
if what == "checkpoint":  # DCP's async save thread waits for the other rank in the checkpoint's own group
    checkpointer = Checkpointer(run_dir, collective_timeout_s=timeout_s)
    wait = lambda: (checkpointer.save(1, {"ema": {"w": torch.ones(4)}}), checkpointer.wait())
elif what == "row index":  # the group rank 0 hands its row index over in (the validation loader's: built
    # at the first validation, while a rank may already be frozen); the others' deadline is an hour
    from svd.data.buckets import Bucket
    from svd.data.loader import LoaderConfig, share_row_index
    from svd.data.storage import Storage
    cfg = LoaderConfig(table, (Bucket(16, 24, 4, 1, fps=4),), cache_dir=f"{run_dir}/cache")
    wait = lambda: share_row_index(cfg, Storage(), f"{run_dir}/shared", collective_timeout_s=timeout_s)
else:  # a 2 × 2 HSDP mesh: its replicate groups [0, 2] and [1, 3] are groups of their own
    group = build_mesh(env, "hsdp", timeout_s).get_group("replicate")
    wait = lambda: dist.all_reduce(torch.ones(1), group=group)
frozen = env.world_size - 1
if env.rank == frozen:
    os.kill(os.getpid(), signal.SIGSTOP)
elif env.rank != frozen - env.local_world_size:  # not in the frozen rank's group: keep the job's store up
    time.sleep(600)
started = time.monotonic()
try:
    wait()
finally:
    print(f"{time.monotonic() - started:.1f}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("group", "nodes", "ranks_per_node"), [("checkpoint", 2, 1), ("hsdp mesh", 2, 2), ("row index", 2, 1)]
)
def test_a_process_group_waits_for_a_frozen_rank_no_longer_than_the_collective_timeout(
    tmp_path, local_table, group, nodes, ranks_per_node
):
    """The groups the code creates beside the job's own get the timeout they are given, whatever the
    default group's: torch's default for a new group is 30 minutes, the row index's an hour."""
    timeout_s, world = 5, nodes * ranks_per_node
    env = os.environ | {"PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env |= {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(ranks_per_node)}
    argv = [sys.executable, "-c", FREEZE_THE_LAST_RANK, str(tmp_path / "run"), str(timeout_s), group]
    argv.append(local_table)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    ranks = [
        subprocess.Popen(argv, env=env | {"RANK": str(r), "LOCAL_RANK": str(r % ranks_per_node)}, **pipes)
        for r in range(world)
    ]
    observer = ranks[world - 1 - ranks_per_node]  # the frozen rank's partner in its group
    try:
        stdout, stderr = observer.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the frozen rank's partner still waits for it after 300 s")
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.kill(rank.pid, signal.SIGCONT)
                rank.kill()
            rank.communicate()
    assert observer.returncode == 1, stderr[-3000:]
    assert timeout_s <= float(stdout) < timeout_s + 10
    last = stderr.strip().splitlines()[-1]  # torch prefixes a rank's uncaught error with "[rankN]: "
    if group == "row index":  # gloo could not connect the group: its store wait names no operation
        assert last.startswith(
            f"[rank0]: svd.data.loader.LoaderError: sharing the row index of {local_table}: a rank did not "
            f"join within parallel.collective_timeout_s={timeout_s} ("
        ), last
        return
    assert f"Timed out waiting {timeout_s * 1000}ms" in last
    if group == "checkpoint":
        assert f"CheckpointError: saving {tmp_path}/run/checkpoints/step-00000001 failed: " in last
        assert last.endswith(f"(a rank did not answer within parallel.collective_timeout_s={timeout_s})")


@pytest.mark.slow
def test_a_frozen_rank_fails_the_run_within_the_collective_timeout_and_leaves_no_process(
    train_table, s3_env, moto_s3, tmp_path
):
    run_dir = f"{train_table['bucket']}/runs/frozen"
    settings = production_settings(
        train_table["table"],
        run_dir,
        "gpus_per_node=2",
        "train.steps=10000",
        "checkpoint.every=1",  # a save is in flight most of the time: the checkpoint's own group is in use
        f"parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    )
    argv = [sys.executable, str(ROOT / "jobs" / "launch.py"), *settings]
    stderr_path = tmp_path / "stderr"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    with open(tmp_path / "stdout", "w") as stdout, open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, start_new_session=True
        )
    fs, marker = moto_s3.storage.fsspec(f"{run_dir}/checkpoints/latest")
    frozen, started = None, set()
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(marker):
            assert process.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        ranks = launched_ranks(process.pid, 2)
        started = descendants(process.pid)
        assert len(started) >= 2 + 2 * 2, started  # two ranks and their loader workers at least
        frozen = ranks[-1]
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            process.wait(timeout=ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run still hangs {ENDS_WITHIN_S} s after a rank froze")
        took = time.monotonic() - frozen_at
    finally:
        if frozen is not None and alive(frozen):
            os.kill(frozen, signal.SIGCONT)
            os.kill(frozen, signal.SIGKILL)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    print(f"the run ended {took:.0f} s after rank 1 froze")
    stderr = stderr_path.read_text()
    lines = stderr.strip().splitlines()
    assert process.returncode == 1, lines[-20:]
    # (the launcher's line may be followed by multiprocessing's warnings about the killed rank's semaphores)
    assert any(line.startswith("launch: training failed") for line in lines[-5:]), lines[-20:]
    # the healthy rank gave up on the frozen one after the configured timeout, not torch's default
    assert f"Timed out waiting {COLLECTIVE_TIMEOUT_S * 1000}ms" in stderr, lines[-40:]
    deadline = time.monotonic() + 15  # orphaned loader workers notice their rank is gone within 5 s
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)], "processes left behind"
