"""The analytic per-layer count of `unet_cost` against the real model: parameters, FLOPs (PyTorch's
FlopCounterMode) and activations kept for backward (saved-tensor hooks), on the tiny and small presets."""

from __future__ import annotations

import pytest
import torch

from svd.launch.unet_cost import unet_cost
from svd.model.video_unet import VideoUNet, preset

# (frames, latent height, latent width, context tokens): odd sizes, several frame counts, one-token context
# (image conditioning / none) and a caption-like context
TINY_SIZES = [(4, 8, 8, 1), (2, 6, 10, 3), (8, 4, 4, 1), (3, 5, 7, 5)]
SMALL_SIZES = [(2, 4, 4, 1), (3, 4, 6, 4)]  # the lowest level is 1×1: one-token self-attention


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(0)
    return VideoUNet(preset("small"))


@pytest.mark.parametrize("name", ["tiny", "small", "svd"])
def test_parameter_count_equals_the_models_in_total_and_temporal(name):
    with torch.device("meta"):
        model = VideoUNet(preset(name))
    cost = unet_cost(preset(name), 2, 8, 8, 1)
    assert cost.parameters() == sum(p.numel() for p in model.parameters())
    assert cost.parameters("temporal") == sum(p.numel() for _, p in model.temporal_parameters())


def _forward_backward(model, inputs, image_only=None):
    def step():
        out = model(*inputs, image_only=image_only)
        out.square().mean().backward()

    return step


def _check_flops(model, cfg, size, measure, image_only=False):
    frames, h, w, tokens = size
    inputs = measure.unet_inputs(cfg, frames, h, w, tokens)
    flags = torch.ones(1, dtype=torch.bool) if image_only else None
    counted = measure.count_flops(_forward_backward(model, inputs, flags))
    cost = unet_cost(cfg, frames, h, w, tokens, temporal=not image_only)
    assert cost.forward_flops + cost.backward_flops == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_flops_of_a_training_step_agree_with_pytorchs_counter(size, measure):
    model = measure.build_unet(preset("tiny"))
    _check_flops(model, preset("tiny"), size, measure)


def test_image_only_path_is_counted_without_its_temporal_layers(measure):
    model = measure.build_unet(preset("tiny"))
    _check_flops(model, preset("tiny"), (1, 8, 8, 3), measure, image_only=True)
    cost = unet_cost(preset("tiny"), 1, 8, 8, 3, temporal=False)
    assert "temporal" not in cost.by_path()


@pytest.mark.parametrize("size", SMALL_SIZES)
def test_small_flops_of_a_training_step_agree_with_pytorchs_counter(size, small_unet, measure):
    _check_flops(small_unet, preset("small"), size, measure)
    small_unet.zero_grad(set_to_none=True)


def _check_activations(model, cfg, size, measure):
    frames, h, w, tokens = size
    inputs = measure.unet_inputs(cfg, frames, h, w, tokens)
    _, measured = measure.saved_activation_bytes(lambda: model(*inputs), exclude=model.parameters())
    predicted = unet_cost(cfg, frames, h, w, tokens).activation_bytes(act_bytes=4)
    assert predicted == pytest.approx(measured, rel=0.15)
    return predicted, measured


@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_activations_kept_for_backward_agree_with_the_saved_tensors(size, measure):
    _check_activations(measure.build_unet(preset("tiny")), preset("tiny"), size, measure)


@pytest.mark.parametrize("size", SMALL_SIZES)
def test_small_activations_kept_for_backward_agree_with_the_saved_tensors(size, small_unet, measure):
    _check_activations(small_unet, preset("small"), size, measure)


def test_checkpointing_keeps_less_and_recomputes_the_checkpointed_forwards():
    cost = unet_cost(preset("small"), 14, 40, 72, 77)
    none, every, full = (cost.activation_bytes(2, mode) for mode in ("none", "every_n", "full"))
    assert full < every < none
    assert full < 0.1 * none  # only the block pairs' inputs and the layers between them remain
    pairs = sum(b.forward for b in cost.blocks if b.pair)
    assert cost.recompute_flops("full") == pytest.approx(pairs)
    assert cost.recompute_flops("none") == 0
    # every_n with n=1 is full checkpointing
    assert cost.activation_bytes(2, "every_n", every=1) == pytest.approx(full)


def _sum(cost, predicate) -> float:
    return sum(layer.forward for layer in cost.layers() if predicate(layer.name))


def test_attention_is_quadratic_along_its_axis_and_convolutions_linear():
    cfg = preset("svd")
    base = unet_cost(cfg, 14, 32, 48, 77)
    twice_frames = unet_cost(cfg, 28, 32, 48, 77)
    twice_pixels = unet_cost(cfg, 14, 64, 48, 77)

    def attention(path):
        return lambda name: name.endswith("self_attn.sdpa") and f".{path}." in name

    def conv(name):
        return name.endswith(("conv1", "conv2"))

    for part, frames_factor, pixels_factor in [
        (attention("temporal"), 4, 2),  # over T at every pixel
        (attention("spatial"), 2, 4),  # over h·w in every frame
        (conv, 2, 2),
    ]:
        assert _sum(twice_frames, part) == pytest.approx(frames_factor * _sum(base, part))
        assert _sum(twice_pixels, part) == pytest.approx(pixels_factor * _sum(base, part))
