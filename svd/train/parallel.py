"""How the model is spread over the ranks (the process group itself is `distributed.py`'s).

- The mesh: plain FSDP2 over all ranks, or HSDP (replicate across nodes, shard within a node), where
  parameters are all-gathered over the fast intra-node links only.
- `parallelize` is applied *to* a built model (torchtitan's pattern; the model never knows it is
  sharded): activation checkpointing and `torch.compile` per spatial+temporal block pair, `fully_shard`
  per block pair, then the root. Parameter names do not change, so checkpoints and EMA keys are the same
  whatever the settings.
"""

from __future__ import annotations

import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from svd.config import ParallelConfig
from svd.train.distributed import DistEnv


def resolve_sharding(setting: str, nodes: int) -> str:
    """`parallel.sharding` with `auto` decided: HSDP across several nodes, FSDP within one."""
    if setting == "auto":
        return "hsdp" if nodes > 1 else "fsdp"
    return setting


def build_mesh(env: DistEnv, sharding: str, collective_timeout_s: float) -> DeviceMesh | None:
    """None when not sharding; a 1-D mesh for FSDP (the job's process group); (replicate, shard) = (nodes,
    gpus per node) for HSDP, whose groups get the job's collective timeout (`init_device_mesh` would create
    them with torch's default, 30 minutes with gloo: a frozen rank would hold the job that long)."""
    sharding = resolve_sharding(sharding, env.nodes)
    if sharding == "none":
        if env.world_size > 1:
            raise ValueError("parallel.sharding=none runs one process; use fsdp or hsdp for several")
        return None
    if sharding == "hsdp":
        ranks = torch.arange(env.world_size).view(env.nodes, env.local_world_size)
        timeout = timedelta(seconds=collective_timeout_s)
        replicate, _ = dist.new_subgroups_by_enumeration(ranks.T.tolist(), timeout=timeout)  # across nodes
        shard, _ = dist.new_subgroups_by_enumeration(ranks.tolist(), timeout=timeout)  # within a node
        return DeviceMesh.from_group(
            [replicate, shard], env.device.type, ranks, mesh_dim_names=("replicate", "shard")
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
