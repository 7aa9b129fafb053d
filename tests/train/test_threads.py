"""The intra-op threads a CPU rank computes with: its share of the node's cores less one, so that OpenMP's
spin-waiting team never fights the loader workers, the checkpoint thread or a neighbouring program for a core
(a team thread that loses its core stalls every parallel region). No timing: the settings themselves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from svd.train.distributed import cpu_threads

ROOT = Path(__file__).resolve().parents[2]

RANK = """
import json, os, torch
from svd.train import distributed
env = distributed.init_distributed(60)
print(json.dumps({"threads": torch.get_num_threads(), "cpus": len(os.sched_getaffinity(0))}))
"""


@pytest.mark.parametrize(
    ("cpus", "local_ranks", "threads"),
    [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 3), (16, 1, 15), (16, 2, 7), (16, 8, 1), (64, 8, 7)],
)
def test_a_cpu_rank_shares_all_cores_but_one_with_the_other_ranks_of_its_node(cpus, local_ranks, threads):
    assert cpu_threads(cpus, local_ranks) == threads


def rank_settings(**env: str) -> dict[str, int]:
    """What a fresh rank process ends up with: one process, no launcher, no thread setting before."""
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    environment |= {"PYTHONPATH": str(ROOT), "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", **env}
    done = subprocess.run(
        [sys.executable, "-c", RANK], env=environment, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cpu_rank_computes_with_its_share_of_the_cores():
    got = rank_settings(LOCAL_WORLD_SIZE="1")
    assert got["threads"] == cpu_threads(got["cpus"], 1)


def test_an_explicit_omp_num_threads_is_kept():
    """torchrun, Ray and users who set it have decided: the rank does not override them."""
    assert rank_settings(OMP_NUM_THREADS="2")["threads"] == 2  # the policy would give 1 on 2 cores


def test_a_single_process_needs_no_port_and_ignores_a_master_port_left_in_its_environment():
    """A MASTER_PORT leaked into an environment (here: one another program holds) made every later
    one-process run of it fail with EADDRINUSE; one process meets no one, so it binds nothing."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        got = rank_settings(LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    assert got["threads"] == cpu_threads(got["cpus"], 1)
