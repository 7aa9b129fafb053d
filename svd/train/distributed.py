"""Joining the job's process group: the one place that knows about devices and backends.

- Device and backend: the device the launcher assigned ($SVD_DEVICE: Ray Train's), else CUDA + NCCL when a
  GPU is visible, else CPU + gloo. Nothing else in svd asks.
- CPU threads: a CPU rank computes with its share of the node's cores less one (`cpu_threads`), so that
  OpenMP's spin-waiting team never competes with the loader workers or a neighbouring program.
- The process group comes from the torch.distributed environment variables (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that every launcher sets; collectives get a timeout, so a dead
  rank fails the job instead of hanging it. A group the launcher already created (Ray Train's, with the
  same timeout) is joined as it is.
- NCCL's flight recorder is on: each rank keeps its last collectives in a ring and dumps them when one times
  out, so a hang leaves evidence of which rank stopped where (`nccl_flight_recorder_env`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size


# The rank's device, where its launcher assigned one: Ray Train knows which GPU it gave a worker
# (`ray.train.torch.get_device()`), and its visible GPUs need not be in local-rank order
DEVICE_ENV = "SVD_DEVICE"


def device_and_backend(local_rank: int) -> tuple[torch.device, str]:
    """The device of this rank ($SVD_DEVICE, else the local rank's GPU, else the CPU) and its backend."""
    if assigned := os.environ.get(DEVICE_ENV):
        device = torch.device(assigned)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return device, "nccl" if device.type == "cuda" else "gloo"


# The flight recorder's settings, unless the job's environment sets them: the last 2000 collectives per rank,
# dumped to TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank> (default /tmp/nccl_trace_rank_<rank>) on a timeout.
NCCL_FLIGHT_RECORDER = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


def nccl_flight_recorder_env(backend: str, environ: dict[str, str]) -> dict[str, str]:
    """The variables to add for `backend` (NCCL only), leaving those the environment already has."""
    if backend != "nccl":
        return {}
    return {k: v for k, v in NCCL_FLIGHT_RECORDER.items() if k not in environ}


def cpu_threads(cpus: int, local_world_size: int) -> int:
    """Intra-op threads of one CPU rank: the node's usable CPUs less one, shared by its local ranks.

    PyTorch's default (one thread per core, OpenMP's spin-waiting team) assumes the cores are the rank's
    alone. They are not: the loader workers decode on them, the checkpoint thread copies and uploads, and on
    a laptop some other program always runs. A team thread that loses its core stalls every parallel region
    while the others spin: with one busy program beside it, the demo's step took 2-3× as long on 2 cores,
    and 13× under a loaded machine, while one thread lost nothing. The core left over absorbs the rest.
    """
    return max(1, (cpus - 1) // local_world_size)


def set_cpu_threads(local_world_size: int) -> int:
    """Apply `cpu_threads` to this process and return the count. An explicit OMP_NUM_THREADS (the user's,
    torchrun's, Ray's) wins. A run-time setting, not an environment variable: OpenMP reads its variables
    once, when `import torch` loads it, before a library function could set them; `torch.set_num_threads`
    applies to every thread of the process from then on."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(cpu_threads(len(os.sched_getaffinity(0)), local_world_size))
    return torch.get_num_threads()


def init_distributed(timeout_s: float) -> DistEnv:
    """Joins the process group described by the environment (a single process needs no launcher)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device, backend = device_and_backend(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.update(nccl_flight_recorder_env(backend, dict(os.environ)))  # read when NCCL starts
    else:
        set_cpu_threads(local_world_size)
    if not dist.is_initialized():
        # One process meets no one: an in-memory store, no port, and nothing read from or written to the
        # environment (a MASTER_PORT left there by another run would be bound twice)
        store = dist.HashStore() if world_size == 1 else None
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    else:  # the launcher made the group (Ray Train: NCCL where it placed GPUs, else gloo)
        backend = dist.get_backend()
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)
