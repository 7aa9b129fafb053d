import re

import pytest
import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from svd.model.lora import LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora
from svd.model.transfer import ShapeMismatchError
from svd.model.video_unet import VideoUNet, preset

TINY_TEMPORAL_BLOCKS = 7  # one per VideoTransformer of the tiny preset (depth 1)


def micro(batch: int) -> dict[str, torch.Tensor]:
    return {name: torch.full((batch,), 3.0) for name, _ in preset("tiny").micro_conditioning}


def randomized(seed: int = 0) -> VideoUNet:
    torch.manual_seed(seed)
    model = VideoUNet(preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def run(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    return model(x, torch.tensor([0.1, 0.7]), context, micro(2))  # 3 context tokens: q and k are used


def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)


def test_lora_wraps_the_eight_temporal_attention_projections_and_trains_only_them():
    model = randomized()
    wrapped = apply_lora(model, rank=4)
    assert len(wrapped) == 8 * TINY_TEMPORAL_BLOCKS
    assert all(
        ".temporal_blocks." in name and isinstance(model.get_submodule(name), LoRALinear) for name in wrapped
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == list(lora_state_dict(model))
    assert len(trainable) == 2 * len(wrapped)
    assert model.get_submodule(wrapped[0]).lora_a.weight.shape == (4, 32)


def test_at_init_the_lora_model_computes_exactly_the_frozen_base_model():
    """Frozen on both sides: PyTorch's matmul picks its kernel by the weight's requires_grad (a difference
    of one float32 rounding), so a frozen and a trainable base model are not bit-identical themselves."""
    model = randomized()
    for p in model.parameters():
        p.requires_grad_(False)
    before = run(model)
    apply_lora(model)
    assert torch.equal(run(model), before)


def test_the_base_checkpoint_names_are_unchanged_by_lora():
    model = randomized()
    base = model.state_dict()
    apply_lora(model)
    state = model.state_dict()
    assert set(state) - set(base) == set(lora_state_dict(model))
    assert all(state[k] is base[k] or torch.equal(state[k], base[k]) for k in base)


def test_a_backward_pass_reaches_only_the_adapters():
    model = randomized().train()
    apply_lora(model)
    randomize_adapters(model)
    run(model).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_the_merged_model_computes_what_the_lora_model_computes():
    model = randomized()
    apply_lora(model, rank=4, alpha=8.0)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = run(model)
        assert len(merge_lora(model)) == 8 * TINY_TEMPORAL_BLOCKS
        merged = run(model)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(randomized().state_dict())


def test_saved_adapters_load_into_a_fresh_lora_model():
    trained = randomized()
    apply_lora(trained)
    randomize_adapters(trained)
    saved = {k: v.clone() for k, v in lora_state_dict(trained).items()}
    assert all(k.endswith(("lora_a.weight", "lora_b.weight")) for k in saved)

    fresh = randomized()
    apply_lora(fresh)
    load_lora(fresh, saved)
    with torch.no_grad():
        assert torch.equal(run(fresh), run(trained))


def test_adapters_of_another_rank_or_layout_are_refused_with_their_names():
    source = randomized()
    apply_lora(source, rank=8)
    saved = lora_state_dict(source)
    model = randomized()
    with pytest.raises(ValueError, match="apply_lora first"):
        load_lora(model, saved)
    apply_lora(model, rank=16)
    first = next(iter(saved))
    with pytest.raises(ShapeMismatchError, match=rf"{re.escape(first)}: given \(8, 32\), model \(16, 32\)"):
        load_lora(model, saved)
    with pytest.raises(KeyError, match="1 missing"):
        load_lora(model, {k: v for k, v in lora_state_dict(model).items() if k != first})


def test_bad_lora_arguments_are_named():
    with pytest.raises(ValueError, match="rank"):
        apply_lora(randomized(), rank=0)
    with pytest.raises(ValueError, match=r"self_attn\.to_x"):
        apply_lora(randomized(), target=("self_attn.to_x",))
    model = randomized()
    apply_lora(model, target=("cross_attn.to_v",))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, target=("cross_attn.to_v",))


def direct_lora_model(seed: int) -> VideoUNet:
    """Built on CPU, adapted, then initialised in init_weights order: what a meta build must reproduce."""
    model = VideoUNet(preset("tiny"))
    apply_lora(model)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def meta_lora_model() -> VideoUNet:
    with torch.device("meta"):
        model = VideoUNet(preset("tiny"))
    apply_lora(model)
    assert all(p.is_meta for p in model.parameters())
    return model


def test_adapters_of_a_meta_built_model_are_initialised_by_init_weights():
    model = meta_lora_model().to_empty(device="cpu")
    torch.manual_seed(4)
    model.init_weights()
    expected = direct_lora_model(4)
    for name, p in model.named_parameters():
        assert torch.equal(p, expected.get_parameter(name)), name
    adapters = lora_state_dict(model)
    assert sum("lora_a" in k for k in adapters) == sum("lora_b" in k for k in adapters) > 0
    assert all(not v.any() for k, v in adapters.items() if "lora_b" in k)
    assert all(v.abs().max() > 0 for k, v in adapters.items() if "lora_a" in k)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(adapters)


def test_fsdp_shards_frozen_and_trainable_parameters_together(cpu_mesh):
    sharded = meta_lora_model()
    for block in sharded.block_pairs():
        fully_shard(block, mesh=cpu_mesh)
    fully_shard(sharded, mesh=cpu_mesh)
    sharded.to_empty(device="cpu")
    torch.manual_seed(4)
    sharded.init_weights()
    reference = direct_lora_model(4)
    with torch.no_grad():  # a non-zero output layer, so that the adapters receive gradient
        sharded.conv_out.weight.fill_(0.01)
        reference.conv_out.weight.fill_(0.01)

    loss, reference_loss = run(sharded.train()).square().mean(), run(reference.train()).square().mean()
    loss.backward()
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss)
    for name, p in sharded.named_parameters():
        assert isinstance(p, DTensor)
        if "lora_" in name:
            assert p.grad is not None, name
            torch.testing.assert_close(
                p.grad.full_tensor(), reference.get_parameter(name).grad, atol=1e-6, rtol=1e-4
            )
        else:
            assert p.grad is None, name
