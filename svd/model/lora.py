"""LoRA for the camera-motion finetunes (paper §4.3.1: low-rank adapters, rank 16, in the temporal
attention blocks), trained on a frozen base model and exported merged.

A wrapped projection keeps the base layer's own `weight`/`bias` Parameters under the same names, so a
base checkpoint loads into a LoRA model unchanged; the adapter adds `<layer>.lora_a.weight` (random) and
`<layer>.lora_b.weight` (zero, so the model is unchanged at the start of training).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svd.model.attention import TemporalTransformerBlock
from svd.model.layers import zero_init
from svd.model.transfer import ShapeMismatchError, describe_shape_mismatches, name_some

# The projections of the temporal attention, relative to a TemporalTransformerBlock.
TEMPORAL_ATTENTION = tuple(
    f"{attn}.{proj}" for attn in ("self_attn", "cross_attn") for proj in ("to_q", "to_k", "to_v", "to_out")
)


class LoRALinear(nn.Linear):
    """y = x·Wᵀ + b + (α/r)·B·A·x: a frozen linear layer plus a trainable rank-r update.

    A subclass of nn.Linear so that everything that handles linear layers (initialisation, `weight`,
    `in_features`) keeps working; `init_weights` initialises W and b as a Linear, A as a Linear (PyTorch's
    default, as peft does) and B to zero.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # not nn.Linear's: the base layer's Parameters are adopted, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_b = zero_init(nn.Linear(rank, base.out_features, bias=False, **factory))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_b(self.lora_a(x))

    def merged(self) -> nn.Linear:
        """A plain linear layer with W + (α/r)·B·A, sharing this layer's Parameters (updated in place)."""
        with torch.no_grad():
            self.weight.add_(self.scale * (self.lora_b.weight @ self.lora_a.weight))
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.register_parameter("weight", self.weight)
        plain.register_parameter("bias", self.bias)
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(
    model: nn.Module, rank: int = 16, alpha: float = 16.0, target: tuple[str, ...] = TEMPORAL_ATTENTION
) -> list[str]:
    """Wrap the `target` projections of every TemporalTransformerBlock in a LoRALinear and freeze every
    other parameter of `model`. Returns the wrapped layers' names.

    Call it on the unsharded model (real or meta device) before `fully_shard`: the adapters are created
    on the base weights' device, so a meta model gets meta adapters that `init_weights` initialises.
    `target` names projections relative to the block, e.g. ("self_attn.to_q", "cross_attn.to_out").
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
    unknown = [t for t in target if t not in TEMPORAL_ATTENTION]
    if unknown or not target:
        raise ValueError(f"LoRA target {unknown or target} not among {TEMPORAL_ATTENTION}")
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, TemporalTransformerBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no TemporalTransformerBlock to adapt")
    wrapped = []
    for block_name, block in blocks:
        for path in target:
            attn_name, proj_name = path.rsplit(".", 1)
            attn = block.get_submodule(attn_name)
            base = getattr(attn, proj_name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{block_name}.{path} already has a LoRA adapter")
            setattr(attn, proj_name, LoRALinear(base, rank, alpha))
            wrapped.append(f"{block_name}.{path}")
    for name, p in model.named_parameters():
        p.requires_grad_(_is_lora_name(name))
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter weights (`…lora_a.weight`, `…lora_b.weight`), under the model's own names."""
    return {name: t for name, t in model.state_dict().items() if _is_lora_name(name)}


def load_lora(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load adapter weights saved by `lora_state_dict` into a model with the same adapters applied."""
    expected = {name: t.shape for name, t in lora_state_dict(model).items()}
    if not expected:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters: call apply_lora first")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise KeyError(
            f"LoRA weights do not match the model's adapters: {len(missing)} missing "
            f"({name_some(missing)}), {len(unexpected)} unexpected ({name_some(unexpected)})"
        )
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k])) for k, v in state_dict.items() if v.shape != expected[k]
    ]
    if mismatched:
        raise ShapeMismatchError(
            f"{len(mismatched)} LoRA weights differ in shape (another rank?):\n"
            + describe_shape_mismatches(mismatched, ("given", "model"))
        )
    model.load_state_dict(dict(state_dict), strict=False)


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and put back a plain nn.Linear (for export: the state dict
    then has the base model's names only). Returns the merged layers' names. Unsharded models only."""
    merged = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.merged())
            merged.append(name)
    return merged


def _is_lora_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("lora_a", "lora_b")
