import pytest
import torch
import torch.nn.functional as F

from svd.model.attention import Attention
from svd.model.layers import TemporalConv
from svd.model.video_unet import VideoResBlock, VideoTransformer, VideoUNet, VideoUNetConfig, preset


def micro(batch: int) -> dict[str, torch.Tensor]:
    return {
        "fps_id": torch.full((batch,), 6.0),
        "motion_bucket_id": torch.full((batch,), 127.0),
        "cond_aug": torch.full((batch,), 0.02),
    }


def randomized_tiny(seed: int = 0) -> VideoUNet:
    """The tiny model with every parameter random (zero-initialised layers would hide wiring mistakes)."""
    torch.manual_seed(seed)
    model = VideoUNet(preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_svd_preset_has_the_papers_1521m_parameters():
    with torch.device("meta"):
        model = VideoUNet(preset("svd"))
    total = sum(p.numel() for p in model.parameters())
    temporal = sum(p.numel() for _, p in model.temporal_parameters())
    assert total == pytest.approx(1521e6, rel=0.01)
    assert temporal == pytest.approx(656e6, rel=0.01)  # "656M temporal parameters" (App. D.2)


def test_svd_preset_has_one_block_pair_per_spatial_layer():
    with torch.device("meta"):
        model = VideoUNet(preset("svd"))
    pairs = list(model.block_pairs())
    # 2×4 down + 2 mid + 3×4 up residual blocks; attention at 3 of 4 levels: 2×3 + 1 + 3×3
    assert sum(isinstance(p, VideoResBlock) for p in pairs) == 22
    assert sum(isinstance(p, VideoTransformer) for p in pairs) == 16


def test_forward_keeps_the_video_shape_with_odd_latent_sides():
    model = randomized_tiny()
    x = torch.randn(2, 3, 4, 10, 14)
    out = model(x, torch.zeros(2), torch.randn(2, 5, 32), micro(2))
    assert out.shape == (2, 3, 4, 10, 14)
    assert torch.isfinite(out).all()


def test_images_skip_the_temporal_path_exactly():
    model = randomized_tiny()
    x = torch.randn(2, 3, 4, 8, 8)
    args = (torch.tensor([0.1, -0.3]), torch.randn(2, 1, 32), micro(2))
    image_only = torch.tensor([True, False])
    before = model(x, *args, image_only=image_only)
    with torch.no_grad():
        for _, p in model.temporal_parameters():
            p.add_(torch.randn_like(p))
    after = model(x, *args, image_only=image_only)
    assert torch.equal(before[0], after[0])  # the image did not see the temporal layers
    assert not torch.allclose(before[1], after[1])  # the video did


def test_frames_of_an_image_sample_are_independent():
    model = randomized_tiny()
    x = torch.randn(1, 3, 4, 8, 8)
    c_noise, context = torch.tensor([0.2]), torch.randn(1, 2, 32)
    together = model(x, c_noise, context, micro(1), image_only=torch.tensor([True]))
    for t in range(3):
        alone = model(x[:, t : t + 1], c_noise, context, micro(1), image_only=torch.tensor([True]))
        torch.testing.assert_close(together[:, t : t + 1], alone, atol=1e-5, rtol=1e-5)


def test_video_frames_see_each_other_through_the_temporal_layers():
    model = randomized_tiny()
    x = torch.randn(1, 4, 4, 8, 8)
    args = (torch.tensor([0.0]), torch.randn(1, 1, 32), micro(1))
    changed = x.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(model(x, *args)[:, 3], model(changed, *args)[:, 3])


def test_an_all_image_batch_leaves_temporal_parameters_without_gradient():
    model = randomized_tiny().train()
    context = torch.randn(2, 3, 32)  # > 1 token: a single token skips the q and k projections by design
    out = model(torch.randn(2, 1, 4, 8, 8), torch.zeros(2), context, micro(2), torch.ones(2, dtype=bool))
    out.square().mean().backward()
    temporal = dict(model.temporal_parameters())
    assert temporal
    assert all(p.grad is None for p in temporal.values())
    spatial = [p for n, p in model.named_parameters() if n not in temporal]
    assert all(p.grad is not None for p in spatial)


def test_micro_conditioning_may_change_per_frame():
    model = randomized_tiny()
    x, c_noise, context = torch.randn(1, 3, 4, 8, 8), torch.zeros(1), torch.randn(1, 1, 32)
    per_video = model(x, c_noise, context, micro(1))
    per_frame = {k: v[:, None].expand(1, 3) for k, v in micro(1).items()}
    torch.testing.assert_close(model(x, c_noise, context, per_frame), per_video)


def test_missing_micro_conditioning_is_named():
    model = randomized_tiny()
    values = micro(1)
    del values["motion_bucket_id"]
    with pytest.raises(KeyError, match="motion_bucket_id"):
        model(torch.randn(1, 2, 4, 8, 8), torch.zeros(1), torch.randn(1, 1, 32), values)


def test_wrong_input_channels_are_reported():
    with pytest.raises(ValueError, match="in_channels=4"):
        randomized_tiny()(torch.randn(1, 2, 8, 8, 8), torch.zeros(1), torch.randn(1, 1, 32), micro(1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_channels": 48}, "multiple of 32"),
        ({"head_channels": 24}, "head_channels=24"),
        ({"attention_levels": (True,)}, "attention_levels has 1"),
    ],
)
def test_impossible_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        VideoUNetConfig(**{**preset("tiny").__dict__, **overrides})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(KeyError, match="svd"):
        preset("huge")


def test_single_token_attention_equals_full_attention():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8, context_dim=12)
    x, context = torch.randn(3, 5, 16), torch.randn(3, 1, 12)
    q = attn.to_q(x).view(3, 5, 2, 8).transpose(1, 2)
    k = attn.to_k(context).view(3, 1, 2, 8).transpose(1, 2)
    v = attn.to_v(context).view(3, 1, 2, 8).transpose(1, 2)
    reference = attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(attn(x, context), reference)


def test_temporal_conv_equals_a_3x1x1_conv3d():
    torch.manual_seed(0)
    conv = TemporalConv(8, 16)
    x = torch.randn(2, 8, 5, 3, 4)
    reference = F.conv3d(x, conv.weight, conv.bias, padding=(1, 0, 0))
    torch.testing.assert_close(conv(x), reference, atol=1e-5, rtol=1e-5)
