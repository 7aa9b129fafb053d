"""Building blocks of the video UNet: residual blocks, resampling, the spatial/temporal blender, MLPs.

Every block here works on tensors only; how frames are grouped into videos is passed in by the caller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUPS = 32  # GroupNorm groups of the released model (sgm `normalization`)


def zero_init(module: nn.Module) -> nn.Module:
    """Mark a layer to start at zero, so its residual branch starts as the identity (as sgm initialises).

    The mark, not the zeros, is what matters: `init_weights` reads it whenever the model is
    (re)initialised, e.g. after a meta-device build. The layer is also zeroed now, for standalone use.
    """
    module.init_zero = True
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class TemporalConv(nn.Module):
    """A [3, 1, 1] convolution over (B, C, T, H, W): it mixes each pixel with the same pixel in the
    neighbouring frames.

    The weight keeps the Conv3d shape (C_out, C_in, 3, 1, 1), so checkpoints of the released model load
    unchanged, but the arithmetic runs as a (3, 1) Conv2d over (B, C, T, H·W): PyTorch has no oneDNN
    kernel for this Conv3d on CPU, and the Conv2d form measured 1.5–2.5× faster forward+backward.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 1, 1))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Conv3d initialisation (the same calls in the same order as `nn.Conv3d`)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)  # C_in·3, as for the Conv3d
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x.flatten(3), self.weight.squeeze(-1), self.bias, padding=(1, 0))
        return out.unflatten(3, x.shape[3:])


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv → + embedding → GroupNorm → SiLU → conv, plus a skip connection.

    `temporal=False` is the spatial block: 3×3 convolutions over (N, C, H, W) frames with one embedding per
    frame (N, E). `temporal=True` is the temporal block of the released model: [3, 1, 1] convolutions over
    (B, C, T, H, W) with one embedding per frame (B, T, E); it mixes neighbouring frames only.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, temporal: bool = False):
        super().__init__()
        if temporal and in_channels != out_channels:
            raise ValueError("a temporal ResBlock keeps its channel count")

        def conv(c_in: int, c_out: int) -> nn.Module:
            return TemporalConv(c_in, c_out) if temporal else nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)

        self.norm1 = nn.GroupNorm(GROUPS, in_channels, eps=1e-5)
        self.conv1 = conv(in_channels, out_channels)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(GROUPS, out_channels, eps=1e-5)
        self.conv2 = zero_init(conv(out_channels, out_channels))
        self.skip = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(F.silu(emb))
        # spatial: (N, C) → (N, C, 1, 1); temporal: (B, T, C) → (B, C, T, 1, 1)
        e = e[:, :, None, None] if x.ndim == 4 else e.transpose(1, 2)[..., None, None]
        h = self.conv2(F.silu(self.norm2(h + e)))
        return h + (x if self.skip is None else self.skip(x))


class AlphaBlender(nn.Module):
    """Learned merge of the spatial and temporal paths: α·spatial + (1 − α)·temporal, α = sigmoid(mix).

    `learned_with_images`: samples marked as images use α = 1, so they see the spatial path only — exactly.
    """

    def __init__(self, merge_factor: float = 0.5):
        super().__init__()
        self.merge_factor = merge_factor
        self.mix_factor = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.mix_factor, self.merge_factor)

    def forward(self, spatial: Tensor, temporal: Tensor, image_mask: Tensor | None) -> Tensor:
        """`image_mask` is None (all videos) or a bool tensor broadcastable to the inputs."""
        alpha = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        if image_mask is not None:
            alpha = torch.where(image_mask, torch.ones_like(alpha), alpha)
        # One fused op. For α ≥ 0.5 lerp evaluates spatial − (spatial − temporal)·(1 − α): at α = 1 the
        # result is the spatial input bit for bit.
        return torch.lerp(temporal, spatial, alpha)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to the skip connection's size, then a 3×3 convolution.

    Taking the size from the skip (not a fixed ×2) keeps latents whose sides are not powers of two working.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class FeedForward(nn.Module):
    """GEGLU feed-forward: (a, gate) = proj_in(x); proj_out(a · gelu(gate))."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim_out or dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class EmbeddingMLP(nn.Module):
    """Linear → SiLU → Linear; maps sinusoidal features to the embedding used by the blocks."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# Layers that own parameters, each initialised by its own `reset_parameters` (PyTorch's defaults for the
# torch layers). A subclass (e.g. a LoRA linear layer) inherits its base's rule.
_RESETTABLE = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, TemporalConv, AlphaBlender)


@torch.no_grad()
def init_weights(root: nn.Module) -> None:
    """(Re)initialise every parameter under `root`, in place, visiting modules in `root.modules()` order.

    Layers marked by `zero_init` become zero (drawing no random numbers); every other layer gets its
    `reset_parameters` initialisation. Only in-place `nn.init` ops are used, so this works after
    `to_empty()` of a meta-device build and on sharded (DTensor) parameters. A layer type without a
    rule is an error rather than silently left uninitialised.
    """
    for module in root.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if getattr(module, "init_zero", False):
            for p in own:
                nn.init.zeros_(p)
        elif isinstance(module, _RESETTABLE):
            module.reset_parameters()
        else:
            raise TypeError(f"init_weights has no rule for {type(module).__name__}, which owns parameters")
