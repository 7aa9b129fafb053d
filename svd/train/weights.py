"""`stage.init_from`: start a stage from the previous stage's run or from released diffusers weights.

A run's weights are its latest checkpoint's model with the EMA average laid over the parameters it
tracks (the EMA is what a stage hands to the next, as the paper's stages do). A folder with a diffusers
`config.json` is read as a `UNetSpatioTemporalConditionModel`. Either way the names are the denoiser's
(`network.…`), and `svd.model.transfer` reconciles them with the new stage's model: temporal layers added
after Stage I, 8 or 9 input channels for image-to-video or interpolation, and whatever else was added or
dropped is reported by name.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from svd.data.storage import Storage, join
from svd.model.transfer import TransferReport, adapt_state_dict
from svd.train.checkpoint import read_full_state

NETWORK = "network."


def initial_weights(uri: str, storage: Storage, cache_dir: str) -> dict[str, Tensor]:
    """The denoiser's weights from a run or a diffusers folder (copied to `cache_dir` when remote)."""
    fs, path = storage.fsspec(join(uri, "config.json"))
    if fs.exists(path):
        from svd.model.weights import load_diffusers_unet

        local = storage.local_copy(uri, cache_dir)
        return {NETWORK + k: v for k, v in load_diffusers_unet(local).state_dict().items()}
    weights = read_full_state(uri, "model.model", storage)
    weights.update(read_full_state(uri, "ema.weights", storage))
    return weights


def load_initial_weights(model: nn.Module, weights: dict[str, Tensor]) -> TransferReport:
    """Loads what fits into `model` (sharded or not) and reports the rest."""
    adapted, report = adapt_state_dict(model, weights, input_convs=(NETWORK + "conv_in.weight",))
    with torch.no_grad():
        set_model_state_dict(model, adapted, options=StateDictOptions(full_state_dict=True, strict=False))
    return report
