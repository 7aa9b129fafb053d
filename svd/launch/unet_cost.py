"""What one sample costs the VideoUNet: FLOPs per layer and bytes saved for backward, counted analytically.

The walk below follows `svd.model.video_unet.VideoUNet.forward` layer by layer (convolutions, linears and
attention matmuls, spatial and temporal) for one video of T frames at a latent size h×w with L context
tokens, and records for each block pair (the unit `parallel.py` shards and checkpoints) its FLOPs and the
activations autograd keeps for backward. Nothing is run: the planner prices a 1.5B-parameter model at
576×1024 in milliseconds, and the tests hold the counts against PyTorch's own FLOP counter and a real
CPU step's saved tensors and peak memory.

FLOPs follow `torch.utils.flop_counter` conventions: 2 per multiply-add of matmuls, convolutions and
attention; normalisation and elementwise ops are free. Backward is 2× forward for a layer whose input
needs a gradient, 1× (the weight gradient only) for a layer fed by a constant (the input convolution,
sinusoidal features, the frozen context); attention backward is 2.5× its forward in the fused kernels
(flash attention recomputes the scores) and 2× on the math path.

Saved activations are what PyTorch's autograd keeps, op by op (found by reading the kernels' backward
formulas and checked against `saved_tensors_hooks` on CPU): a convolution or linear keeps its input,
GroupNorm/LayerNorm their input and fp32 statistics, SiLU/GELU their input, a product both factors, the
learned blend both branches; additions, concatenations and nearest upsampling keep nothing. Three PyTorch
details cost whole activations and are counted: GroupNorm over a (B, C, T, H, W) view copies it; each
of the temporal attention's q/k/v projections copies its (B, S, T, C) transposed input; and the temporal
attention runs on 5-D tensors, which the fused kernels do not take, so the math path keeps its scores.
A single context token (the CLIP image embedding, or no conditioning) skips cross-attention's q and k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FP32 = 4
GN_GROUPS = 32


@dataclass(frozen=True)
class Layer:
    """One matmul-like op of the forward pass, for one sample."""

    name: str
    path: str  # spatial | temporal | shared
    forward: float  # FLOPs
    backward: float  # FLOPs


@dataclass
class Block:
    """A block pair (VideoResBlock or VideoTransformer) or a stretch of the network between them."""

    name: str
    pair: bool  # a block pair: activation checkpointing applies to it
    layers: list[Layer] = field(default_factory=list)
    act: float = 0.0  # elements kept for backward in the activation dtype
    stats: float = 0.0  # elements kept in fp32 (normalisation statistics, attention log-sum-exp)
    input: float = 0.0  # elements of the block's input (what a checkpointed block keeps)
    params: dict[str, float] = field(default_factory=dict)  # spatial | temporal: parameters it declares
    largest: float = 0.0  # elements of its largest activation (what backward's gradient buffers scale with)
    channels: int = 0  # a transformer's width (LoRA adapters scale with it)

    def saved_bytes(self, act_bytes: int) -> float:
        return self.act * act_bytes + self.stats * FP32

    @property
    def forward(self) -> float:
        return sum(layer.forward for layer in self.layers)

    @property
    def backward(self) -> float:
        return sum(layer.backward for layer in self.layers)


@dataclass(frozen=True)
class UNetCost:
    """Per-sample cost of one VideoUNet forward and backward at a given input size."""

    blocks: tuple[Block, ...]
    frames: int
    height: int  # latent
    width: int
    context_tokens: int

    def parameters(self, kind: str | None = None) -> float:
        """Parameters of the network: all, or only the `spatial` or `temporal` ones (as
        `VideoUNet.temporal_parameters` splits them)."""
        return sum(v for b in self.blocks for k, v in b.params.items() if kind in (None, k))

    def layers(self) -> list[Layer]:
        return [layer for block in self.blocks for layer in block.layers]

    @property
    def forward_flops(self) -> float:
        return sum(b.forward for b in self.blocks)

    @property
    def backward_flops(self) -> float:
        return sum(b.backward for b in self.blocks)

    def checkpointed(self, mode: str, every: int) -> list[bool]:
        """Which blocks `parallel.parallelize` checkpoints: the i-th block pair (in `block_pairs()` order)
        under `full`, or when i % every == 0 under `every_n`."""
        flags, i = [], 0
        for block in self.blocks:
            flags.append(block.pair and (mode == "full" or (mode == "every_n" and i % every == 0)))
            i += block.pair
        return flags

    def recompute_flops(self, mode: str, every: int = 2) -> float:
        """The forward of every checkpointed block runs again in backward."""
        flags = self.checkpointed(mode, every)
        return sum(b.forward for b, ac in zip(self.blocks, flags, strict=True) if ac)

    def kept_bytes(self, act_bytes: int, mode: str = "none", every: int = 2) -> list[float]:
        """Bytes each block keeps from forward to backward: a checkpointed block keeps only its input."""
        flags = self.checkpointed(mode, every)
        return [
            b.input * act_bytes if ac else b.saved_bytes(act_bytes)
            for b, ac in zip(self.blocks, flags, strict=True)
        ]

    def activation_bytes(self, act_bytes: int, mode: str = "none", every: int = 2) -> float:
        return sum(self.kept_bytes(act_bytes, mode, every))

    def by_path(self) -> dict[str, dict[str, float]]:
        """Forward and backward FLOPs split into spatial, temporal and shared layers."""
        out: dict[str, dict[str, float]] = {}
        for layer in self.layers():
            entry = out.setdefault(layer.path, {"forward": 0.0, "backward": 0.0})
            entry["forward"] += layer.forward
            entry["backward"] += layer.backward
        return out


class _Walk:
    """Builds the blocks of `unet_cost`; each method mirrors one module's forward (and declares its
    parameters, used or not)."""

    def __init__(self, cfg: Any, frames: int, context_tokens: int, temporal: bool):
        self.cfg, self.t, self.ctx, self.temporal = cfg, frames, context_tokens, temporal
        self.e = cfg.emb_dim
        self.blocks: list[Block] = []
        self.block = self._open("embed", pair=False)

    def _open(self, name: str, pair: bool, input_elements: float = 0.0) -> Block:
        block = Block(name, pair, input=input_elements)
        self.blocks.append(block)
        self.block = block
        return block

    def param(self, path: str, count: float) -> None:
        kind = "temporal" if path == "temporal" else "spatial"
        self.block.params[kind] = self.block.params.get(kind, 0.0) + count

    def linear(
        self, name: str, path: str, rows: float, k: int, n: int, needs_input_grad: bool = True, bias=True
    ) -> None:
        self.param(path, k * n + (n if bias else 0))
        if rows:
            flops = 2.0 * rows * k * n
            self.block.layers.append(Layer(name, path, flops, flops * (2 if needs_input_grad else 1)))

    def conv(self, name: str, path: str, outputs: float, k: int, n: int, taps: int, needs_input_grad=True):
        """`outputs` positions × (k inputs × taps) → n channels."""
        self.param(path, k * taps * n + n)
        if outputs:
            flops = 2.0 * outputs * k * taps * n
            self.block.layers.append(Layer(name, path, flops, flops * (2 if needs_input_grad else 1)))

    def attention(
        self, name: str, path: str, batch_heads: float, queries: float, keys: int, head_dim: int, backward=2.5
    ) -> None:
        """q·kᵀ and p·v; backward 2.5× for the fused kernels (they recompute p), 2× for the math path."""
        flops = 4.0 * batch_heads * queries * keys * head_dim
        self.block.layers.append(Layer(name, path, flops, backward * flops))

    def keep(self, elements: float, stats: float = 0.0) -> None:
        self.block.act += elements
        self.block.stats += stats

    # ---- the network ---------------------------------------------------------------------------------
    def embeddings(self) -> None:
        cfg, t, e = self.cfg, self.t, self.e
        micro = sum(width for _, width in cfg.micro_conditioning)
        self.linear("time_embed.linear_1", "shared", 1, cfg.model_channels, e, needs_input_grad=False)
        self.linear("time_embed.linear_2", "shared", 1, e, e)
        self.linear("micro_cond.linear_1", "shared", t, micro, e, needs_input_grad=False)
        self.linear("micro_cond.linear_2", "shared", t, e, e)
        # inputs of the four linears and silu, the summed embedding every ResBlock's silu keeps
        self.keep(cfg.model_channels + 2 * e + t * (micro + 2 * e) + t * e)

    def res_block(self, name: str, c_in: int, c: int, h: int, w: int) -> None:
        t, e, p = self.t, self.e, h * w
        n = t * p  # positions of one video
        self._open(name, pair=True, input_elements=n * c_in).largest = n * max(c_in, c)
        self.param("spatial", 2 * c_in + 2 * c)  # GroupNorms
        self.conv(f"{name}.spatial.conv1", "spatial", n, c_in, c, 9)
        self.linear(f"{name}.spatial.emb_proj", "spatial", t, e, c)
        self.conv(f"{name}.spatial.conv2", "spatial", n, c, c, 9)
        if c_in != c:
            self.conv(f"{name}.spatial.skip", "spatial", n, c_in, c, 1)
        # x, norm1 and silu outputs at c_in; h+e, norm2 and silu outputs at c; silu(emb)
        self.keep(3 * n * c_in + 3 * n * c + t * e, stats=2 * 2 * t * GN_GROUPS)
        on = self.temporal
        self.param("temporal", 4 * c + 1)  # GroupNorms, the blend's α
        self.conv(f"{name}.temporal.conv1", "temporal", n * on, c, c, 3)
        self.linear(f"{name}.temporal.emb_proj", "temporal", t * on, e, c)
        self.conv(f"{name}.temporal.conv2", "temporal", n * on, c, c, 3)
        # GroupNorm's contiguous copy of the (B, C, T, H, W) view, norm/silu/h+e/norm/silu as above,
        # silu(emb), then the blend keeps both branches (spatial output, temporal output)
        self.keep((6 * n * c + t * e + 2 * n * c) * on, stats=2 * 2 * GN_GROUPS * on)

    def transformer(self, name: str, c: int, h: int, w: int) -> None:
        cfg, t, s, on = self.cfg, self.t, h * w, self.temporal
        n, heads = t * s, c // cfg.head_channels
        block = self._open(name, pair=True, input_elements=n * c)
        block.largest, block.channels = 8 * n * c, c  # the feed-forward's hidden layer
        self.param("spatial", 2 * c)  # GroupNorm
        self.keep(2 * n * c, stats=2 * t * GN_GROUPS)  # x (GroupNorm), its permuted copy (proj_in)
        self.linear(f"{name}.proj_in", "shared", n, c, c)
        self.linear(f"{name}.frame_pos_embed.linear_1", "temporal", t * on, c, 4 * c, needs_input_grad=False)
        self.linear(f"{name}.frame_pos_embed.linear_2", "temporal", t * on, 4 * c, c)
        self.keep(9 * t * c * on)
        for i in range(cfg.transformer_depth):
            sp, tp = f"{name}.spatial.{i}", f"{name}.temporal.{i}"
            # spatial: norm1 in/out, q k v, attention output (+ log-sum-exp); cross-attention; norm3 input
            self.param("spatial", 2 * 2 * c)  # norm1, norm3 (norm2 with the cross-attention)
            self._self_attention(sp, "spatial", n, c, heads, t, s)
            self._cross_attention(sp, "spatial", n, c, heads)
            self.keep(n * c, stats=2 * n)
            self._feed_forward(f"{sp}.ff", "spatial", n, c)
            # temporal: x + positions (norm_in), ff_in, norm1 input, attention over time, cross-attention,
            # norm3 input, feed-forward
            self.param("temporal", 3 * 2 * c)  # norm_in, norm1, norm3
            nt = n * on
            self.keep(nt * c, stats=2 * nt)
            self._feed_forward(f"{tp}.ff_in", "temporal", nt, c)
            self.keep(nt * c, stats=2 * nt)
            self._self_attention(tp, "temporal", nt, c, heads, s, t)
            self._cross_attention(tp, "temporal", nt, c, heads)
            self.keep(nt * c, stats=2 * nt)
            self._feed_forward(f"{tp}.ff", "temporal", nt, c)
        self.param("temporal", 1)
        self.keep(2 * n * c * on)  # the blend keeps both branches
        self.linear(f"{name}.proj_out", "shared", n, c, c)
        self.keep(n * c)

    def _self_attention(self, name: str, path: str, n: float, c: int, heads: int, groups: int, length: int):
        """Attention within `groups` sequences of `length` tokens: over h·w per frame (spatial, the fused
        kernel), over T per pixel (temporal: 5-D, the math path). One token: v and out only."""
        d = c // heads
        if length == 1:
            self.linear(f"{name}.self_attn.qk", path, 0, c, 2 * c, bias=False)
            self.linear(f"{name}.self_attn.to_v", path, n, c, c, bias=False)
            self.linear(f"{name}.self_attn.to_out", path, n, c, c)
            # norm1 output (to_v), to_v output (to_out); the spatial norm1 input and statistics
            self.keep(
                2 * n * c + (n * c if path == "spatial" else 0), stats=2 * n if path == "spatial" else 0
            )
            return
        self.linear(f"{name}.self_attn.qkv", path, n, c, 3 * c, bias=False)
        if path == "spatial":
            self.attention(f"{name}.self_attn.sdpa", path, groups * heads, length, length, d)
            self.linear(f"{name}.self_attn.to_out", path, n, c, c)
            # norm1 output, q, k, v, attention output (+ log-sum-exp); norm1 input
            self.keep(5 * n * c + n * c, stats=2 * n + heads * n)
        else:
            self.attention(f"{name}.self_attn.sdpa", path, groups * heads, length, length, d, backward=2.0)
            self.linear(f"{name}.self_attn.to_out", path, n, c, c)
            # three copies of the transposed norm1 output (one per projection), q, k, v, the scores, the
            # copy of the output that to_out reads
            self.keep(3 * n * c + 3 * n * c + n * heads * length + n * c, stats=0)

    def _cross_attention(self, name: str, path: str, n: float, c: int, heads: int) -> None:
        ctx, cd, d = self.ctx, self.cfg.context_dim, c // heads
        self.param(path, 2 * c)  # norm2
        if ctx == 1:  # one key: its weight is 1, the output is to_out(to_v(context)) for every query
            self.linear(f"{name}.cross_attn.to_qk", path, 0, c + cd, c, bias=False)
            self.linear(
                f"{name}.cross_attn.to_v", path, 1 if n else 0, cd, c, needs_input_grad=False, bias=False
            )
            self.linear(f"{name}.cross_attn.to_out", path, 1 if n else 0, c, c)
            self.keep(c if n else 0)
            return
        self.linear(f"{name}.cross_attn.to_q", path, n, c, c, bias=False)
        self.linear(
            f"{name}.cross_attn.to_kv", path, ctx if n else 0, cd, 2 * c, needs_input_grad=False, bias=False
        )
        if n:
            self.attention(f"{name}.cross_attn.sdpa", path, heads, n, ctx, d)
        self.linear(f"{name}.cross_attn.to_out", path, n, c, c)
        # norm2 input and output, q, attention output (+ log-sum-exp), k and v
        self.keep(4 * n * c + 2 * ctx * c * (n > 0), stats=2 * n + heads * n)

    def _feed_forward(self, name: str, path: str, n: float, c: int) -> None:
        """GEGLU: norm output → proj_in (8c, kept for gelu and the product) → gelu (4c) → product (4c)."""
        self.linear(f"{name}.proj_in", path, n, c, 8 * c)
        self.linear(f"{name}.proj_out", path, n, 4 * c, c)
        self.keep(n * c + 8 * n * c + 4 * n * c + 4 * n * c)

    def resample(self, name: str, c: int, h_in: int, w_in: int, h_out: int, w_out: int) -> None:
        self._open(name, pair=False)
        self.conv(f"{name}.conv", "shared", self.t * h_out * w_out, c, c, 9)
        self.keep(self.t * (h_in * w_in if h_out < h_in else h_out * w_out) * c)  # the conv's input


def unet_cost(
    cfg: Any, frames: int, height: int, width: int, context_tokens: int, temporal: bool = True
) -> UNetCost:
    """Per-sample FLOPs and saved activations of `VideoUNet(cfg)` on one video of `frames` latent frames of
    height×width, cross-attending to `context_tokens` tokens. `cfg` is a `VideoUNetConfig`; `temporal=False`
    is the image-only path of Stage I, where every temporal layer is skipped."""
    walk = _Walk(cfg, frames, context_tokens, temporal)
    mc, t = cfg.model_channels, frames
    walk.embeddings()
    walk.conv("conv_in", "shared", t * height * width, cfg.in_channels, mc, 9, needs_input_grad=False)
    walk.keep(t * height * width * cfg.in_channels)
    h, w, ch = height, width, mc
    skips = [(mc, h, w)]
    levels = len(cfg.channel_mult)
    for level, mult in enumerate(cfg.channel_mult):
        out = mc * mult
        for i in range(cfg.num_res_blocks):
            walk.res_block(f"down.{level}.res.{i}", ch, out, h, w)
            ch = out
            skips.append((ch, h, w))
        if cfg.attention_levels[level]:  # block_pairs() order: a stage's res blocks, then its transformers
            for i in range(cfg.num_res_blocks):
                walk.transformer(f"down.{level}.attn.{i}", ch, h, w)
        if level < levels - 1:
            h2, w2 = -(-h // 2), -(-w // 2)
            walk.resample(f"down.{level}.downsample", ch, h, w, h2, w2)
            h, w = h2, w2
            skips.append((ch, h, w))
    walk.res_block("mid.res.0", ch, ch, h, w)
    walk.res_block("mid.res.1", ch, ch, h, w)
    walk.transformer("mid.attn.0", ch, h, w)
    for level in reversed(range(levels)):
        out = mc * cfg.channel_mult[level]
        for i in range(cfg.num_res_blocks + 1):
            skip_c, h, w = skips.pop()
            walk.res_block(f"up.{level}.res.{i}", ch + skip_c, out, h, w)
            ch = out
        if cfg.attention_levels[level]:
            for i in range(cfg.num_res_blocks + 1):
                walk.transformer(f"up.{level}.attn.{i}", ch, h, w)
        if level > 0:
            _, h2, w2 = skips[-1]
            walk.resample(f"up.{level}.upsample", ch, h, w, h2, w2)
            h, w = h2, w2
    walk._open("out", pair=False)
    walk.conv("conv_out", "shared", t * h * w, ch, cfg.out_channels, 9)
    walk.param("spatial", 2 * ch)
    walk.keep(3 * t * h * w * ch, stats=2 * t * GN_GROUPS)  # norm_out input, its output, silu output
    return UNetCost(tuple(walk.blocks), frames, height, width, context_tokens)
