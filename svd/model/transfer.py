"""Start a model from another model's weights when the two architectures differ a little (`init_from`).

The cases the training stages need: the Stage-I image model has no temporal layers (they are *added*
and keep their fresh initialisation); an image-to-video or interpolation model has more input channels
than its source (the input conv is *reshaped*: the source weights in the first channels, zeros in the
new ones, so the model starts out computing exactly what the source computed on the old inputs);
tensors the model does not have are *dropped*. Any other shape difference is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]

# Weights (C_out, C_in, kh, kw) of the convolutions that read the model input: the only tensors whose
# shape may grow, along C_in.
INPUT_CONVS = ("conv_in.weight",)


def name_some(names: Iterable[str], limit: int = 3) -> str:
    """'a, b, c and 4 more': a list of names short enough for one line."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return f"{shown} and {len(names) - limit} more" if len(names) > limit else shown


def describe_shape_mismatches(mismatches: list[tuple[str, Shape, Shape]], sides: tuple[str, str]) -> str:
    """One line for each of the first three mismatched tensors (the caller's message gives the count), e.g.
    'conv_in.weight: source (32, 4, 3, 3), model (32, 8, 3, 3)'."""
    first, second = sides
    return "\n".join(f"{key}: {first} {tuple(a)}, {second} {tuple(b)}" for key, a, b in mismatches[:3])


class ShapeMismatchError(ValueError):
    """Tensors that exist on both sides with shapes no rule reconciles; the message names them."""


@dataclass(frozen=True)
class TransferReport:
    """What `adapt_state_dict` did, by parameter name."""

    loaded: int  # tensors taken from the source (reshaped ones included)
    added: tuple[str, ...]  # in the model, not in the source: they keep the model's own initialisation
    dropped: tuple[str, ...]  # in the source, not in the model: ignored
    reshaped: tuple[tuple[str, Shape, Shape], ...]  # (name, source shape, model shape)

    def summary(self) -> str:
        lines = [
            f"loaded {self.loaded} tensors from the source, {len(self.reshaped)} reshaped, "
            f"{len(self.added)} added (fresh init), {len(self.dropped)} dropped"
        ]
        if self.reshaped:
            lines.append(
                "reshaped: " + name_some(f"{key} {tuple(a)} → {tuple(b)}" for key, a, b in self.reshaped)
            )
        if self.added:
            lines.append(f"added: {name_some(self.added)}")
        if self.dropped:
            lines.append(f"dropped: {name_some(self.dropped)}")
        return "\n".join(lines)


def adapt_state_dict(
    model: nn.Module, source: Mapping[str, Tensor], *, input_convs: tuple[str, ...] = INPUT_CONVS
) -> tuple[dict[str, Tensor], TransferReport]:
    """The source tensors that the model has, input convs widened where their channels grew.

    The result holds exactly the model's names that the source has, so load it with `strict=False`
    (`model.load_state_dict(sd, strict=False)`, or `set_model_state_dict(..., full_state_dict=True,
    strict=False)` for a sharded model): the missing names are exactly `report.added`. Only the names and
    shapes of `model.state_dict()` are read, so a meta-device or sharded model works.
    """
    target = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report = plan_transfer(target, {name: tuple(t.shape) for name, t in source.items()}, input_convs)
    widened = {name: shape for name, _, shape in report.reshaped}
    adapted = {
        name: _zero_extend_input_channels(tensor, widened[name]) if name in widened else tensor
        for name, tensor in source.items()
        if name in target
    }
    return adapted, report


def plan_transfer(
    target: Mapping[str, Shape], source: Mapping[str, Shape], input_convs: tuple[str, ...] = INPUT_CONVS
) -> TransferReport:
    """What `adapt_state_dict` does, decided from names and shapes alone: for loaders that read only the
    tensors they keep (a sharded model reads its shards of them). Raises ShapeMismatchError as it does."""
    reshaped: list[tuple[str, Shape, Shape]] = []
    mismatched: list[tuple[str, Shape, Shape]] = []
    for name, have in source.items():
        want = target.get(name)
        if want is None or tuple(have) == tuple(want):
            continue
        if name in input_convs and _grows_input_channels(tuple(have), tuple(want)):
            reshaped.append((name, tuple(have), tuple(want)))
        else:
            mismatched.append((name, tuple(have), tuple(want)))
    if mismatched:
        details = describe_shape_mismatches(mismatched, ("source", "model"))
        raise ShapeMismatchError(
            f"a source tensor does not fit the model: {details}"
            if len(mismatched) == 1
            else f"{len(mismatched)} source tensors do not fit the model:\n{details}"
        )
    return TransferReport(
        loaded=sum(name in target for name in source),
        added=tuple(name for name in target if name not in source),
        dropped=tuple(name for name in source if name not in target),
        reshaped=tuple(reshaped),
    )


def _grows_input_channels(have: Shape, want: Shape) -> bool:
    return len(have) == len(want) >= 2 and have[1] < want[1] and have[:1] + have[2:] == want[:1] + want[2:]


def _zero_extend_input_channels(weight: Tensor, shape: Shape) -> Tensor:
    """The weight for more input channels: new channels get zero weight, so they contribute nothing."""
    out = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
    out[:, : weight.shape[1]] = weight
    return out
