"""`stage.init_from`: start a stage from the previous stage's run or from released diffusers weights.

A run's weights are its latest checkpoint's model with the EMA average laid over the parameters it
tracks (the EMA is what a stage hands to the next, as the paper's stages do). A folder with a diffusers
`config.json` is read as a `UNetSpatioTemporalConditionModel`. Either way the names are the denoiser's
(`network.…`), and `svd.model.transfer` reconciles them with the new stage's model: temporal layers added
after Stage I, 8 or 9 input channels for image-to-video or interpolation, and whatever else was added or
dropped is reported by name.

A sharded model is loaded without any rank holding, or every rank reading, the whole source: from a run,
each rank reads the chunks of the checkpoint that its shards cover (DCP's sharded reads: 256 ranks read the
1.5B-parameter model and EMA once between them, not 256 times); from a diffusers folder (one safetensors
file), rank 0 reads it and each tensor is broadcast into the ranks' shards in turn.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from svd.collectives import decided_by_rank0
from svd.data.storage import Storage, join
from svd.model.transfer import TransferReport, adapt_state_dict, plan_transfer
from svd.train.checkpoint import checkpoint_folder, read_full_state, read_state, saved_tensors

NETWORK = "network."
INPUT_CONVS = (NETWORK + "conv_in.weight",)
# Where a run keeps the weights it hands on, by checkpoint prefix; a later prefix wins for a name in both.
RUN_PARTS = ("model.model.", "ema.weights.")


class InitFromError(RuntimeError):
    """Rank 0 could not read `stage.init_from`; raised on the other ranks with rank 0's error in one line."""


def initial_weights(uri: str, storage: Storage, cache_dir: str) -> dict[str, Tensor]:
    """The denoiser's full weights from a run or a diffusers folder (copied to `cache_dir` when remote), in
    this process: for export and sampling. Training loads them with `load_initial_weights`."""
    if _is_diffusers(uri, storage):
        return _diffusers_weights(uri, storage, cache_dir)
    weights: dict[str, Tensor] = {}
    for part in RUN_PARTS:
        weights.update(read_full_state(uri, part.rstrip("."), storage))
    return weights


def load_initial_weights(model: nn.Module, uri: str, storage: Storage, cache_dir: str) -> TransferReport:
    """Loads what fits of the run or diffusers folder at `uri` into `model` (sharded or not) and reports the
    rest. Every rank calls it: with a process group it is a collective."""
    if _is_diffusers(uri, storage):
        return _load_diffusers(model, uri, storage, cache_dir)
    return _load_run(model, uri, storage)


def _load_run(model: nn.Module, uri: str, storage: Storage) -> TransferReport:
    """Each rank reads its shards of the tensors it keeps; tensors whose input channels grow (one input
    conv, a few kB) are read whole, widened, then sharded."""
    folder = decided_by_rank0(lambda: checkpoint_folder(uri, storage), failed=_rank0_failed)  # one step
    saved = saved_tensors(folder, storage)
    keys = {key.removeprefix(part): key for part in RUN_PARTS for key in saved if key.startswith(part)}
    target = get_model_state_dict(model)
    report = plan_transfer(
        {name: tuple(t.shape) for name, t in target.items()},
        {name: tuple(saved[key].size) for name, key in keys.items()},
        INPUT_CONVS,
    )
    widened = {name for name, _, _ in report.reshaped}
    shards = {keys[n]: torch.empty_like(target[n]) for n in keys if n in target and n not in widened}
    whole = {
        keys[n]: torch.empty(saved[keys[n]].size, dtype=saved[keys[n]].properties.dtype) for n in widened
    }
    read_state(folder, shards | whole, storage)
    with torch.no_grad():
        loaded = {name: shards[key] for name, key in keys.items() if key in shards}
        set_model_state_dict(model, loaded, options=StateDictOptions(strict=False))
        if widened:
            adapted, _ = adapt_state_dict(
                model, {n: whole[keys[n]] for n in widened}, input_convs=INPUT_CONVS
            )
            set_model_state_dict(model, adapted, options=StateDictOptions(full_state_dict=True, strict=False))
    return report


def _load_diffusers(model: nn.Module, uri: str, storage: Storage, cache_dir: str) -> TransferReport:
    """Rank 0 reads the folder (one download per run, not per rank) and broadcasts it tensor by tensor;
    every other rank keeps only its shard of each."""
    adapted: dict[str, Tensor] = {}

    def read() -> TransferReport:
        nonlocal adapted
        adapted, report = adapt_state_dict(
            model, _diffusers_weights(uri, storage, cache_dir), input_convs=INPUT_CONVS
        )
        return report

    report = decided_by_rank0(read, failed=_rank0_failed)
    broadcast = _distributed()
    with torch.no_grad():
        set_model_state_dict(
            model,
            adapted,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False),
        )
    return report


def _rank0_failed(cause: str) -> InitFromError:
    return InitFromError(f"stage.init_from: rank 0 could not read it: {cause}")


def _diffusers_weights(uri: str, storage: Storage, cache_dir: str) -> dict[str, Tensor]:
    from svd.model.weights import load_diffusers_unet

    local = storage.local_copy(uri, cache_dir)
    return {NETWORK + k: v for k, v in load_diffusers_unet(local).state_dict().items()}


def _is_diffusers(uri: str, storage: Storage) -> bool:
    fs, path = storage.fsspec(join(uri, "config.json"))
    return fs.exists(path)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
