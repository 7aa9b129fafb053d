"""Two real ranks (FSDP2 on gloo) for tests/train/test_init_from.py; the S3 server comes from AWS_*.

    python init_from_worker.py save RUN_URI      # a tiny text-to-video denoiser, one AdamW step, checkpointed
    python init_from_worker.py load SOURCE OUT   # an interpolation denoiser starts from a run or diffusers

`load` counts, per rank, the bytes that rank fetched from S3 (every s3fs read path: ranged reads of open
files, `cat` and downloads), and rank 0 writes them with the consolidated weights and the transfer report to
OUT. Each rank gets its own model cache folder, as ranks on different nodes would. Ranks are forked after
torch is imported and before anything has run in it, as in checkpoint_worker.py.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import s3fs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from svd.config import ParallelConfig
from svd.data.local_s3 import free_port
from svd.data.storage import Storage
from svd.diffusion.edm import Denoiser
from svd.model.video_unet import VideoUNet, preset
from svd.train import parallel
from svd.train.checkpoint import Checkpointer, ModelOptimizerState
from svd.train.ema import EMA
from svd.train.weights import load_initial_weights

LATENT = 4
SOURCE_SEED, TARGET_SEED = 0, 7


def source_model() -> Denoiser:
    """Text to video: 4 input channels."""
    torch.manual_seed(SOURCE_SEED)
    return Denoiser(VideoUNet(preset("tiny", in_channels=LATENT, out_channels=LATENT)))


def target_model() -> Denoiser:
    """Interpolation: 2 × 4 + 1 input channels (the input conv grows) and the missing-frame embedding
    (added: it keeps its own initialisation)."""
    torch.manual_seed(TARGET_SEED)
    unet = VideoUNet(preset("tiny", in_channels=2 * LATENT + 1, out_channels=LATENT))
    return Denoiser(unet, missing_frame_channels=LATENT)


def sharded(model: Denoiser) -> Denoiser:
    cfg = ParallelConfig(sharding="fsdp", mixed_precision="fp32")
    env = parallel.DistEnv(dist.get_rank(), 2, 0, 2, torch.device("cpu"), "gloo")
    mesh = parallel.build_mesh(env, cfg.sharding, cfg.collective_timeout_s)
    return parallel.parallelize(model, list(model.network.block_pairs()), mesh, cfg, torch.device("cpu"))


BYTES_READ = [0]  # what this process fetched through s3fs


def count_s3_reads() -> None:
    """Add to BYTES_READ whatever s3fs fetches: ranged reads of open files, `cat` and downloads."""
    cat_file, get_file = s3fs.S3FileSystem._cat_file, s3fs.S3FileSystem._get_file
    fetch_range = s3fs.core.S3File._fetch_range

    async def counted_cat_file(fs, path, *args, **kwargs):
        data = await cat_file(fs, path, *args, **kwargs)
        BYTES_READ[0] += len(data)
        return data

    async def counted_get_file(fs, rpath, lpath, *args, **kwargs):
        await get_file(fs, rpath, lpath, *args, **kwargs)
        BYTES_READ[0] += os.path.getsize(lpath)

    def counted_fetch_range(file, start, end):
        data = fetch_range(file, start, end)
        BYTES_READ[0] += len(data)
        return data

    s3fs.S3FileSystem._cat_file = counted_cat_file
    s3fs.S3FileSystem._get_file = counted_get_file
    s3fs.core.S3File._fetch_range = counted_fetch_range


def save(run_uri: str) -> None:
    model = sharded(source_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    ema = EMA(model, decay=0.9)  # the weights before the step: the loaded model must show the EMA's
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # optimizer state (2 × the model) lies in the same files as the weights and EMA
    parts = {"model": ModelOptimizerState(model, optimizer), "ema": ema, "train": {"step": 1}}
    with Checkpointer(run_uri, Storage.from_env(), async_save=False) as checkpointer:
        checkpointer.save(1, parts)


def load(source: str, out: str) -> None:
    model = sharded(target_model())
    count_s3_reads()
    cache = f"{out}.cache-rank{dist.get_rank()}"
    report = load_initial_weights(model, source, Storage.from_env(), cache)
    per_rank = [None, None]
    dist.all_gather_object(per_rank, BYTES_READ[0])
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"weights": full, "report": report, "bytes_read": per_rank}, out)


def rank_main(rank: int, port: int, mode: str, *args: str) -> None:
    limit = timedelta(seconds=300)  # a bound for a failing test; ranks may stall for minutes on a busy host
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=limit)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=limit)
    try:
        {"save": save, "load": load}[mode](*args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.start_processes(rank_main, (free_port(), *sys.argv[1:]), nprocs=2, start_method="fork")
