import pytest
import torch

from svd.model.transfer import ShapeMismatchError, adapt_state_dict
from svd.model.video_unet import VideoUNet, preset


def micro(batch: int) -> dict[str, torch.Tensor]:
    return {name: torch.full((batch,), 3.0) for name, _ in preset("tiny").micro_conditioning}


def randomized(seed: int, **overrides: object) -> VideoUNet:
    """Every parameter random, so a wrongly placed or zeroed tensor changes the output."""
    torch.manual_seed(seed)
    model = VideoUNet(preset("tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_an_image_model_loads_into_a_video_model_whose_temporal_layers_keep_their_init():
    video = randomized(1)
    temporal = dict(video.temporal_parameters())
    fresh = {name: p.clone() for name, p in temporal.items()}
    image_state = {k: v for k, v in randomized(0).state_dict().items() if k not in temporal}  # Stage I

    state, report = adapt_state_dict(video, image_state)
    missing, unexpected = video.load_state_dict(state, strict=False)

    assert report.added == tuple(temporal)
    assert (report.dropped, report.reshaped, report.loaded) == ((), (), len(image_state))
    assert (missing, unexpected) == (list(report.added), [])
    assert all(torch.equal(p, fresh[name]) for name, p in temporal.items())
    assert all(torch.equal(video.state_dict()[k], v) for k, v in image_state.items())


@pytest.mark.parametrize("in_channels", [8, 9])  # image-to-video; interpolation with a mask channel
def test_a_widened_input_conv_starts_out_equal_to_the_source(in_channels):
    source, model = randomized(0), randomized(1, in_channels=in_channels)
    state, report = adapt_state_dict(model, source.state_dict())
    model.load_state_dict(state, strict=True)  # nothing added: every tensor comes from the source
    assert report.reshaped == (("conv_in.weight", (32, 4, 3, 3), (32, in_channels, 3, 3)),)

    x, c_noise, context = torch.randn(2, 3, 4, 8, 8), torch.zeros(2), torch.randn(2, 2, 32)
    extra = torch.randn(2, 3, in_channels - 4, 8, 8)
    with torch.no_grad():
        expected = source(x, c_noise, context, micro(2))
        assert torch.equal(model(torch.cat([x, 0 * extra], dim=2), c_noise, context, micro(2)), expected)
        # the new channels are wired in: once their weights move away from zero they change the output
        model.conv_in.weight[:, 4:].normal_()
        assert not torch.allclose(model(torch.cat([x, extra], dim=2), c_noise, context, micro(2)), expected)


def test_a_mismatched_tensor_is_one_line_naming_it_and_both_shapes():
    model = randomized(0)
    source = dict(model.state_dict())
    source["time_embed.linear_1.weight"] = torch.zeros(128, 16)
    with pytest.raises(ShapeMismatchError) as error:
        adapt_state_dict(model, source)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "time_embed.linear_1.weight: source (128, 16), model (128, 32)" in message


def test_only_the_input_conv_may_grow_and_only_along_its_input_channels():
    narrow, wide = randomized(0, in_channels=8), randomized(0)
    with pytest.raises(
        ShapeMismatchError, match=r"conv_in\.weight: source \(32, 8, 3, 3\), model \(32, 4, 3, 3\)"
    ):
        adapt_state_dict(wide, narrow.state_dict())
    source = dict(wide.state_dict())
    source["conv_out.weight"] = torch.zeros(4, 16, 3, 3)  # C_in grew, but this is not an input conv
    with pytest.raises(ShapeMismatchError, match=r"conv_out\.weight"):
        adapt_state_dict(wide, source)


def test_source_tensors_the_model_lacks_are_dropped_and_named_in_the_summary():
    model = randomized(0)
    source = {**model.state_dict(), "ema.decay": torch.tensor(0.999)}
    del source["conv_out.bias"]
    state, report = adapt_state_dict(model, source)
    assert "ema.decay" not in state
    assert (report.dropped, report.added) == (("ema.decay",), ("conv_out.bias",))
    summary = report.summary()
    assert summary.splitlines()[0].startswith(f"loaded {len(source) - 1} tensors from the source, 0 reshaped")
    assert "added: conv_out.bias" in summary
    assert "dropped: ema.decay" in summary
    assert len(summary.splitlines()) == 3


def test_the_summary_of_many_added_tensors_names_the_first_three():
    model = randomized(0)
    temporal = dict(model.temporal_parameters())
    _, report = adapt_state_dict(model, {k: v for k, v in model.state_dict().items() if k not in temporal})
    names = list(temporal)
    assert f"added: {names[0]}, {names[1]}, {names[2]} and {len(names) - 3} more" in report.summary()
