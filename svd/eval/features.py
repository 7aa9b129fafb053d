"""Video features for FVD from a TorchScript network the user supplies (the I3D of StyleGAN-V's FVD:
`i3d_torchscript.pt`), checked against the sha256 its protocol pins, so a number is never computed with
another network than the one it is reported with.

    network = FeatureNetwork.load("s3://models/i3d_torchscript.pt", sha256="…", cache_dir="/tmp/svd-cache")
    features = network(videos)        # uint8 (videos, frames, height, width, 3) → float64 (videos, dim)

Preprocessing follows StyleGAN-V's protocol: each frame resized so its short side is `size` (bilinear,
aspect ratio kept), centre-cropped to `size`×`size`, scaled to [−1, 1], laid out (videos, 3, frames, size,
size); the network is then called with the protocol's keyword arguments (StyleGAN-V's: `rescale=False,
resize=False, return_features=True`, the 400 logits before the softmax).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from svd.data.storage import Storage

STYLEGAN_V_CALL = {"rescale": False, "resize": False, "return_features": True}


class FeatureNetworkError(RuntimeError):
    """A feature network that cannot be used: the message names its URI."""


@dataclass
class FeatureNetwork:
    module: torch.jit.ScriptModule
    uri: str
    sha256: str
    size: int = 224
    call: Mapping[str, Any] = field(default_factory=lambda: dict(STYLEGAN_V_CALL))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def load(
        cls,
        uri: str,
        *,
        sha256: str,
        cache_dir: str,
        storage: Storage | None = None,
        device: torch.device | str = "cpu",
        size: int = 224,
        call: Mapping[str, Any] = STYLEGAN_V_CALL,
    ) -> FeatureNetwork:
        storage = storage or Storage.from_env()
        try:
            path = storage.local_copy(uri, cache_dir)
            digest = sha256_of(path)
        except OSError as e:
            raise FeatureNetworkError(f"cannot read the feature network {uri}: {e}") from e
        if digest != sha256.lower():
            raise FeatureNetworkError(
                f"{uri} has sha256 {digest}, the protocol pins {sha256}: another network would give "
                "numbers that cannot be compared with the protocol's"
            )
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format I3D ships in
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", DeprecationWarning)
                module = torch.jit.load(path, map_location=device).eval()
        except RuntimeError as e:
            raise FeatureNetworkError(f"{uri} is not a TorchScript file: {str(e).splitlines()[0]}") from e
        return cls(module, uri, digest, size, dict(call), torch.device(device))

    @torch.no_grad()
    def __call__(self, videos: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(videos)
        if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
            raise FeatureNetworkError(
                f"videos must be uint8 (videos, frames, height, width, 3), got {x.dtype} {tuple(x.shape)}"
            )
        features = self.module(self.preprocess(x).to(self.device), **self.call)
        return features.double().cpu().numpy().reshape(x.shape[0], -1)

    def preprocess(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 (n, t, h, w, 3) → float32 (n, 3, t, size, size) in [−1, 1]."""
        n, t, h, w, _ = videos.shape
        frames = videos.reshape(n * t, h, w, 3).permute(0, 3, 1, 2).float()
        scale = self.size / min(h, w)
        resized_h, resized_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        frames = F.interpolate(frames, size=(resized_h, resized_w), mode="bilinear", align_corners=False)
        top, left = (resized_h - self.size) // 2, (resized_w - self.size) // 2
        frames = frames[:, :, top : top + self.size, left : left + self.size]
        frames = frames / 127.5 - 1.0
        return frames.reshape(n, t, 3, self.size, self.size).permute(0, 2, 1, 3, 4).contiguous()


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
