"""The planner's frozen-autoencoder terms against the diffusers classes: parameters and encoder FLOPs at the
released layout (counted on the meta device, no weights needed), and the encoding work measured on CPU."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from torch.utils.flop_counter import FlopCounterMode

from svd.launch.plan import AUTOENCODER_PARAMS, SD_ENCODER_CHANNELS, encode_work_bytes, sd_encoder_flops
from svd.model.autoencoder import AutoencoderConfig, build_autoencoder

RELEASED = {
    "block_out_channels": SD_ENCODER_CHANNELS,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}


@pytest.fixture(scope="module")
def released():
    with torch.device("meta"):
        return {
            "kl_temporal": AutoencoderKLTemporalDecoder(**RELEASED),
            "kl": AutoencoderKL(**RELEASED, up_block_types=("UpDecoderBlock2D",) * 4),
        }


def test_autoencoder_parameters_are_the_released_classes(released):
    for kind, model in released.items():
        assert AUTOENCODER_PARAMS[kind] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("height", "width"), [(320, 576), (576, 1024), (40, 72)])
def test_encoder_flops_equal_pytorchs_count(released, height, width):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        released["kl_temporal"].encode(torch.empty(1, 3, height, width, device="meta"))
    assert sd_encoder_flops(height, width) == pytest.approx(counter.get_total_flops(), rel=0.02)


@pytest.mark.parametrize(("frames", "height", "width"), [(14, 64, 64), (4, 96, 64), (20, 32, 48)])
def test_encoding_work_agrees_with_a_measured_cpu_encode(frames, height, width, measure):
    """The tiny random autoencoder (first width 32) encodes 14 frames at a time, like the released one."""
    autoencoder = build_autoencoder(AutoencoderConfig(kind="kl_temporal"))
    video = torch.rand(1, frames, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    measured = measure.peak_increment_bytes(lambda: autoencoder.encode(video))
    assert encode_work_bytes(min(frames, 14), height, width, 32) == pytest.approx(measured, rel=0.15)
