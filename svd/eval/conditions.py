"""The conditions of an evaluation, in the protocol's fixed order, shard by shard.

Held-out conditions are the run's held-out clips (`split = data.val_split`) as its loader reads them, at
the protocol's frames, rate and size, in the loader's seeded global order: condition i is stream position
i, so any process can read any shard without reading those before it (the loader starts a shard at its
first position), and a protocol asking for more conditions than there are clips goes on into the next
epoch's order. The clips are also the references (FVD) and the true frames (interpolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from svd.config import RunConfig
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, fps_id
from svd.data.storage import Storage
from svd.eval.protocol import EvalProtocol

SEQUENCES = (torch.Tensor, np.ndarray, list)


@dataclass(frozen=True)
class Shard:
    index: int
    first: int  # condition number of its first condition
    count: int


def shards(protocol: EvalProtocol) -> list[Shard]:
    size = protocol.shard_size
    return [
        Shard(k, start, min(size, protocol.samples - start))
        for k, start in enumerate(range(0, protocol.samples, size))
    ]


class HeldOutConditions:
    """`conditions.batch(shard)`: the loader's batch of the shard's clips (frames, captions, …), with the
    protocol's frame rate as `fps_id`."""

    def __init__(self, run: RunConfig, protocol: EvalProtocol, storage: Storage):
        d = run.data
        where = [f"({d.filter})"] if d.filter else []
        where.append(f"split = '{d.val_split}'")
        self._open(run, protocol, storage, d.table, " AND ".join(where))

    def _open(self, run: RunConfig, protocol: EvalProtocol, storage: Storage, table: str, where: str) -> None:
        self.protocol = protocol
        d = run.data
        self.loader = ClipLoader(
            LoaderConfig(
                table=table,
                buckets=(
                    Bucket(
                        protocol.height or d.height,
                        protocol.width or d.width,
                        protocol.frames,
                        protocol.shard_size,
                        fps=protocol.fps,
                    ),
                ),
                filter=where or None,
                version=int(d.version) if table == d.table and d.version and d.version.isdigit() else None,
                seed=protocol.seed,
                num_workers=0,  # a shard is one batch: workers would cost more to start than they save
                serve="frames",  # references and conditioning frames are pixels
                motion_score_scale=d.motion_score_scale,
                cache_dir=d.cache_dir,
                batch_timeout_s=d.batch_timeout_s,
            ),
            rank=0,
            world_size=1,
            storage=storage,
        )

    @property
    def table_version(self) -> int:
        return self.loader.table_version

    def batch(self, shard: Shard) -> dict[str, Any]:
        state = self.loader.state_dict()
        state["consumed"] = [shard.first]
        self.loader.load_state_dict(state)
        batches = iter(self.loader)
        try:
            batch = next(batches)
        finally:
            batches.close()
        # The last shard may be short: the loader served a whole bucket batch.
        batch = {k: v[: shard.count] if isinstance(v, SEQUENCES) else v for k, v in batch.items()}
        batch["fps_id"] = batch["fps_id"].new_full((shard.count,), fps_id(self.protocol.fps))
        return batch


class PromptConditions(HeldOutConditions):
    """Prompts (one per line of `eval.prompts`, taken in turn: condition i is line i mod their count) for a
    text-to-video model, and the clips of `eval.references` (a clip table, e.g. UCF-101's) in the loader's
    seeded order as the reference videos; their frames only give the samples' shape."""

    def __init__(self, run: RunConfig, protocol: EvalProtocol, storage: Storage):
        fs, path = storage.fsspec(protocol.prompts)
        lines = [line.strip() for line in fs.cat_file(path).decode().splitlines()]
        self.prompts = [line for line in lines if line]
        if not self.prompts:
            raise ValueError(f"eval.prompts={protocol.prompts} has no prompt (one per line)")
        self._open(run, protocol, storage, protocol.references, "")

    def batch(self, shard: Shard) -> dict[str, Any]:
        batch = super().batch(shard)
        numbers = range(shard.first, shard.first + shard.count)
        batch["caption"] = [self.prompts[i % len(self.prompts)] for i in numbers]
        return batch


def conditions_of(run: RunConfig, protocol: EvalProtocol, storage: Storage) -> HeldOutConditions:
    if protocol.conditions == "prompts":
        return PromptConditions(run, protocol, storage)
    return HeldOutConditions(run, protocol, storage)
