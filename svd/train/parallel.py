"""Where the run executes and how the model is spread over it: the one place that knows about devices.

- Device and backend: CUDA + NCCL when a GPU is visible, else CPU + gloo. Nothing else in svd asks.
- The process group comes from the torch.distributed environment variables (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that every launcher sets; collectives get a timeout, so a dead
  rank fails the job instead of hanging it. A group the launcher already created (Ray Train's, with the
  same timeout) is joined as it is.
- The mesh: plain FSDP2 over all ranks, or HSDP (replicate across nodes, shard within a node), where
  parameters are all-gathered over the fast intra-node links only.
- `parallelize` is applied *to* a built model (torchtitan's pattern; the model never knows it is
  sharded): activation checkpointing and `torch.compile` per spatial+temporal block pair, `fully_shard`
  per block pair, then the root. Parameter names do not change, so checkpoints and EMA keys are the same
  whatever the settings.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from svd.config import ParallelConfig
from svd.data.local_s3 import free_port


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


def init_distributed(timeout_s: float) -> DistEnv:
    """Joins the process group described by the environment (a single process needs no launcher)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    device, backend = device_and_backend(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world_size == 1:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    else:  # the launcher made the group (Ray Train: NCCL where it placed GPUs, else gloo)
        backend = dist.get_backend()
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


def resolve_sharding(setting: str, nodes: int) -> str:
    """`parallel.sharding` with `auto` decided: HSDP across several nodes, FSDP within one."""
    if setting == "auto":
        return "hsdp" if nodes > 1 else "fsdp"
    return setting


def build_mesh(env: DistEnv, sharding: str) -> DeviceMesh | None:
    """None when not sharding; a 1-D mesh for FSDP; (replicate, shard) = (nodes, gpus per node) for HSDP."""
    sharding = resolve_sharding(sharding, env.nodes)
    if sharding == "none":
        if env.world_size > 1:
            raise ValueError("parallel.sharding=none runs one process; use fsdp or hsdp for several")
        return None
    if sharding == "hsdp":
        return init_device_mesh(
            env.device.type, (env.nodes, env.local_world_size), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))


def param_dtype(setting: str, device: torch.device) -> torch.dtype:
    """bf16 compute where the hardware has fast bf16 (CUDA); fp32 on CPU unless asked for."""
    if setting == "bf16" or (setting == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute the block's activations in backward. Patches the instance's forward rather than wrapping
    the module, so parameter names (checkpoint keys) stay the same."""
    forward = block.forward

    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed


def parallelize(
    model: nn.Module,
    blocks: list[nn.Module],
    mesh: DeviceMesh | None,
    cfg: ParallelConfig,
    device: torch.device,
) -> nn.Module:
    """Activation checkpointing, compile and FSDP2 per block, then the root. Returns the model (in place)."""
    for i, block in enumerate(blocks):
        ac = cfg.activation_checkpointing
        if ac == "full" or (ac == "every_n" and i % cfg.ac_every == 0):
            checkpoint_activations(block)
        if cfg.compile:
            block.compile()
    if mesh is None:
        return model
    # With one video per rank a block's output is a view of its blend; no block changes its input in
    # place, which is the case this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dtype = param_dtype(cfg.mixed_precision, device)
    block_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # The root keeps its inputs (σ, noisy latents) in fp32: the EDM scalings need them exact.
    root_policy = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model
