"""AdamW, gradient clipping and the learning-rate schedule: linear warmup, then constant (the paper's stages)
or cosine.

Parameters go to AdamW and to the gradient clip in groups of `PARAMETERS_PER_CALL`, not all at once. The
result is the same; the reason is the cost of a multi-tensor (`foreach`/fused) call over FSDP2's DTensors.
Its first call per list builds a sharding strategy for every tensor of the list, and PyTorch 2.13 recomputes
the flattened argument list once per tensor while doing so (`_propagate_use_strided_shard_flag`): quadratic
in the list's length. For the ~600 sharded parameters of even the tiny UNet, the first step's fused AdamW
took 1.4 s and `clip_grad_norm_` 1.0 s, in every training process; in groups of 64 they take 0.2 s together.
Later steps hit DTensor's cache either way and cost the same (measured: 0.02 s both ways).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from svd.config import TrainConfig

PARAMETERS_PER_CALL = 64


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameter: check stage.trainable")
    groups = [{"params": chunk} for chunk in _chunks(params)]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True
    )
    init_state(optimizer)
    return optimizer


def clip_gradients(params: Sequence[Tensor], limit: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over `params`, computed in groups (see the module's docstring): the
    total norm of the group norms is the norm of all gradients, and every gradient is scaled by one factor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm([torch.nn.utils.get_total_norm(chunk) for chunk in _chunks(grads)])
    for chunk in _chunks(list(params)):
        torch.nn.utils.clip_grads_with_norm_(chunk, limit, total)
    return total


def _chunks(items: list[Tensor]) -> list[list[Tensor]]:
    return [items[i : i + PARAMETERS_PER_CALL] for i in range(0, len(items), PARAMETERS_PER_CALL)]


def init_state(optimizer: torch.optim.AdamW) -> None:
    """AdamW's per-parameter state, made now exactly as its first step would make it (step 0, zero moments).

    Some parameters never get a gradient — with a single context token (the CLIP image embedding) attention
    needs no query or key, so `to_q`/`to_k` of cross-attention stay unused — and AdamW creates no state for
    them. Checkpoints must not depend on that: every parameter has its state from the start, so a checkpoint
    holds the same keys at every step and loads into a fresh optimizer. (PyTorch's own helper for this takes
    an optimizer step with zero gradients, which would shift AdamW's bias correction by one step.)
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def apply_train_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig
) -> None:
    """After a checkpoint was loaded: the optimizer's hyperparameters from the configuration, as
    `build_optimizer` and `build_scheduler` set them. Loading restores the param groups (lr, betas, weight
    decay) and the scheduler's base learning rates as they were saved, so a changed `train.lr` would be
    recorded and never used. The schedule's shape (warmup, cosine, length) is already the configuration's:
    the scheduler's function reads `cfg`, and the checkpoint only gives it the step."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
        group["betas"] = tuple(cfg.betas)
        group["weight_decay"] = cfg.weight_decay
