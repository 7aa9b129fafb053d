"""Exponential moving average of the trained weights, kept exactly like them.

The average is a dict of tensors made from the trainable parameters themselves, so under FSDP2 each rank
holds only its shard (DTensors with the parameters' placements): the EMA costs 1/world of a model copy per
rank and is checkpointed and resharded by DCP like any other state. The decay warms up as in sgm's
`LitEma`, min(decay, (1 + n)/(10 + n)), so a short run's average is not dominated by the initial weights.

Swapping the average in (validation, previews) must reach every copy of a weight the model computes with.
FSDP2 keeps the root module's parameters gathered after a forward (its backward needs them at once), and a
gathered copy is not a parameter: writing the shards leaves it as it was. `applied` therefore puts the model
back on its shards before swapping in and again before swapping back, so no forward ever sees a gathered
copy of the other weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """On the local shards: elementwise, so the same on any sharding, and without DTensor's per-call
        dispatch, whose cache misses on the weight that changes each step (a third of a tiny step on CPU)."""
        weight = 1.0 - self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                _local(self.shadow[name]).lerp_(_local(p.detach()), weight)
        self.updates += 1

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model with the averaged weights inside the block (for previews and validation); the trained
        weights, bit for bit, after it."""
        reshard(model)
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, value in self.shadow.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            reshard(model)  # drop the root's gathered copy of the averaged weights
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    # Stateful (torch.distributed.checkpoint): the tensors reshard; the update count is global.
    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["weights"].items():
            self.shadow[name].copy_(value)
        self.updates = int(state["updates"])


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (a view: writing it writes the shard); a plain tensor as is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def reshard(model: nn.Module) -> None:
    """Back to sharded parameters: FSDP2 frees the gathered copies, and the parameters are the shards again
    (a no-op for a model that is not sharded)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
