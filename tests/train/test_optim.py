"""AdamW and the gradient clip take parameters in groups (`svd.train.optim`); the results must be those of one
call over all parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svd.config import TrainConfig
from svd.train.optim import PARAMETERS_PER_CALL, build_optimizer, clip_gradients


def _model_with_gradients(seed: int) -> nn.Module:
    """More parameters than one group holds, a few without a gradient (as unused attention projections)."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(PARAMETERS_PER_CALL)])  # 2 parameters each
    model(torch.randn(3, 8)).square().sum().backward()
    model[5].weight.grad = None
    return model


@pytest.mark.parametrize("limit", [0.05, float("inf")])
def test_clipping_in_groups_gives_the_norm_and_gradients_of_one_clip_over_all(limit: float) -> None:
    grouped, whole = _model_with_gradients(0), _model_with_gradients(0)

    norm = clip_gradients(list(grouped.parameters()), limit)
    expected = torch.nn.utils.clip_grad_norm_(whole.parameters(), limit, foreach=True)

    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert float(norm) > 0.05  # the first limit really clips
    for got, want in zip(grouped.parameters(), whole.parameters(), strict=True):
        assert (got.grad is None) == (want.grad is None)
        if got.grad is not None:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=0)


def test_adamw_in_groups_steps_every_parameter_as_one_group_would() -> None:
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    model, reference = _model_with_gradients(1), _model_with_gradients(1)
    optimizer = build_optimizer(model, cfg)
    single = torch.optim.AdamW(
        reference.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )

    optimizer.step()
    single.step()

    assert len(optimizer.param_groups) == 2  # 128 parameters in groups of 64
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
