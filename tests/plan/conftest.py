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
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from svd.model.video_unet import VideoUNet, VideoUNetConfig


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


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of `step()` by PyTorch's FlopCounterMode, taught the CPU flash-attention kernels (which it
    does not count by itself) with its own attention formulas."""
    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad, q, k, v)

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def unet_inputs(cfg: VideoUNetConfig, frames: int, height: int, width: int, tokens: int, seed: int = 0):
    """(x, c_noise, context, micro) of one video, seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, cfg.in_channels, height, width, generator=g)
    context = torch.randn(1, tokens, cfg.context_dim, generator=g)
    micro = {name: torch.rand(1, generator=g) for name, _ in cfg.micro_conditioning}
    return x, torch.rand(1, generator=g), context, micro


def build_unet(cfg: VideoUNetConfig, seed: int = 0) -> VideoUNet:
    torch.manual_seed(seed)
    return VideoUNet(cfg)


@pytest.fixture
def measure() -> SimpleNamespace:
    """The measuring tools of this module, for the tests of tests/plan."""
    return SimpleNamespace(
        saved_activation_bytes=saved_activation_bytes,
        peak_increment_bytes=peak_increment_bytes,
        storage_bytes=storage_bytes,
        count_flops=count_flops,
        unet_inputs=unet_inputs,
        build_unet=build_unet,
    )
