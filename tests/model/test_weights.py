"""Interop with diffusers' UNetSpatioTemporalConditionModel, checked against the real diffusers model.

diffusers' port differs from the released sgm code in one number: its SpatioTemporalResBlocks use
GroupNorm eps 1e-6 in the cross-attention down blocks and in all up blocks, where sgm (and we) use
PyTorch's default 1e-5 everywhere. The mapping tests therefore set diffusers' eps to the released value
and demand agreement to fp32 rounding; a separate test bounds the effect of the eps difference itself.
"""

import json

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.resnet import SpatioTemporalResBlock

from svd.model.video_unet import VideoUNet, VideoUNetConfig, preset
from svd.model.weights import (
    from_diffusers_config,
    from_diffusers_state_dict,
    load_diffusers_unet,
    save_diffusers_unet,
    to_diffusers_config,
    to_diffusers_state_dict,
)

# Small, but with every structural feature of the released config: 3 levels, attention at two of them,
# a channel change at each level, 2 residual blocks, image-to-video input channels.
SMALL = VideoUNetConfig(
    in_channels=8,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=2,
    attention_levels=(True, True, False),
    head_channels=16,
    context_dim=24,
    micro_conditioning=(("fps_id", 32), ("motion_bucket_id", 32), ("cond_aug", 32)),
)


def with_released_groupnorm_eps(model: UNetSpatioTemporalConditionModel) -> UNetSpatioTemporalConditionModel:
    for block in model.modules():
        if isinstance(block, SpatioTemporalResBlock):
            for norm in block.modules():
                if isinstance(norm, torch.nn.GroupNorm):
                    norm.eps = 1e-5
    return model


def diffusers_unet(cfg: VideoUNetConfig, seed: int = 0) -> UNetSpatioTemporalConditionModel:
    torch.manual_seed(seed)
    config = {k: v for k, v in to_diffusers_config(cfg, num_frames=5).items() if not k.startswith("_")}
    model = UNetSpatioTemporalConditionModel(**config)
    with torch.no_grad():  # the default blend factors are all equal; make each one distinct
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.uniform_(-2, 2)
    return model.eval()


def inputs(context_tokens: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 8, 12, 20, generator=g)
    c_noise = 0.25 * torch.tensor([0.5, 30.0]).log()
    context = torch.randn(2, context_tokens, 24, generator=g)
    added_time_ids = torch.tensor([[6.0, 127.0, 0.02], [12.0, 40.0, 0.1]])
    return x, c_noise, context, added_time_ids


def as_micro(added_time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: added_time_ids[:, i] for i, (name, _) in enumerate(SMALL.micro_conditioning)}


def max_abs_error(theirs: UNetSpatioTemporalConditionModel, ours: VideoUNet, context_tokens: int) -> float:
    x, c_noise, context, ids = inputs(context_tokens)
    with torch.no_grad():
        expected = theirs(x, c_noise, context, ids).sample
        got = ours(x, c_noise, context, as_micro(ids))
    assert expected.abs().max() > 0.1  # a meaningful output, not zeros
    return (got - expected).abs().max().item()


def imported(theirs: UNetSpatioTemporalConditionModel) -> VideoUNet:
    ours = VideoUNet(SMALL).eval()
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    return ours


@pytest.mark.parametrize("context_tokens", [1, 4])
def test_imported_diffusers_weights_give_the_same_output(context_tokens):
    theirs = with_released_groupnorm_eps(diffusers_unet(SMALL))
    assert max_abs_error(theirs, imported(theirs), context_tokens) < 1e-5


@pytest.mark.parametrize("context_tokens", [1, 4])
def test_unmodified_diffusers_agrees_within_its_groupnorm_eps_difference(context_tokens):
    theirs = diffusers_unet(SMALL)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    assert max_abs_error(theirs, imported(theirs), context_tokens) < 1e-4


def test_exported_weights_load_into_diffusers_with_the_same_output(tmp_path):
    torch.manual_seed(3)
    ours = VideoUNet(SMALL).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    save_diffusers_unet(ours, tmp_path / "unet", num_frames=5)
    theirs = with_released_groupnorm_eps(UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet"))
    assert max_abs_error(theirs.eval(), ours, 3) < 1e-5
    reloaded = load_diffusers_unet(tmp_path / "unet")
    assert reloaded.cfg == SMALL
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_every_svd_parameter_has_exactly_one_diffusers_name():
    with torch.device("meta"):
        ours = VideoUNet(preset("svd"))
        theirs = UNetSpatioTemporalConditionModel(
            **{k: v for k, v in to_diffusers_config(preset("svd")).items() if not k.startswith("_")}
        )
    our_keys = set(ours.state_dict())
    mapped = set(to_diffusers_state_dict(dict.fromkeys(our_keys)))
    assert mapped == set(theirs.state_dict())
    assert set(from_diffusers_state_dict(dict.fromkeys(mapped))) == our_keys


def test_svd_config_converts_to_the_released_diffusers_config_and_back():
    config = to_diffusers_config(preset("svd"))
    assert config["num_attention_heads"] == [5, 10, 20, 20]
    assert config["projection_class_embeddings_input_dim"] == 768
    assert config["down_block_types"][-1] == "DownBlockSpatioTemporal"
    assert config["up_block_types"][0] == "UpBlockSpatioTemporal"
    assert from_diffusers_config(json.loads(json.dumps(config))) == preset("svd")


def test_sharded_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = VideoUNet(SMALL)
    state = {k: v.contiguous() for k, v in to_diffusers_state_dict(model.state_dict()).items()}
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / file)
    weight_map = {k: file for file, names in shards.items() for k in names}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    (tmp_path / "config.json").write_text(json.dumps(to_diffusers_config(SMALL)))
    loaded = load_diffusers_unet(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_folder_without_config_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_diffusers_unet(tmp_path)


def test_per_field_widths_cannot_be_exported_to_diffusers():
    sv3d = preset("svd", micro_conditioning=(("cond_aug", 256), ("polars_rad", 512), ("azimuths_rad", 512)))
    with pytest.raises(ValueError, match="one width"):
        to_diffusers_config(sv3d)


def saved_small(folder) -> VideoUNet:
    torch.manual_seed(0)
    model = VideoUNet(SMALL)
    save_diffusers_unet(model, folder)
    return model


def test_a_truncated_safetensors_file_is_named(tmp_path):
    saved_small(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors: cannot read") as error:
        load_diffusers_unet(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_a_config_missing_a_key_names_the_file_and_the_key(tmp_path):
    saved_small(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layers_per_block"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*layers_per_block"):
        load_diffusers_unet(tmp_path)


def test_weights_that_do_not_fit_the_config_give_one_short_message(tmp_path):
    saved_small(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["block_out_channels"] = [64, 128, 128]  # twice the channels of the saved weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tensors differ in shape") as error:
        load_diffusers_unet(tmp_path)
    message = str(error.value)
    assert len(message.splitlines()) <= 5
    assert "diffusion_pytorch_model.safetensors" in message
    assert "config.json" in message
    # the first mismatched tensors (in the file's order), with the file's shape and the config's
    assert "add_embedding.linear_1.weight: file (128, 96), config (256, 96)" in message


def test_weights_missing_a_tensor_name_it(tmp_path):
    from safetensors.torch import load_file, save_file

    saved_small(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["conv_out.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"conv_out\.bias") as error:
        load_diffusers_unet(tmp_path)
    assert "extra.weight" in str(error.value)
