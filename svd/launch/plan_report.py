"""The capacity plan in words: the table `jobs/plan.py` prints, the refusal `jobs/launch.py` gives a job that
cannot fit (naming the term that is too large and the settings that would fix it), and docs/scaling.md.
"""

from __future__ import annotations

import copy

from svd.config import RunConfig, compose
from svd.launch.plan import GIB, Memory, Plan, plan
from svd.launch.unet_cost import UNetCost

TERM_LABELS = {
    "parameters": "parameters (fp32 shards)",
    "gradients": "gradients (fp32 shards)",
    "optimizer": "AdamW moments (fp32 shards)",
    "ema": "EMA (fp32 shards)",
    "gathered": "gathered blocks + root (compute dtype)",
    "accumulated": "no-sync gradients (unsharded fp32)",
    "activations": "activations (saved for backward)",
    "backward_extra": "backward peak change",
    "optimizer_step": "optimizer step temporaries",
    "encoders": "frozen encoders (fp32)",
    "encode_work": "encoding work (frames served)",
    "workspace": "allowance (CUDA context + fragmentation)",
}
# Stages of the paper as docs/scaling.md plans them: text tasks with the CLIP text encoder, image tasks with
# the CLIP image encoder (the paths are never read by the planner); multiview as the paper ran it, on 8 GPUs.
PAPER_STAGES = (
    "image_pretrain",
    "video_pretrain",
    "video_pretrain_hr",
    "video_finetune_hq",
    "i2v_finetune",
    "interpolation",
    "camera_lora",
    "multiview",
)
ENCODERS = ["model.text_encoder=clip-vit-h-14", "model.image_encoder=clip-vit-h-14"]
SCALING_NODES = (1, 2, 4, 8, 16, 32, 64)
SCALING_DOC_COMMAND = "python jobs/plan.py --scaling-doc docs/scaling.md"


def gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def format_plan(p: Plan) -> str:
    """The readable table of one plan."""
    m, f = p.memory, p.flops
    c, h, w = p.latent
    lines = [
        f"stage {p.stage}, model {p.model}: {p.parameters / 1e6:.0f}M parameters, "
        f"{p.trainable / 1e6:.0f}M trainable",
        f"{p.nodes} node(s) × {p.gpus_per_node} {p.gpu}; sharding {p.sharding} "
        f"(shards over {p.shard_group}), {p.compute_dtype} compute, "
        f"activation checkpointing {p.activation_checkpointing}",
        f"{p.frames} frames × {p.height}×{p.width} → latents {c}×{h}×{w}, "
        f"{p.context_tokens} context token(s); "
        f"micro-batch {p.micro_batch} × accumulation {p.accumulation:g} per GPU",
        "",
        f"{'memory per GPU':44s}{'GiB':>8s}",
    ]
    for name, value in m.terms().items():
        if name == "peak":
            continue
        lines.append(f"  {TERM_LABELS[name]:42s}{gib(value):>8s}")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += [
        f"  {'peak':42s}{gib(m.peak):>8s}  of {gib(p.memory_limit)} GiB: {verdict}",
        f"  largest micro-batch that fits: {p.max_micro_batch}",
        "  activations by checkpointing: "
        + ", ".join(f"{mode} {gib(v)} GiB" for mode, v in p.activations_by_ac.items()),
        "",
        f"{'compute per sample':44s}{'TFLOP':>8s}",
    ]
    for name, label in [
        ("forward", "UNet forward"),
        ("backward", "UNet backward"),
        ("recompute", "recomputation (checkpointing)"),
        ("encoders", "frozen encoders (forward)"),
        ("step", "executed per sample"),
    ]:
        lines.append(f"  {label:42s}{f[name] / 1e12:>8.2f}")
        if name == "forward":
            paths = sorted(p.flops_by_path.items())
            lines.append("    of which " + ", ".join(f"{k} {v['forward'] / 1e12:.2f}" for k, v in paths))
    lines += [
        "",
        f"time at {p.mfu:.0%} of the bf16 peak (plan.mfu)",
        f"  step {p.step_seconds:.3f} s (compute {p.compute_seconds:.3f} s, FSDP communication "
        f"{p.comm_seconds:.3f} s, overlapped); model FLOPs utilisation {p.model_flops_utilisation:.1%}",
        f"  {p.samples_per_second:,.1f} samples/s; {p.steps:,} steps: {p.days:.2f} days, "
        f"{p.gpu_hours:,.0f} GPU-hours",
        "",
        f"data (loader serves {p.serve})",
        f"  {p.bytes_per_sample / 1e6:.2f} MB read and {p.decoded_bytes_per_sample / 1e6:.2f} MB delivered "
        f"per sample; {p.node_read_bytes_per_second / 1e6:,.1f} MB/s read per node",
    ]
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


def format_blocks(cost: UNetCost, act_bytes: int) -> str:
    """Per block pair (and the stretches between them): parameters, FLOPs per sample, saved activations."""
    lines = [f"{'block':22s}{'params (M)':>12s}{'fwd GFLOP':>12s}{'bwd GFLOP':>12s}{'saved MiB':>12s}"]
    for b in cost.blocks:
        lines.append(
            f"{b.name:22s}{sum(b.params.values()) / 1e6:>12.2f}{b.forward / 1e9:>12.1f}"
            f"{b.backward / 1e9:>12.1f}{b.saved_bytes(act_bytes) / 2**20:>12.1f}"
        )
    return "\n".join(lines)


def summary(p: Plan) -> str:
    """One line for launch.py: the plan the job was admitted on."""
    return (
        f"plan: peak {gib(p.memory.peak)} of {gib(p.memory_limit)} GiB per {p.gpu}, "
        f"step {p.step_seconds:.2f} s at MFU {p.mfu:.0%}, {p.samples_per_second:,.0f} samples/s, "
        f"{p.days:.2f} days for {p.steps:,} steps"
    )


def largest_term(m: Memory) -> tuple[str, float]:
    terms = {k: v for k, v in m.terms().items() if k not in ("peak", "workspace")}
    name = max(terms, key=terms.get)
    return name, terms[name]


def fixes(cfg: RunConfig, p: Plan) -> list[str]:
    """Changes that make the job fit, each with the peak it would have: a smaller micro-batch; activation
    checkpointing (with the micro-batch it allows); the fewest more nodes (sharded over all ranks)."""
    tries: list[RunConfig] = []
    if p.max_micro_batch:
        tries.append(_with_micro_batch(cfg, p.max_micro_batch))
    if cfg.parallel.activation_checkpointing != "full":
        full = copy.deepcopy(cfg)
        full.parallel.activation_checkpointing = "full"
        q = plan(full)
        if q.max_micro_batch:
            tries.append(_with_micro_batch(full, min(cfg.data.micro_batch, q.max_micro_batch)))
    for factor in (2, 4, 8):
        more = copy.deepcopy(cfg)
        more.nodes = cfg.nodes * factor
        if p.sharding == "hsdp":
            more.parallel.sharding = "fsdp"  # HSDP's shards do not shrink with nodes
        if cfg.train.global_batch % (more.world_size * more.data.micro_batch) == 0 and plan(more).fits:
            tries.append(more)
            break
    found = []
    for candidate in tries:
        q = plan(candidate)
        if q.fits:
            found.append(f"{_changes(cfg, candidate)} (peak {gib(q.memory.peak)} GiB)")
    return found


def _with_micro_batch(cfg: RunConfig, most: int) -> RunConfig:
    """`cfg` with the largest micro-batch ≤ `most` that divides the global batch over the ranks."""
    out = copy.deepcopy(cfg)
    per_rank = cfg.train.global_batch // cfg.world_size
    out.data.micro_batch = max(m for m in range(1, most + 1) if per_rank % m == 0)
    return out


def _changes(old: RunConfig, new: RunConfig) -> str:
    keys = [
        ("nodes", lambda c: c.nodes),
        ("parallel.sharding", lambda c: c.parallel.sharding),
        ("parallel.activation_checkpointing", lambda c: c.parallel.activation_checkpointing),
        ("data.micro_batch", lambda c: c.data.micro_batch),
    ]
    return " ".join(f"{key}={get(new)}" for key, get in keys if get(new) != get(old))


def refusal(cfg: RunConfig, p: Plan) -> str:
    """One message: what is too large, by how much, and what would fix it."""
    name, value = largest_term(p.memory)
    found = fixes(cfg, p)
    fix = "; ".join(found) if found else "nothing tried fits (a GPU with more memory: gpu=…)"
    return (
        f"the plan does not fit: peak {gib(p.memory.peak)} GiB per GPU > {gib(p.memory_limit)} GiB of "
        f"{p.gpu}; the largest term is {TERM_LABELS[name]} at {gib(value)} GiB "
        f"(micro-batch {p.micro_batch}, checkpointing {p.activation_checkpointing}, "
        f"{p.nodes} node(s)); would fit: {fix}. (python jobs/plan.py … shows every term; "
        "plan.check=false skips this check)"
    )


def stage_config(stage: str, nodes: int, gpu: str, extra: list[str] | None = None) -> RunConfig:
    """A paper stage on `nodes` full nodes of `gpu`, with activation checkpointing only where it must."""
    base = compose([f"gpu={gpu}", "data.table=unread"])
    args = [f"stage={stage}", f"gpu={gpu}", "data.table=unread", *ENCODERS]
    args += [f"nodes={nodes}", f"gpus_per_node={base.gpu.node_gpus}", *(extra or [])]
    for ac in ("none", "every_n", "full"):
        cfg = compose([*args, f"parallel.activation_checkpointing={ac}"])
        if plan(cfg).fits:
            return cfg
    return cfg


def scaling_doc(gpu: str = "h100-80gb", nodes: int = 32) -> str:
    """docs/scaling.md: the paper's stages at `nodes` × 8 GPUs, and video pretraining from 1 to 64 nodes."""
    lines = [
        "# Scale on paper",
        "",
        f"Generated by the capacity planner (`{SCALING_DOC_COMMAND}`); do not edit by hand.",
        "Assumptions: the `plan.*` defaults of svd/config.py (utilisation 35% of the bf16 peak on the",
        "FLOPs a step executes; 10% allocator allowance + 0.75 GiB CUDA context), frames served and",
        "encoded on the GPU, CLIP text (77 tokens) or image encoder on the GPU, micro-batch 1, activation",
        "checkpointing only where the stage does not fit without it (`every_n` = every second block pair).",
        "How each number is made: svd/launch/plan.py.",
        "",
        f"## The paper's stages at {nodes} nodes × 8 {gpu}",
        "",
        "| stage | frames × size | global batch | iterations | checkpointing | memory/GPU (GiB) "
        "| step (s) | samples/s | days | GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in PAPER_STAGES:
        n = 1 if stage == "multiview" else nodes
        p = plan(stage_config(stage, n, gpu))
        lines.append(
            f"| {stage}{' (1 node)' if n != nodes else ''} | {p.frames} × {p.height}×{p.width} "
            f"| {p.accumulation * p.micro_batch * p.nodes * p.gpus_per_node:g} | {p.steps:,} "
            f"| {p.activation_checkpointing} | {gib(p.memory.peak)} | {p.step_seconds:.2f} "
            f"| {p.samples_per_second:,.0f} | {p.days:.2f} | {p.gpu_hours:,.0f} |"
        )
    latents = plan(stage_config("video_pretrain", nodes, gpu, ["data.serve=latents"]))
    lines += [
        "",
        f"With precomputed latents (`data.serve=latents`), video_pretrain takes {latents.days:.2f} days "
        f"({latents.samples_per_second:,.0f} samples/s): the autoencoder no longer runs in the step.",
        "",
        f"## video_pretrain from 1 to {SCALING_NODES[-1]} nodes (8 {gpu} each, global batch 1536)",
        "",
        "| nodes | GPUs | sharding | micro-batch × accumulation | memory/GPU (GiB) | step (s) "
        "| compute / communication (s) | samples/s | days | read per node (MB/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bound = []
    for n in SCALING_NODES:
        p = plan(stage_config("video_pretrain", n, gpu))
        bound += [n] if p.comm_seconds > p.compute_seconds else []
        lines.append(
            f"| {n} | {n * p.gpus_per_node} | {p.sharding} | {p.micro_batch} × {p.accumulation:g} "
            f"| {gib(p.memory.peak)} | {p.step_seconds:.2f} | {p.compute_seconds:.2f} / {p.comm_seconds:.2f} "
            f"| {p.samples_per_second:,.0f} | {p.days:.2f} | {p.node_read_bytes_per_second / 1e6:,.1f} |"
        )
    lines += [
        "",
        "Memory per GPU does not move with the node count: HSDP shards every parameter, gradient, AdamW",
        "moment and EMA value over the 8 GPUs of one node however many nodes replicate it, and each GPU",
        "still computes one sample at a time (gradient accumulation keeps the no-sync gradients while",
        "accumulation > 1). Samples/s grows with the GPUs because a step's samples are spread thinner;",
        "the all-gathers of every micro-batch stay on NVLink and only the gradient all-reduce crosses",
        "nodes, so "
        + (
            f"communication stays below compute up to {SCALING_NODES[-1]} nodes."
            if not bound
            else f"communication exceeds compute from {bound[0]} nodes on."
        ),
        "",
    ]
    return "\n".join(lines)
