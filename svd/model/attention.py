"""Attention and the two transformer blocks of the video UNet (spatial over H·W, temporal over T).

Shapes: a spatial transformer sees frames as (B·T, S, C) with S = H·W; the temporal block sees the same
memory as (B, T, S, C). The cross-attention context is per *video* (B, L, D): every frame of a video
attends to the same tokens, so queries are grouped per video instead of copying the context per frame
(and per pixel, for the temporal block) as the reference implementations do.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from svd.model.layers import FeedForward


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`; self-attention when context is None.

    Inputs may have any number of leading batch dimensions: (..., L, C) queries, (..., Lc, D) context.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        if source.shape[-2] == 1:
            # One key: its softmax weight is exactly 1, so every query receives v. This is the image-to-
            # video case (a single CLIP token) and skips the q and k projections altogether.
            return self.to_out(self.to_v(source)).expand(*x.shape[:-1], -1)
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(source))
        v = self._split_heads(self.to_v(source))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(-2, -3).flatten(-2))

    def _split_heads(self, t: Tensor) -> Tensor:
        """(..., L, H·d) → (..., H, L, d)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(-2, -3)


class SpatialTransformerBlock(nn.Module):
    """Self-attention within each frame, cross-attention to the video's context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B·T, S, C); context: (B, L, D)."""
        x = x + self.self_attn(self.norm1(x))
        per_video = self.norm2(x).reshape(context.shape[0], -1, x.shape[-1])  # (B, T·S, C)
        x = x + self.cross_attn(per_video, context).reshape(x.shape)
        return x + self.ff(self.norm3(x))


class TemporalTransformerBlock(nn.Module):
    """The released model's `VideoTransformerBlock`: feed-forward in, self-attention over time at each
    pixel, cross-attention to the video's context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, T, S, C); context: (B, L, D)."""
        x = x + self.ff_in(self.norm_in(x))
        over_time = self.norm1(x).transpose(1, 2)  # (B, S, T, C): attention runs along T
        x = x + self.self_attn(over_time).transpose(1, 2)
        per_video = self.norm2(x).flatten(1, 2)  # (B, T·S, C)
        x = x + self.cross_attn(per_video, context).view(x.shape)
        return x + self.ff(self.norm3(x))
