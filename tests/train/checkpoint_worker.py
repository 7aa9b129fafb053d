"""Real multi-process checkpoint runs for tests/train/test_checkpoint.py (the S3 server in AWS_*).

    python checkpoint_worker.py WORLD save RUN_URI OUT   # a tiny FSDP2 model trains 4 steps, checkpoints 1–3
    python checkpoint_worker.py WORLD load RUN_URI OUT   # a differently seeded one resumes from RUN_URI
    python checkpoint_worker.py WORLD unshared DIR OUT   # each rank gets its own folder: every rank must fail

WORLD ranks are forked from this process after torch is imported (importing it once, not per rank, saves
seconds per rank on a busy machine; nothing has run in torch before the fork). Rank 0 writes the full
(consolidated) state it saved or loaded to OUT with torch.save, for the test to compare across world sizes.
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from svd.data.local_s3 import free_port
from svd.data.storage import Storage
from svd.train.checkpoint import Checkpointer, CheckpointError, ModelOptimizerState


def tiny_model(seed: int, world: int) -> torch.nn.Module:
    """Sizes that no tested world size (1, 2, 3) divides evenly, so shards are uneven and move on reload."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict) -> dict[str, Any]:
    """Consolidated model, optimizer and EMA (a collective: every rank calls it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    return {
        "model": model_state,
        "optim": optim_state,
        "ema": {name: value.full_tensor() for name, value in ema.items()},
    }


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict, step: int) -> None:
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(4, 5, generator=generator)
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        for name, param in model.named_parameters():
            ema[name].lerp_(param, 0.5)


def rank_main(rank: int, world: int, port: int, mode: str, run_uri: str, out: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    if mode == "unshared":  # like one local path on several nodes, each with its own disk
        try:
            Checkpointer(f"{run_uri}/rank{rank}")
        except CheckpointError as e:
            Path(f"{out}.rank{rank}").write_text(str(e))
        return
    model = tiny_model(seed=0 if mode == "save" else 99, world=world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ema = {
        name: p.detach().clone() if mode == "save" else torch.zeros_like(p)
        for name, p in model.named_parameters()
    }
    assert all(isinstance(v, DTensor) for v in ema.values())  # sharded like the model
    data = {"epoch": 0}
    seed = {"seed": 0}
    parts = {"train": ModelOptimizerState(model, optimizer), "ema": ema, "data": data, "seed": seed}
    storage = Storage.from_env()
    with Checkpointer(run_uri, storage, keep=2, async_save=True) as checkpointer:
        if mode == "save":
            for step in (1, 2, 3):
                train_step(model, optimizer, ema, step)
                data |= {"epoch": 1, "consumed": {"bucket-16x24": 8 * step}}
                seed["seed"] = 1234
                checkpointer.save(step, parts)
            saved = copy.deepcopy(full_state(model, optimizer, ema))  # AdamW's step tensors are shared
            train_step(model, optimizer, ema, 4)  # changes parameters while step 3 may still be uploading
            result = {"step": 3, **saved}
        else:
            step = checkpointer.load(parts)
            result = {"step": step, **full_state(model, optimizer, ema)}
    if dist.get_rank() == 0:
        torch.save({**result, "data": data, "seed": seed}, out)
    dist.destroy_process_group()


def main(world: str, mode: str, run_uri: str, out: str) -> None:
    torch.set_num_threads(1)
    port = free_port()
    mp.start_processes(
        rank_main, (int(world), port, mode, run_uri, out), nprocs=int(world), start_method="fork"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
