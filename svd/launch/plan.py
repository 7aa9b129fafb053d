"""Capacity planner: memory per GPU, FLOPs, step time, days and data rate of a run, before it is submitted.

    p = plan(compose(["stage=video_pretrain", "nodes=32", "gpus_per_node=8", "gpu=h100-80gb"]))
    p.fits, p.memory.peak, p.step_seconds, p.days, p.max_micro_batch

Everything is computed from the configuration: the UNet's per-layer FLOPs and saved activations come from
`unet_cost` (no model is built), the GPU's memory, peak FLOP/s and link speeds from the `gpu` config group
(jobs/conf/gpu/), the assumed utilisation and allowances from `plan.*`. The terms follow what the trainer
and `svd.train.parallel` actually do:

- FSDP2 keeps each parameter sharded in fp32 over the shard group (all ranks for `fsdp`, the ranks of one
  node for `hsdp`); gradients are reduced in fp32 into fp32 shards; AdamW keeps two fp32 moments and the EMA
  one fp32 copy, both sharded like the trainable parameters. Under `parallel.sharding=none` nothing is
  sharded and nothing is cast: the model computes in fp32.
- Forward and backward gather one block pair at a time in the compute dtype (bf16 on GPUs), with the next
  one prefetched; the root's own parameters stay gathered between forward and backward. Micro-batches
  that do not synchronise accumulate unsharded fp32 gradients (FSDP2's no-sync mode).
- Activations: what autograd keeps per sample (`unet_cost`), × micro-batch; a checkpointed block keeps its
  input only and holds its activations again while its backward runs.
- Backward is simulated block by block, last to first: the activations not yet freed, the gradients
  produced so far, and the block's gradient buffers (`BACKWARD_BUFFERS` × its largest activation).
- Frozen encoders: the autoencoder is on the GPU in every stage (the trainer builds it; previews decode);
  the CLIP text or image encoder when configured. Encoding runs only when the loader serves frames.
- An allowance, stated as a term: the CUDA context (`plan.cuda_context_gib`) plus
  `plan.workspace_fraction` of everything else (allocator fragmentation, kernel workspaces).

Time: a step executes the UNet's forward, backward and recomputation, and the frozen encoders' forward,
at `plan.mfu` of the GPU's bf16 peak (the utilisation `bench/gpu.py` measures, defined like the trainer's
MFU metric: counted FLOPs of the step ÷ time ÷ peak). FSDP communication is assumed to overlap compute;
when it cannot (slower links than compute), the step takes the communication time instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from svd.config import RunConfig
from svd.launch.unet_cost import UNetCost, unet_cost
from svd.train.parallel import resolve_sharding
from svd.train.task import CONDITIONED_ON_IMAGE, unet_config

GIB = 2**30
FP32 = 4
BACKWARD_BUFFERS = 3.0  # gradient buffers of a block's backward, in units of its largest activation
TEXT_TOKENS = 77  # CLIP text context length
# Frozen encoders, parameters (kept in fp32 on the device) and forward FLOPs per sample. The autoencoders:
# diffusers' AutoencoderKLTemporalDecoder and AutoencoderKL at the released layout (SD 2.1 encoder).
AUTOENCODER_PARAMS = {"kl_temporal": 97_742_847, "kl": 83_653_863, "space_to_depth": 0}
ENCODE_FEATURE_MAPS = 4.25  # full-resolution feature maps alive while a chunk encodes (CPU-measured)
TEXT_ENCODER_PARAMS = 354e6  # OpenCLIP ViT-H-14 text tower
IMAGE_ENCODER_PARAMS = 632e6  # OpenCLIP ViT-H-14 vision tower
IMAGE_ENCODER_TOKENS = 257  # 224² / 14² patches + class token
SD_ENCODER_CHANNELS = (128, 256, 512, 512)  # the SD 2.1 image encoder (svd_facts.md §1)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, by term."""

    parameters: float  # sharded fp32 parameters (trainable and frozen)
    gradients: float  # sharded fp32 gradients of the trainable parameters
    optimizer: float  # AdamW's two fp32 moments
    ema: float  # the fp32 exponential moving average
    gathered: float  # all-gathered compute-dtype blocks (current + prefetched) and the root's parameters
    accumulated: float  # unsharded fp32 gradients kept between non-synchronising micro-batches
    activations: float  # saved for backward at the end of forward (with the configured checkpointing)
    # the change at the peak of backward (or of the optimizer step): + the recomputed block, gradient and
    # reduce-scatter buffers; − gradients not produced yet, activations already freed
    backward_extra: float
    optimizer_step: float  # AdamW's temporaries while it updates (activations are freed by then)
    encoders: float  # frozen autoencoder / CLIP weights
    encode_work: float  # the autoencoder's working memory while it encodes a chunk of frames
    workspace: float  # CUDA context + the fragmentation/workspace allowance
    peak: float

    @property
    def forward_backward(self) -> float:
        """The highest level during forward and backward, without the allowance."""
        held = self.parameters + self.gradients + self.optimizer + self.ema + self.gathered
        return held + self.accumulated + self.encoders + self.activations + self.backward_extra

    def terms(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Plan:
    stage: str
    model: str
    gpu: str
    nodes: int
    gpus_per_node: int
    sharding: str  # resolved: fsdp | hsdp | none
    shard_group: int  # ranks a parameter is sharded over
    compute_dtype: str
    activation_checkpointing: str
    micro_batch: int
    accumulation: float
    frames: int
    height: int
    width: int
    latent: tuple[int, int, int]  # (C, h, w)
    context_tokens: int
    parameters: float
    trainable: float
    memory: Memory
    memory_limit: float  # bytes of the GPU
    activations_by_ac: dict[str, float]  # activation bytes per GPU for none / full / every_n
    max_micro_batch: int  # the largest micro-batch whose peak fits (0: not even 1)
    flops: dict[str, float]  # per sample: forward, backward, recompute, encoders, step (executed), model
    flops_by_path: dict[str, dict[str, float]]
    step_seconds: float
    compute_seconds: float
    comm_seconds: float
    samples_per_second: float
    mfu: float  # assumed utilisation (counted FLOPs of the step ÷ time ÷ peak)
    model_flops_utilisation: float  # forward + backward only (recompute and encoders not counted)
    steps: int
    days: float
    gpu_hours: float
    serve: str  # frames | latents
    bytes_per_sample: float  # what the loader reads from storage per sample
    decoded_bytes_per_sample: float  # what it hands to the GPU per sample
    node_read_bytes_per_second: float  # storage read rate each node's loader must sustain
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.memory_limit

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fits"] = self.fits
        return data


class PlanError(ValueError):
    """A configuration the planner cannot price (named in the message)."""


def latent_geometry(cfg: RunConfig) -> tuple[int, int, int]:
    """(channels, h, w) of the stage's latents: the SD encoder's 4 channels at 1/8, or space_to_depth's
    3·f² channels at 1/f."""
    d, m = cfg.data, cfg.model
    factor, channels = (m.autoencoder_factor, 3 * m.autoencoder_factor**2)
    if m.autoencoder != "space_to_depth":
        factor, channels = 8, 4
    if d.height % factor or d.width % factor:
        raise PlanError(
            f"data.height={d.height}/data.width={d.width} are not multiples of the latent factor {factor}"
        )
    return channels, d.height // factor, d.width // factor


def context_tokens(cfg: RunConfig) -> int:
    """Tokens the UNet cross-attends to: the CLIP image embedding (one) for image-conditioned tasks, the
    caption's 77 CLIP tokens when a text encoder is configured, else one empty token."""
    if cfg.stage.task in CONDITIONED_ON_IMAGE or not cfg.model.text_encoder:
        return 1
    return TEXT_TOKENS


def resolved_sharding(cfg: RunConfig) -> tuple[str, int]:
    """(mode, shard group size) of the mesh `parallel.build_mesh` builds."""
    mode = resolve_sharding(cfg.parallel.sharding, cfg.nodes)
    group = {"fsdp": cfg.world_size, "hsdp": cfg.gpus_per_node, "none": 1}[mode]
    return mode, group


def compute_bytes(cfg: RunConfig, sharding: str) -> int:
    """2 for bf16, 4 for fp32. Only `fully_shard` casts, so an unsharded model computes in fp32."""
    if sharding == "none" or cfg.parallel.mixed_precision == "fp32":
        return 4
    return 2


def cost_of(cfg: RunConfig) -> UNetCost:
    channels, h, w = latent_geometry(cfg)
    unet = unet_config(cfg, channels)
    return unet_cost(unet, cfg.data.frames, h, w, context_tokens(cfg), temporal=cfg.stage.task != "image")


def trainable_parameters(cfg: RunConfig, cost: UNetCost) -> float:
    """All of them; the non-temporal ones in Stage I; the LoRA adapters of the temporal attention."""
    if cfg.stage.trainable == "lora":
        unet = unet_config(cfg, latent_geometry(cfg)[0])
        r, d, depth = cfg.stage.lora_rank, unet.context_dim, unet.transformer_depth
        per_block = [b.channels for b in cost.blocks if b.channels]
        # self-attention q, k, v, out (c → c) and cross-attention q, out (c → c), k, v (d → c)
        return sum(depth * r * (14 * c + 2 * d) for c in per_block)
    if cfg.stage.task == "image":
        return cost.parameters("spatial")
    return cost.parameters()


def memory(cfg: RunConfig, cost: UNetCost, micro_batch: int) -> Memory:
    sharding, group = resolved_sharding(cfg)
    act = compute_bytes(cfg, sharding)
    total = cost.parameters()
    trainable = trainable_parameters(cfg, cost)
    share = trainable / total  # trainable parameters are spread over the blocks like all of them
    sharded = sharding != "none"
    accumulation = cfg.train.global_batch / (cfg.world_size * micro_batch)

    parameters = total * FP32 / group
    gradients = trainable * FP32 / group
    optimizer = 2 * trainable * FP32 / group
    ema = trainable * FP32 / group
    block_params = [sum(b.params.values()) for b in cost.blocks]
    pair_params = [p for b, p in zip(cost.blocks, block_params, strict=True) if b.pair]
    root_params = total - sum(pair_params)
    largest_pair = max(pair_params)
    gathered = (root_params + 2 * largest_pair) * act if sharded else 0.0
    accumulated = trainable * FP32 if sharded and accumulation > 1 else 0.0

    ac, every = cfg.parallel.activation_checkpointing, cfg.parallel.ac_every
    flags = cost.checkpointed(ac, every)
    kept = [k * micro_batch for k in cost.kept_bytes(act, ac, every)]
    activations = sum(kept)

    # Backward runs the blocks last to first. While block i runs, memory differs from
    # `held + activations` by: + the activations a checkpointed block i computes again, + its gradient
    # buffers and (sharded) its unsharded gradient with the fp32 reduce-scatter input, − the activations
    # of the blocks after i (already freed), − the gradients of the blocks before i (not produced yet).
    extra, freed, pending = float("-inf"), 0.0, gradients
    for block, params, f, keep in reversed(list(zip(cost.blocks, block_params, flags, kept, strict=True))):
        pending -= params * share * FP32 / group
        recomputed = block.saved_bytes(act) * micro_batch if f else 0.0
        buffers = BACKWARD_BUFFERS * block.largest * act * micro_batch
        reduce = params * share * (act + FP32) if sharded else 0.0
        extra = max(extra, recomputed + buffers + reduce - freed - pending)
        freed += keep
    backward_extra = extra
    step_temporaries = trainable * FP32 / group  # AdamW's foreach update: one temporary per moment shard

    encoders, work = frozen_encoder_memory(cfg)
    before = parameters + gradients + optimizer + ema + gathered + accumulated + encoders
    working = max(activations + backward_extra, step_temporaries, work)
    workspace = cfg.plan.cuda_context_gib * GIB + cfg.plan.workspace_fraction * (before + working)
    peak = before + working + workspace
    return Memory(
        parameters, gradients, optimizer, ema, gathered, accumulated, activations, backward_extra,
        step_temporaries, encoders, work, workspace, peak,
    )  # fmt: skip


def serves_frames(cfg: RunConfig) -> bool:
    """The loader serves decoded frames (and the GPU encodes them) unless latents are asked for; image
    conditioning always needs the frames. `auto` is planned as frames: a table may lack latents."""
    return cfg.stage.task in CONDITIONED_ON_IMAGE or cfg.data.serve != "latents"


def encode_work_bytes(frames: int, height: int, width: int, channels: int) -> float:
    """Peak working memory of the image encoder on `frames` frames in fp32 without gradients: the input
    and `ENCODE_FEATURE_MAPS` feature maps of its first (full-resolution) width `channels`."""
    return frames * height * width * (3 + ENCODE_FEATURE_MAPS * channels) * FP32


def frozen_encoder_memory(cfg: RunConfig) -> tuple[float, float]:
    """(weights, encoding work) in bytes; the autoencoder encodes 14 frames at a time (its chunk)."""
    params = AUTOENCODER_PARAMS[cfg.model.autoencoder]
    on_image = cfg.stage.task in CONDITIONED_ON_IMAGE
    if cfg.model.image_encoder and on_image:
        params += IMAGE_ENCODER_PARAMS
    if cfg.model.text_encoder and not on_image:
        params += TEXT_ENCODER_PARAMS
    work = 0.0
    if serves_frames(cfg) and cfg.model.autoencoder != "space_to_depth":
        chunk = min(14, cfg.data.frames * cfg.data.micro_batch)
        work = encode_work_bytes(chunk, cfg.data.height, cfg.data.width, SD_ENCODER_CHANNELS[0])
    return params * FP32, work


def sd_encoder_flops(height: int, width: int) -> float:
    """Forward FLOPs of the SD 2.1 image encoder on one frame (diffusers `Encoder`: conv_in, per level two
    ResNet blocks and a stride-2 conv, the middle ResNet-attention-ResNet, conv_out, quant_conv)."""
    ch = SD_ENCODER_CHANNELS
    h, w, c = height, width, ch[0]
    flops = 2.0 * h * w * 3 * 9 * c
    for level, out in enumerate(ch):
        for _ in range(2):
            flops += 2.0 * h * w * 9 * (c * out + out * out) + (2.0 * h * w * c * out if c != out else 0)
            c = out
        if level < len(ch) - 1:
            h, w = h // 2, w // 2
            flops += 2.0 * h * w * 9 * c * c
    s = h * w
    flops += 2 * 2.0 * s * 9 * 2 * c * c  # two ResNet blocks
    flops += 2.0 * s * 4 * c * c + 4.0 * s * s * c  # single-head attention: q, k, v, out; scores and mix
    flops += 2.0 * s * 9 * c * 8 + 2.0 * s * 8 * 8
    return flops


def encoder_flops(cfg: RunConfig) -> float:
    """Forward FLOPs of the frozen encoders per sample (2 per parameter per token for the CLIP towers)."""
    on_image = cfg.stage.task in CONDITIONED_ON_IMAGE
    flops = 0.0
    if serves_frames(cfg) and cfg.model.autoencoder != "space_to_depth":
        flops += cfg.data.frames * sd_encoder_flops(cfg.data.height, cfg.data.width)
        if on_image:  # the noise-augmented first frame is encoded once more
            flops += sd_encoder_flops(cfg.data.height, cfg.data.width)
    if cfg.model.image_encoder and on_image:
        flops += 2.0 * IMAGE_ENCODER_PARAMS * IMAGE_ENCODER_TOKENS
    if cfg.model.text_encoder and not on_image:
        flops += 2.0 * TEXT_ENCODER_PARAMS * TEXT_TOKENS
    return flops


def communication_seconds(cfg: RunConfig, total: float, trainable: float, accumulation: float) -> float:
    """FSDP traffic of one optimizer step on one GPU: parameters all-gathered in forward and backward of
    every micro-batch, gradients reduce-scattered once, and for HSDP the shards all-reduced across nodes.
    A ring moves (n−1)/n of the data per rank; traffic that leaves the node runs at the inter-node speed."""
    sharding, group = resolved_sharding(cfg)
    if sharding == "none" or cfg.world_size == 1:
        return 0.0
    act = compute_bytes(cfg, sharding)
    gathered = 2 * accumulation * total * act * (group - 1) / group
    reduced = trainable * FP32 * (group - 1) / group
    intra, inter = cfg.gpu.intra_node_gbps * 1e9, cfg.gpu.inter_node_gbps * 1e9
    if sharding == "fsdp":
        link = intra if cfg.nodes == 1 else inter
        return (gathered + reduced) / link
    across = 2 * trainable / group * FP32 * (cfg.nodes - 1) / cfg.nodes
    return (gathered + reduced) / intra + across / inter


def plan(cfg: RunConfig) -> Plan:
    """The capacity plan of a composed run configuration."""
    cost = cost_of(cfg)
    sharding, group = resolved_sharding(cfg)
    act = compute_bytes(cfg, sharding)
    mb = cfg.data.micro_batch
    mem = memory(cfg, cost, mb)
    limit = cfg.gpu.memory_gib * GIB
    total, trainable = cost.parameters(), trainable_parameters(cfg, cost)

    ac, every = cfg.parallel.activation_checkpointing, cfg.parallel.ac_every
    backward = cost.backward_flops
    if trainable < total:  # frozen layers need input gradients only: about half their backward
        backward *= 0.5 + 0.5 * trainable / total
    flops = {
        "forward": cost.forward_flops,
        "backward": backward,
        "recompute": cost.recompute_flops(ac, every),
        "encoders": encoder_flops(cfg),
    }
    flops["model"] = flops["forward"] + flops["backward"]
    flops["step"] = flops["model"] + flops["recompute"] + flops["encoders"]

    per_gpu = cfg.train.global_batch / cfg.world_size
    accumulation = per_gpu / mb
    peak_flops = cfg.gpu.bf16_tflops * 1e12
    compute = per_gpu * flops["step"] / (peak_flops * cfg.plan.mfu)
    comm = communication_seconds(cfg, total, trainable, accumulation)
    step = max(compute, comm)
    samples = cfg.train.global_batch / step
    days = cfg.steps * step / 86400

    channels, h, w = latent_geometry(cfg)
    frames = serves_frames(cfg)
    d = cfg.data
    decoded = d.frames * 3 * d.height * d.width if frames else d.frames * channels * h * w * 2
    read = d.frames / d.fps * cfg.plan.source_mbps * 1e6 / 8 if frames else decoded

    notes = []
    if comm > compute:
        notes.append(f"communication-bound: FSDP traffic {comm:.2f} s > compute {compute:.2f} s per step")
    if accumulation != int(accumulation):
        notes.append(
            f"train.global_batch={cfg.train.global_batch} does not divide over {cfg.world_size} GPUs"
        )
    if (
        cfg.stage.task != "image"
        and not cfg.model.text_encoder
        and cfg.stage.task not in CONDITIONED_ON_IMAGE
    ):
        notes.append("no model.text_encoder: one empty context token (set it to plan with 77 caption tokens)")
    if act == 4 and sharding == "none":
        notes.append("parallel.sharding=none: no mixed precision, the model computes in fp32")

    return Plan(
        stage=cfg.stage.name,
        model=cfg.model.preset,
        gpu=cfg.gpu.name,
        nodes=cfg.nodes,
        gpus_per_node=cfg.gpus_per_node,
        sharding=sharding,
        shard_group=group,
        compute_dtype="bf16" if act == 2 else "fp32",
        activation_checkpointing=ac if ac != "every_n" else f"every_{every}",
        micro_batch=mb,
        accumulation=accumulation,
        frames=d.frames,
        height=d.height,
        width=d.width,
        latent=(channels, h, w),
        context_tokens=cost.context_tokens,
        parameters=total,
        trainable=trainable,
        memory=mem,
        memory_limit=limit,
        activations_by_ac={
            mode: cost.activation_bytes(act, mode, every) * mb for mode in ("none", "full", "every_n")
        },
        max_micro_batch=max_micro_batch(cfg, cost, limit),
        flops=flops,
        flops_by_path=cost.by_path(),
        step_seconds=step,
        compute_seconds=compute,
        comm_seconds=comm,
        samples_per_second=samples,
        mfu=cfg.plan.mfu,
        model_flops_utilisation=per_gpu * flops["model"] / step / peak_flops,
        steps=cfg.steps,
        days=days,
        gpu_hours=days * 24 * cfg.world_size,
        serve="frames" if frames else "latents",
        bytes_per_sample=read,
        decoded_bytes_per_sample=decoded,
        node_read_bytes_per_second=samples / cfg.nodes * read,
        notes=notes,
    )


def max_micro_batch(cfg: RunConfig, cost: UNetCost, limit: float, cap: int = 4096) -> int:
    """The largest micro-batch whose planned peak fits `limit` (the peak grows with the micro-batch)."""
    if memory(cfg, cost, 1).peak > limit:
        return 0
    lo, hi = 1, 2
    while hi <= cap and memory(cfg, cost, hi).peak <= limit:
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory(cfg, cost, mid).peak <= limit else (lo, mid)
    return lo
