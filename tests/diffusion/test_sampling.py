import pytest
import torch
from torch import nn

from svd.diffusion.edm import Conditioning, Denoiser
from svd.diffusion.sampling import EulerEDMSampler, SamplerConfig, frame_guidance_scales, karras_sigmas
from svd.model.video_unet import VideoUNet, preset

SHAPE = (2, 4, 3, 4, 4)


def cond(batch: int, value: float) -> Conditioning:
    return Conditioning(context=torch.full((batch, 1, 1), value), micro={})


class TargetDenoiser(Denoiser):
    """D(x; σ, c) = a constant picked by the context: the conditional and unconditional predictions."""

    def __init__(self):
        super().__init__(nn.Identity())

    def forward(self, x, sigma, c):
        return c.context.view(-1, 1, 1, 1, 1).expand_as(x).clone()


def test_karras_grid_runs_from_sigma_max_to_sigma_min_then_zero():
    sigmas = karras_sigmas(25, 0.002, 700.0, 7.0)
    assert len(sigmas) == 26
    assert sigmas[0].item() == pytest.approx(700.0)
    assert sigmas[-2].item() == pytest.approx(0.002)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_guidance_rises_linearly_over_frames():
    scales = frame_guidance_scales(14, 1.0, 2.5).flatten()
    assert scales[0].item() == 1.0
    assert scales[-1].item() == 2.5
    torch.testing.assert_close(scales.diff(), torch.full((13,), 1.5 / 13))


def test_euler_sampling_lands_on_a_constant_denoiser_target():
    sampler = EulerEDMSampler(SamplerConfig(num_steps=10, guidance_min=1.0, guidance_max=1.0))
    out = sampler.sample(TargetDenoiser(), SHAPE, cond(2, 0.3))
    torch.testing.assert_close(out, torch.full(SHAPE, 0.3))


def test_frame_wise_guidance_extrapolates_from_unconditional_to_conditional():
    sampler = EulerEDMSampler(SamplerConfig(num_steps=5, guidance_min=1.0, guidance_max=3.0))
    out = sampler.sample(TargetDenoiser(), SHAPE, cond(2, 1.0), uncond=cond(2, 0.0))
    expected = frame_guidance_scales(4, 1.0, 3.0).expand(SHAPE)  # u + s_t·(c − u) with u = 0, c = 1
    torch.testing.assert_close(out, expected)


def test_same_seed_same_video_other_seed_other_video():
    torch.manual_seed(0)
    model = VideoUNet(preset("tiny", in_channels=3, out_channels=3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    denoiser = Denoiser(model.eval())
    c = Conditioning(
        torch.randn(2, 1, 32), {k: torch.zeros(2) for k in ("fps_id", "motion_bucket_id", "cond_aug")}
    )
    sampler = EulerEDMSampler(SamplerConfig(num_steps=3))
    a, b = (sampler.sample(denoiser, SHAPE, c, seed=7) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, sampler.sample(denoiser, SHAPE, c, seed=8))


def test_a_seed_per_sample_gives_each_sample_its_own_video_whatever_the_batch():
    torch.manual_seed(0)
    model = VideoUNet(preset("tiny", in_channels=3, out_channels=3))
    denoiser = Denoiser(model.eval())
    micro = {k: torch.zeros(2) for k in ("fps_id", "motion_bucket_id", "cond_aug")}
    c = Conditioning(torch.randn(2, 1, 32), micro)
    sampler = EulerEDMSampler(SamplerConfig(num_steps=2))
    both = sampler.sample(denoiser, SHAPE, c, seed=[11, 12])
    for i, seed in enumerate((11, 12)):
        one = Conditioning(c.context[i : i + 1], {k: v[i : i + 1] for k, v in micro.items()})
        alone = sampler.sample(denoiser, (1, *SHAPE[1:]), one, seed=[seed])
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match="3 seeds for a batch of 2 samples"):
        sampler.sample(denoiser, SHAPE, c, seed=[1, 2, 3])


@pytest.mark.parametrize(("field", "value"), [("num_steps", 0), ("sigma_min", -1.0)])
def test_invalid_sampler_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"sampler.{field}"):
        SamplerConfig(**{field: value})
