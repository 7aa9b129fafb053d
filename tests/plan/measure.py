"""Real memory measurements of a CPU training step, to hold the planner's predictions against.

Two measurements, both independent of the planner's formulas:

- Saved activations: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for
  backward. Each is boxed, and only boxes still referenced by the graph when the forward returns are
  counted (a node that is dropped — e.g. an unused branch — frees its saved tensors). Tensors are counted
  by their storage, once each (views share storage), excluding the parameters' storages: that is exactly
  the memory the forward leaves behind for backward.
- Peak: `torch.profiler` with `profile_memory=True` records every allocation and free of the CPU allocator
  with its size. Sorted by time, their running sum is the memory live above the level at which profiling
  began; its maximum is the step's peak increment. Memory allocated before (parameters, AdamW moments,
  EMA) is added by summing those tensors' storages.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


class _Box:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def saved_activation_bytes(forward: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> tuple[Any, int]:
    """(forward's result, bytes of unique storages autograd keeps for backward, less `exclude`'s)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    packed: list[tuple[weakref.ref, int, int]] = []

    def pack(tensor: torch.Tensor) -> _Box:
        box = _Box(tensor)
        storage = tensor.untyped_storage()
        packed.append((weakref.ref(box), storage.data_ptr(), storage.nbytes()))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        result = forward()
    alive = {ptr: size for ref, ptr, size in packed if ref() is not None and ptr not in excluded}
    return result, sum(alive.values())


def peak_increment_bytes(step: Callable[[], Any]) -> int:
    """The highest level of CPU memory `step()` reaches above where it started, from the allocator's
    allocation and free events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(sizes.values())
