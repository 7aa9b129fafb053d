import math

import pytest
import torch
from torch import nn

from svd.diffusion.edm import (
    Conditioning,
    Denoiser,
    NoiseDistribution,
    denoising_loss,
    edm_scalings,
    loss_weight,
)


def cond(batch: int, concat: torch.Tensor | None = None) -> Conditioning:
    return Conditioning(context=torch.zeros(batch, 1, 4), micro={"fps_id": torch.zeros(batch)}, concat=concat)


class Recorder(nn.Module):
    """A network that returns a chosen output and remembers what it was given."""

    def __init__(self, output_fn):
        super().__init__()
        self.output_fn = output_fn
        self.seen: dict = {}

    def forward(self, x, c_noise, context, micro, image_only):
        self.seen = {"x": x, "c_noise": c_noise}
        return self.output_fn(x, c_noise)


def test_scalings_at_sigma_one():
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor([1.0]))
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(-1 / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / math.sqrt(2))
    assert c_noise.item() == pytest.approx(0.0)


def test_loss_weight_cancels_the_output_scaling():
    sigma = torch.logspace(-3, 3, 50)
    _, c_out, _, _ = edm_scalings(sigma)
    torch.testing.assert_close(loss_weight(sigma) * c_out.square(), torch.ones(50))


def test_noise_distribution_has_the_configured_log_normal_moments():
    sigma = NoiseDistribution(p_mean=0.7, p_std=1.6).sample(200_000, torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(0.7, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.6, abs=0.01)


def test_denoiser_preconditions_input_and_output():
    x, sigma = torch.randn(2, 3, 4, 5, 5), torch.tensor([0.5, 20.0])
    net = Recorder(lambda inp, c_noise: torch.ones_like(inp))
    out = Denoiser(net)(x, sigma, cond(2))
    c_skip, c_out, c_in, _ = (s.view(-1, 1, 1, 1, 1) for s in edm_scalings(sigma))
    torch.testing.assert_close(net.seen["x"], c_in * x)
    torch.testing.assert_close(net.seen["c_noise"], 0.25 * sigma.log())
    torch.testing.assert_close(out, c_skip * x + c_out)


def test_image_to_video_conditioning_latent_is_appended_unscaled_to_every_frame():
    x, concat = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 4, 5, 5)
    net = Recorder(lambda inp, c_noise: inp[:, :, :4])
    Denoiser(net)(x, torch.tensor([2.0, 3.0]), cond(2, concat))
    assert net.seen["x"].shape == (2, 3, 8, 5, 5)
    for t in range(3):
        assert torch.equal(net.seen["x"][:, t, 4:], concat)


def test_loss_is_zero_for_the_ideal_network_and_one_for_a_unit_offset():
    latents = torch.randn(4, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def ideal_output(offset: float):
        # F* = (x0 − c_skip·x)/c_out makes D(x) = x0 exactly; λ·c_out² = 1 turns an offset of 1 into loss 1.
        def fn(net_in, c_noise):
            sigma = (4 * c_noise).exp().view(-1, 1, 1, 1, 1)
            c_skip, c_out, c_in, _ = edm_scalings(sigma)
            noisy = net_in / c_in
            return (latents - c_skip * noisy) / c_out + offset

        return fn

    for offset, expected in [(0.0, 0.0), (1.0, 1.0)]:
        loss = denoising_loss(Denoiser(Recorder(ideal_output(offset))), latents, cond(4), NoiseDistribution())
        assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_loss_is_deterministic_given_the_generator():
    torch.manual_seed(0)
    net = nn.Linear(4, 4)
    denoiser = Denoiser(Recorder(lambda inp, c_noise: net(inp.transpose(2, -1)).transpose(2, -1)))
    latents = torch.randn(2, 2, 4, 3, 3)
    losses = [
        denoising_loss(denoiser, latents, cond(2), NoiseDistribution(), torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert losses[0].item() == losses[1].item()


def test_conditionings_concatenate_along_the_batch():
    a, b = cond(2, torch.zeros(2, 4, 5, 5)), cond(3, torch.ones(3, 4, 5, 5))
    both = Conditioning.cat([a, b])
    assert len(both) == 5
    assert both.concat.shape == (5, 4, 5, 5)
    with pytest.raises(ValueError, match="only some"):
        Conditioning.cat([a, cond(1)])
