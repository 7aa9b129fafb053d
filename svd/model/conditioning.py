"""Timestep and micro-conditioning embeddings.

The noise level and each micro-conditioning scalar (frame rate, motion bucket, conditioning-augmentation
strength; camera elevation/azimuth for multi-view) are embedded sinusoidally, then an MLP maps them to
the embedding every residual block adds to its features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from svd.model.layers import EmbeddingMLP


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(...,) → (..., dim) features [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i/(dim/2)).

    The layout (cos first, no frequency shift) is the one the released weights were trained with.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class MicroConditioning(nn.Module):
    """Embeds named scalars into one vector added to the timestep embedding.

    `fields` lists (name, sinusoidal width) in the order the released weights expect, e.g. SVD's
    (fps_id, motion_bucket_id, cond_aug) × 256 = 768 inputs. A value may be one per video (B,) or one per
    frame (B, T) — SV3D's camera angles change from frame to frame.
    """

    def __init__(self, fields: tuple[tuple[str, int], ...], emb_dim: int):
        super().__init__()
        self.fields = fields
        self.mlp = EmbeddingMLP(sum(width for _, width in fields), emb_dim)

    def forward(self, values: dict[str, Tensor], batch: int, frames: int) -> Tensor:
        """Returns (B, T, emb_dim)."""
        names = [name for name, _ in self.fields]
        missing, unexpected = set(names) - set(values), set(values) - set(names)
        if missing or unexpected:
            raise KeyError(
                f"micro-conditioning expects {names}; "
                f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
            )
        parts = []
        for name, width in self.fields:
            v = values[name]
            v = v[:, None].expand(batch, frames) if v.ndim == 1 else v
            if v.shape != (batch, frames):
                raise ValueError(
                    f"micro-conditioning {name!r} has shape {tuple(v.shape)}, expected (B,) or (B, T)"
                )
            parts.append(sinusoidal_embedding(v, width))
        return self.mlp(torch.cat(parts, dim=-1).to(self.mlp.linear_1.weight.dtype))
