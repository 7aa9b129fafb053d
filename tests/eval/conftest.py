"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_factory) -> str:
    """A tiny randomly initialised CLIP (32 px, 16-d embeddings) in a folder, as eval.clip takes real ones."""
    return tiny_clip_factory("eval_clip", image_size=32, patch_size=8, projection_dim=16)


@pytest.fixture(scope="session")
def tiny_lpips(tmp_path_factory) -> tuple[str, str]:
    """(folder, sha256 of its alexnet.pth): a randomly initialised AlexNet (torchvision's `features.*`
    keys; the architecture is fixed, ~10 MB) and random non-negative linear weights, as eval.lpips takes
    real ones."""
    import torch

    from svd.eval.features import sha256_of
    from svd.eval.lpips import BACKBONE, CHANNELS, LINEAR, alexnet_features

    folder = tmp_path_factory.mktemp("eval_lpips")
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}
    torch.save(state | {"classifier.1.weight": torch.zeros(2, 2)}, folder / BACKBONE)  # ignored, as real ones
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(CHANNELS)}
    torch.save(lin, folder / LINEAR)
    return str(folder), sha256_of(str(folder / BACKBONE))
