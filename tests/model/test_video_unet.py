import pytest
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from svd.model.attention import Attention
from svd.model.layers import AlphaBlender, ResBlock, TemporalConv
from svd.model.video_unet import VideoResBlock, VideoTransformer, VideoUNet, VideoUNetConfig, preset


def micro(batch: int) -> dict[str, torch.Tensor]:
    return {
        "fps_id": torch.full((batch,), 6.0),
        "motion_bucket_id": torch.full((batch,), 127.0),
        "cond_aug": torch.full((batch,), 0.02),
    }


def randomized_tiny(seed: int = 0) -> VideoUNet:
    """The tiny model with every parameter random (zero-initialised layers would hide wiring mistakes)."""
    return randomized_tiny_with(preset("tiny"), seed)


def randomized_tiny_with(cfg: VideoUNetConfig, seed: int = 0) -> VideoUNet:
    torch.manual_seed(seed)
    model = VideoUNet(cfg)
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


def meta_built(cfg: VideoUNetConfig) -> VideoUNet:
    with torch.device("meta"):
        return VideoUNet(cfg)


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name, p in pa.items():
        q = pb[name]
        q = q.full_tensor() if isinstance(q, DTensor) else q
        assert torch.equal(p, q), name


def test_a_meta_build_initialised_after_to_empty_equals_a_direct_build():
    torch.manual_seed(7)
    direct = VideoUNet(preset("tiny"))
    torch.manual_seed(7)
    deferred = meta_built(preset("tiny")).to_empty(device="cpu")
    deferred.init_weights()
    assert_same_parameters(direct, deferred)


def test_building_on_meta_draws_no_random_numbers():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = meta_built(preset("tiny"))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.is_meta for p in model.parameters())


def test_init_weights_restores_the_released_initialisation():
    torch.manual_seed(0)
    model = VideoUNet(preset("tiny", merge_factor=0.3))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    zero = [model.conv_out]
    zero += [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    zero += [m.proj_out for m in model.modules() if isinstance(m, VideoTransformer)]
    assert len(zero) == 1 + 2 * 8 + 7  # conv_out, 8 VideoResBlocks × 2 ResBlocks, 7 VideoTransformers
    assert all(not p.any() for m in zero for p in m.parameters())
    blenders = [m.mix_factor for m in model.modules() if isinstance(m, AlphaBlender)]
    assert len(blenders) == 8 + 7
    assert all(p.item() == pytest.approx(0.3) for p in blenders)
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm):
            assert bool((m.weight == 1).all() and (m.bias == 0).all())
    # PyTorch's default Linear init: U(±1/√fan_in), i.e. std = 1/√(3·fan_in)
    w = model.time_embed.linear_2.weight
    bound = 1 / w.shape[1] ** 0.5
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_temporal_conv_is_initialised_exactly_like_a_conv3d():
    torch.manual_seed(3)
    conv = TemporalConv(8, 16)
    torch.manual_seed(3)
    reference = torch.nn.Conv3d(8, 16, (3, 1, 1))
    assert torch.equal(conv.weight, reference.weight)
    assert torch.equal(conv.bias, reference.bias)


def test_a_layer_without_an_init_rule_is_named():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(1))

    model = VideoUNet(preset("tiny"))
    model.extra = Scale()
    with pytest.raises(TypeError, match="Scale"):
        model.init_weights()


def test_init_weights_initialises_fsdp_sharded_parameters(cpu_mesh):
    torch.manual_seed(5)
    direct = VideoUNet(preset("tiny"))
    sharded = meta_built(preset("tiny"))
    for block in sharded.block_pairs():
        fully_shard(block, mesh=cpu_mesh)
    fully_shard(sharded, mesh=cpu_mesh)
    sharded.to_empty(device="cpu")
    torch.manual_seed(5)
    sharded.init_weights()
    assert isinstance(sharded.conv_out.weight, DTensor)
    assert_same_parameters(direct, sharded)  # on one rank the shard is the whole tensor
    assert not sharded.conv_out.weight.full_tensor().any()
    assert all(torch.isfinite(p.full_tensor()).all() for p in sharded.parameters())
    out = sharded(torch.randn(1, 2, 4, 8, 8), torch.zeros(1), torch.randn(1, 3, 32), micro(1))
    assert out.shape == (1, 2, 4, 8, 8)


def test_interpolation_input_with_a_mask_channel_runs():
    """Paper D.5: noisy latent 4 + first/last-frame latents 4 + binary mask 1 = 9 input channels."""
    torch.manual_seed(0)
    model = VideoUNet(preset("tiny", in_channels=9))
    out = model(torch.randn(2, 5, 9, 8, 8), torch.zeros(2), torch.randn(2, 1, 32), micro(2))
    assert out.shape == (2, 5, 4, 8, 8)


def test_multi_view_camera_angles_condition_each_frame():
    """SV3D: cond_aug + polar and azimuth angles per frame (orbit views), each with its own width."""
    fields = (("cond_aug", 32), ("polars_rad", 64), ("azimuths_rad", 64))
    model = randomized_tiny_with(preset("tiny", micro_conditioning=fields))
    b, t = 2, 4
    x, c_noise, context = torch.randn(b, t, 4, 8, 8), torch.zeros(b), torch.randn(b, 1, 32)
    orbit = {
        "cond_aug": torch.full((b,), 0.02),
        "polars_rad": torch.full((b, t), 1.4),
        "azimuths_rad": torch.linspace(0, 2 * torch.pi, t + 1)[:t].expand(b, t),
    }
    out = model(x, c_noise, context, orbit)
    assert out.shape == (b, t, 4, 8, 8)
    turned = {**orbit, "azimuths_rad": orbit["azimuths_rad"].roll(1, dims=1)}
    assert not torch.allclose(model(x, c_noise, context, turned), out)
