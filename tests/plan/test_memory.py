"""The planner's peak memory of forward and backward against a real CPU step of the same model and states.

On CPU the trainer runs unsharded in fp32 (`parallel.sharding=none`), so the plan's terms are: parameters,
AdamW moments and EMA (allocated before the step and measured by their storages), then activations,
gradients and the backward's buffers (measured by the allocator's events during the step). The GPU-only
allowance (CUDA context, fragmentation) is set to zero for the comparison.
"""

from __future__ import annotations

import pytest
import torch

from svd.config import compose
from svd.launch.plan import plan
from svd.train import parallel
from svd.train.ema import EMA
from svd.train.optim import build_optimizer
from svd.train.task import unet_config


def _config(model: str, frames: int, height: int, width: int, ac: str):
    return compose(
        [
            "data.table=unread",
            f"model={model}",
            "model.autoencoder=space_to_depth",
            "model.autoencoder_factor=2",
            f"data.frames={frames}",
            f"data.height={height}",
            f"data.width={width}",
            "parallel.sharding=none",
            f"parallel.activation_checkpointing={ac}",
            "train.global_batch=1",
            "plan.workspace_fraction=0",
            "plan.cuda_context_gib=0",
        ]
    )


def _measure_step(cfg, measure) -> tuple[int, int]:
    """(bytes of parameters + AdamW state + EMA, the peak increment of one forward and backward)."""
    unet_cfg = unet_config(cfg, latent_channels=12)
    model = measure.build_unet(unet_cfg)
    parallel.parallelize(model, list(model.block_pairs()), None, cfg.parallel, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg.train)
    ema = EMA(model, cfg.train.ema_decay)
    states = [v for s in optimizer.state.values() for v in s.values() if v.ndim]
    held = measure.storage_bytes([*model.parameters(), *states, *ema.shadow.values()])
    inputs = measure.unet_inputs(unet_cfg, cfg.data.frames, cfg.data.height // 2, cfg.data.width // 2, 1)

    def step() -> None:
        model(*inputs).square().mean().backward()

    return held, measure.peak_increment_bytes(step)


@pytest.mark.parametrize(
    ("frames", "height", "width", "ac"),
    [
        (4, 16, 16, "none"),
        (8, 16, 16, "none"),
        (8, 32, 32, "none"),
        (4, 24, 32, "full"),
        (6, 32, 32, "every_n"),
    ],
)
def test_tiny_peak_of_forward_and_backward_agrees_with_a_measured_cpu_step(
    frames, height, width, ac, measure
):
    cfg = _config("tiny", frames, height, width, ac)
    held, increment = _measure_step(cfg, measure)
    planned = plan(cfg).memory
    assert planned.parameters + planned.optimizer + planned.ema == pytest.approx(held, rel=0.01)
    assert planned.forward_backward == pytest.approx(held + increment, rel=0.15)


@pytest.mark.slow
def test_small_peak_of_forward_and_backward_agrees_with_a_measured_cpu_step(measure):
    cfg = _config("small", 4, 32, 32, "full")
    held, increment = _measure_step(cfg, measure)
    assert plan(cfg).memory.forward_backward == pytest.approx(held + increment, rel=0.15)


def test_activations_planned_for_each_checkpointing_mode_agree_with_the_saved_tensors(measure):
    """Checkpointed blocks keep only their inputs: the saved tensors a checkpointed forward leaves."""
    for ac in ("none", "every_n", "full"):
        cfg = _config("tiny", 6, 32, 32, ac)
        unet_cfg = unet_config(cfg, latent_channels=12)
        model = measure.build_unet(unet_cfg)
        parallel.parallelize(model, list(model.block_pairs()), None, cfg.parallel, torch.device("cpu"))
        inputs = measure.unet_inputs(unet_cfg, 6, 16, 16, 1)
        _, saved = measure.saved_activation_bytes(lambda m=model, i=inputs: m(*i), exclude=model.parameters())
        assert plan(cfg).memory.activations == pytest.approx(saved, rel=0.15), ac
