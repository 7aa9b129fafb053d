"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", v0.1,
AlexNet) of generated frames against the true ones: each of AlexNet's five ReLU outputs unit-normalised over
channels, the squared difference weighted by the learned non-negative per-channel weights, averaged over
positions and summed over layers.

Computed here rather than with the `lpips` package: that package builds its backbone with torchvision, which
this project does not install, and would download the ImageNet weights (no network on the cluster). The
weights are the user's, from a local folder (`eval.lpips=`): `alexnet.pth`, torchvision's ImageNet AlexNet
state dict (`alexnet-owt-7be5be79.pth`), pinned by `eval.lpips_sha256` as the I3D file is, and `lin.pth`,
the `lpips` package's `weights/v0.1/alex.pth` (the linear layers). Without a folder LPIPS is skipped, and the
evaluation says so in one line (`SKIPPED`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from svd.config import ConfigError
from svd.eval.features import sha256_of

SKIPPED = (
    "LPIPS skipped: no eval.lpips=<local folder with alexnet.pth and lin.pth> (see the README: Evaluation)"
)
BACKBONE, LINEAR = "alexnet.pth", "lin.pth"
CHANNELS = (64, 192, 384, 256, 256)  # AlexNet's five ReLU outputs, the layers LPIPS compares
# The `lpips` package's ScalingLayer: frames in [-1, 1] shifted and scaled as ImageNet's were.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 31  # AlexNet's stride-4 stem and two 3×3 max-pools leave at least one position
EPS = 1e-10  # the package's normalize_tensor


def alexnet_features() -> nn.Sequential:
    """torchvision's `alexnet().features`, layer for layer, so its state dict's `features.*` keys load."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
    )


class Lpips:
    """The LPIPS distance of frame pairs, with the backbone and linear weights of a folder."""

    def __init__(self, features: nn.Sequential, weights: list[torch.Tensor]):
        self.features = features.eval().requires_grad_(False)
        self.weights = weights  # per layer, (C,) non-negative
        self.taps = {i for i, m in enumerate(features) if isinstance(m, nn.ReLU)}

    @classmethod
    def load(cls, folder: str, *, sha256: str) -> Lpips:
        """The weights of `folder`; a missing file or a backbone of another sha256 is refused in one line."""
        backbone, linear = Path(folder) / BACKBONE, Path(folder) / LINEAR
        for path in (backbone, linear):
            if not path.is_file():
                raise ConfigError(f"eval.lpips={folder}: no {path.name} there (see the README: Evaluation)")
        digest = sha256_of(str(backbone))
        if digest != sha256.lower():
            raise ConfigError(f"{backbone} has sha256 {digest}, eval.lpips_sha256 pins {sha256}")
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        features = alexnet_features()
        features.load_state_dict(
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        )
        lin = torch.load(linear, map_location="cpu", weights_only=True)
        weights = [lin[f"lin{i}.model.1.weight"].reshape(-1).double() for i in range(len(CHANNELS))]
        return cls(features.double(), weights)

    def __call__(self, generated: np.ndarray, truth: np.ndarray) -> float:
        """The mean over frames of (frames, 3, height, width) videos in [0, 1]; 0 for identical frames."""
        a, b = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (generated, truth))
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(
                f"generated {tuple(a.shape)} and true {tuple(b.shape)} must be (frames, 3, h, w)"
            )
        if min(a.shape[-2:]) < MIN_SIDE:
            raise ValueError(
                f"LPIPS needs frames of at least {MIN_SIDE}×{MIN_SIDE} pixels, got {tuple(a.shape[-2:])}"
            )
        with torch.no_grad():
            distance = sum(
                (w[:, None, None] * (_unit(x) - _unit(y)) ** 2).sum(1).mean((-2, -1))
                for w, x, y in zip(self.weights, self._layers(a), self._layers(b), strict=True)
            )
        return float(distance.mean())

    def _layers(self, frames: torch.Tensor) -> list[torch.Tensor]:
        shift = torch.tensor(SHIFT, dtype=frames.dtype)[:, None, None]
        scale = torch.tensor(SCALE, dtype=frames.dtype)[:, None, None]
        x, out = ((frames * 2 - 1) - shift) / scale, []
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self.taps:
                out.append(x)
        return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + EPS)
