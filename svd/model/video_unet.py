"""The latent video UNet of Stable Video Diffusion (Blattmann et al., 2023), as released.

Every spatial layer is followed by a temporal one and a learned blend of the two:
  VideoResBlock    = spatial ResBlock (3×3)   → temporal ResBlock ([3, 1, 1]) → AlphaBlender
  VideoTransformer = spatial transformer      → temporal transformer (+ frame positions) → AlphaBlender
These two classes are the unit that parallelism and activation checkpointing wrap (see `block_pairs`):
the model itself never knows whether it is sharded.

Frames travel as (B·T, C, H, W); a per-sample `image_only` flag makes stills skip the temporal path, so
Stage I (images) trains through this same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svd.model.attention import SpatialTransformerBlock, TemporalTransformerBlock
from svd.model.conditioning import MicroConditioning, sinusoidal_embedding
from svd.model.layers import (
    GROUPS,
    AlphaBlender,
    Downsample,
    EmbeddingMLP,
    ResBlock,
    Upsample,
    init_weights,
    zero_init,
)

SVD_MICRO_CONDITIONING = (("fps_id", 256), ("motion_bucket_id", 256), ("cond_aug", 256))


@dataclass(frozen=True)
class VideoUNetConfig:
    """Architecture of a VideoUNet; the defaults are the released SVD image-to-video UNet."""

    in_channels: int = 8  # 4 noisy latent + 4 conditioning latent (image-to-video); 4 for text-to-video
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    micro_conditioning: tuple[tuple[str, int], ...] = SVD_MICRO_CONDITIONING
    merge_factor: float = 0.5

    def __post_init__(self) -> None:
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            if channels % GROUPS:
                raise ValueError(
                    f"model_channels×channel_mult[{level}] = {channels} is not a multiple of {GROUPS}"
                )
            if channels % self.head_channels:
                raise ValueError(
                    f"head_channels={self.head_channels} does not divide {channels} (level {level})"
                )
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries, "
                f"channel_mult {len(self.channel_mult)}"
            )

    @property
    def emb_dim(self) -> int:
        return 4 * self.model_channels


PRESETS: dict[str, VideoUNetConfig] = {
    # A few hundred thousand parameters: CPU tests and the demo.
    "tiny": VideoUNetConfig(
        in_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(True, True),
        head_channels=16,
        context_dim=32,
        micro_conditioning=(("fps_id", 32), ("motion_bucket_id", 32), ("cond_aug", 32)),
    ),
    # ~0.24B: the released layout at 128 base channels, for single-GPU experiments.
    "small": VideoUNetConfig(model_channels=128),
    # The released SVD / SVD-XT UNet: 1521M parameters.
    "svd": VideoUNetConfig(),
}


def preset(name: str, **overrides: object) -> VideoUNetConfig:
    """A named architecture with fields replaced, e.g. `preset("tiny", in_channels=12)`."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class Frames:
    """How the (B·T) frames of a batch form videos; passed to every block."""

    num_frames: int
    image_only: Tensor | None  # (B,) bool, True where the sample is a still image; None: all videos
    temporal: bool  # False when every sample is an image: the temporal path is not computed at all

    @staticmethod
    def of(num_frames: int, image_only: Tensor | None) -> Frames:
        if image_only is None or not bool(image_only.any()):
            return Frames(num_frames, None, True)
        return Frames(num_frames, image_only.bool(), not bool(image_only.all()))

    def mask(self, ndim: int) -> Tensor | None:
        """The image flags shaped (B, 1, …) to broadcast against a tensor with `ndim` dimensions."""
        return None if self.image_only is None else self.image_only.view(-1, *([1] * (ndim - 1)))


class VideoResBlock(nn.Module):
    """Spatial ResBlock, then a temporal ResBlock over [3, 1, 1], blended by a learned α."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, merge_factor: float):
        super().__init__()
        self.spatial = ResBlock(in_channels, out_channels, emb_dim)
        self.temporal = ResBlock(out_channels, out_channels, emb_dim, temporal=True)
        self.mixer = AlphaBlender(merge_factor)

    def forward(self, x: Tensor, emb: Tensor, frames: Frames) -> Tensor:
        x = self.spatial(x, emb)
        if not frames.temporal:
            return x
        n, c, h, w = x.shape
        t = frames.num_frames
        video = x.view(n // t, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)
        temporal = self.temporal(video, emb.view(n // t, t, -1))
        return self.mixer(video, temporal, frames.mask(5)).transpose(1, 2).reshape(n, c, h, w)


class VideoTransformer(nn.Module):
    """Spatial transformer, then a temporal transformer with a frame-position embedding, blended by α."""

    def __init__(self, channels: int, head_channels: int, depth: int, context_dim: int, merge_factor: float):
        super().__init__()
        heads = channels // head_channels
        self.norm = nn.GroupNorm(GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.spatial_blocks = nn.ModuleList(
            SpatialTransformerBlock(channels, heads, head_channels, context_dim) for _ in range(depth)
        )
        self.temporal_blocks = nn.ModuleList(
            TemporalTransformerBlock(channels, heads, head_channels, context_dim) for _ in range(depth)
        )
        self.frame_pos_embed = EmbeddingMLP(channels, 4 * channels, channels)
        self.mixer = AlphaBlender(merge_factor)
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor, frames: Frames) -> Tensor:
        n, c, h, w = x.shape
        t = frames.num_frames
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c))
        if frames.temporal:
            frame_index = torch.arange(t, device=x.device)
            pos = self.frame_pos_embed(sinusoidal_embedding(frame_index, c).to(tokens.dtype))[:, None]
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            tokens = spatial(tokens, context)
            if frames.temporal:
                video = tokens.view(n // t, t, h * w, c)
                mixed = self.mixer(video, temporal(video + pos, context), frames.mask(4))
                tokens = mixed.view(n, h * w, c)
        out = self.proj_out(tokens).view(n, h, w, c).permute(0, 3, 1, 2)
        return out + x


class DownStage(nn.Module):
    """One resolution level of the encoder: residual (+ transformer) blocks, then an optional downsample."""

    def __init__(
        self,
        res_blocks: list[VideoResBlock],
        transformers: list[VideoTransformer],
        downsample: Downsample | None,
    ):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.transformers = nn.ModuleList(transformers)
        self.downsample = downsample

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, frames: Frames, skips: list[Tensor]) -> Tensor:
        for i, res in enumerate(self.res_blocks):
            h = res(h, emb, frames)
            if self.transformers:
                h = self.transformers[i](h, context, frames)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h


class UpStage(nn.Module):
    """One resolution level of the decoder: each block first concatenates the matching encoder skip."""

    def __init__(
        self,
        res_blocks: list[VideoResBlock],
        transformers: list[VideoTransformer],
        upsample: Upsample | None,
    ):
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.transformers = nn.ModuleList(transformers)
        self.upsample = upsample

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, frames: Frames, skips: list[Tensor]) -> Tensor:
        for i, res in enumerate(self.res_blocks):
            h = res(torch.cat([h, skips.pop()], dim=1), emb, frames)
            if self.transformers:
                h = self.transformers[i](h, context, frames)
        if self.upsample is not None:
            h = self.upsample(h, skips[-1].shape[-2:])
        return h


class MidStage(nn.Module):
    """Residual → transformer → residual at the lowest resolution."""

    def __init__(self, channels: int, cfg: VideoUNetConfig):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            VideoResBlock(channels, channels, cfg.emb_dim, cfg.merge_factor) for _ in range(2)
        )
        self.transformers = nn.ModuleList(
            [
                VideoTransformer(
                    channels, cfg.head_channels, cfg.transformer_depth, cfg.context_dim, cfg.merge_factor
                )
            ]
        )

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, frames: Frames) -> Tensor:
        h = self.res_blocks[0](h, emb, frames)
        h = self.transformers[0](h, context, frames)
        return self.res_blocks[1](h, emb, frames)


class VideoUNet(nn.Module):
    """ε-free network F of the EDM denoiser: F(c_in·x, c_noise, context, micro-conditioning)."""

    def __init__(self, cfg: VideoUNetConfig):
        """Built on the default device (honouring `with torch.device(...)`) and initialised; under
        `torch.device("meta")` the layers are only declared: call `to_empty(device=…)` then
        `init_weights()` (after sharding, if any) to get the same weights as a direct build."""
        super().__init__()
        self.cfg = cfg
        device = torch.get_default_device()
        with torch.device("meta"):  # declare only: no memory, and not one random number drawn
            self._declare_layers(cfg)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def _declare_layers(self, cfg: VideoUNetConfig) -> None:
        mc, emb_dim = cfg.model_channels, cfg.emb_dim
        self.time_embed = EmbeddingMLP(mc, emb_dim)
        self.micro_cond = MicroConditioning(cfg.micro_conditioning, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, mc, kernel_size=3, padding=1)

        def transformer(channels: int) -> VideoTransformer:
            return VideoTransformer(
                channels, cfg.head_channels, cfg.transformer_depth, cfg.context_dim, cfg.merge_factor
            )

        levels = len(cfg.channel_mult)
        ch, skip_channels = mc, [mc]
        self.down_stages = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            out = mc * mult
            res_blocks, transformers = [], []
            for _ in range(cfg.num_res_blocks):
                res_blocks.append(VideoResBlock(ch, out, emb_dim, cfg.merge_factor))
                ch = out
                if cfg.attention_levels[level]:
                    transformers.append(transformer(ch))
                skip_channels.append(ch)
            downsample = Downsample(ch) if level < levels - 1 else None
            if downsample is not None:
                skip_channels.append(ch)
            self.down_stages.append(DownStage(res_blocks, transformers, downsample))

        self.mid_stage = MidStage(ch, cfg)

        self.up_stages = nn.ModuleList()
        for level in reversed(range(levels)):
            out = mc * cfg.channel_mult[level]
            res_blocks, transformers = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res_blocks.append(VideoResBlock(ch + skip_channels.pop(), out, emb_dim, cfg.merge_factor))
                ch = out
                if cfg.attention_levels[level]:
                    transformers.append(transformer(ch))
            self.up_stages.append(UpStage(res_blocks, transformers, Upsample(ch) if level > 0 else None))

        self.norm_out = nn.GroupNorm(GROUPS, ch, eps=1e-5)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.out_channels, kernel_size=3, padding=1))

    def init_weights(self) -> None:
        """Initialise every parameter in place, in a fixed order: PyTorch's default initialisation per
        layer, zeros for the output layer of each residual branch, α = merge_factor for the blenders.

        Same seed, same weights, whether the model was built directly or on `meta` then `to_empty`;
        works on sharded (DTensor) parameters too.
        """
        init_weights(self)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        context: Tensor,
        micro: dict[str, Tensor],
        image_only: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, in_channels, H, W); c_noise: (B,); context: (B, L, context_dim);
        micro: {name: (B,) or (B, T)}; image_only: (B,) bool or None. Returns (B, T, out_channels, H, W)."""
        b, t = x.shape[:2]
        if x.shape[2] != self.cfg.in_channels:
            raise ValueError(
                f"input has {x.shape[2]} channels, the model expects in_channels={self.cfg.in_channels}"
            )
        frames = Frames.of(t, image_only)
        time_features = sinusoidal_embedding(c_noise, self.cfg.model_channels).to(
            self.time_embed.linear_1.weight.dtype
        )
        emb = self.time_embed(time_features)[:, None] + self.micro_cond(micro, b, t)
        emb = emb.flatten(0, 1)  # (B·T, E)

        h = self.conv_in(x.flatten(0, 1).to(self.conv_in.weight.dtype))  # bf16 under mixed precision
        skips = [h]
        for stage in self.down_stages:
            h = stage(h, emb, context, frames, skips)
        h = self.mid_stage(h, emb, context, frames)
        for stage in self.up_stages:
            h = stage(h, emb, context, frames, skips)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.view(b, t, *h.shape[1:])

    def block_pairs(self) -> Iterator[nn.Module]:
        """Each spatial+temporal pair (VideoResBlock or VideoTransformer): the unit to shard or checkpoint."""
        return (m for m in self.modules() if isinstance(m, VideoResBlock | VideoTransformer))

    def temporal_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters added for video (temporal layers, blenders, frame-position embeddings).

        Stage I trains the rest; Stage II adds these to a pretrained image model.
        """
        temporal_parts = ("temporal", "temporal_blocks", "mixer", "frame_pos_embed")
        for name, param in self.named_parameters():
            if any(part in temporal_parts for part in name.split(".")):
                yield name, param
