"""Checkpoint-format conversion kept beside the model: diffusers `UNetSpatioTemporalConditionModel`.

The released SVD weights are most often loaded in the diffusers layout (a folder with `config.json` and
`diffusion_pytorch_model[.variant].safetensors`, possibly sharded). Our parameter names differ only by a
fixed table of renamings; shapes are identical, so conversion is a pure function of the key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from svd.model.transfer import describe_shape_mismatches, name_some
from svd.model.video_unet import SVD_MICRO_CONDITIONING, VideoUNet, VideoUNetConfig


class CheckpointError(ValueError):
    """A weights folder that cannot be loaded; the message names the file and what is wrong with it."""


# (our name, diffusers name) for each renamed segment run; every other segment is shared.
_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_embed", "time_embedding"),
    ("micro_cond.mlp", "add_embedding"),
    ("down_stages", "down_blocks"),
    ("up_stages", "up_blocks"),
    ("mid_stage", "mid_block"),
    ("res_blocks", "resnets"),
    ("transformers", "attentions"),
    ("spatial", "spatial_res_block"),
    ("temporal", "temporal_res_block"),
    ("mixer", "time_mixer"),
    ("emb_proj", "time_emb_proj"),
    ("skip", "conv_shortcut"),
    ("spatial_blocks", "transformer_blocks"),
    ("temporal_blocks", "temporal_transformer_blocks"),
    ("frame_pos_embed", "time_pos_embed"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("to_out", "to_out.0"),
    ("ff.proj_in", "ff.net.0.proj"),
    ("ff.proj_out", "ff.net.2"),
    ("ff_in.proj_in", "ff_in.net.0.proj"),
    ("ff_in.proj_out", "ff_in.net.2"),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("norm_out", "conv_norm_out"),
)


def _renamer(table: dict[str, str]):
    """One regex pass over '.'-delimited segments, longest match first, so no rename is applied twice."""
    alternatives = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
    pattern = re.compile(rf"(?<=\.)(?:{alternatives})(?=\.)")

    def rename(key: str) -> str:
        return pattern.sub(lambda m: table[m.group(0)], f".{key}")[1:]

    return rename


_to_diffusers_key = _renamer(dict(_RENAMES))
_from_diffusers_key = _renamer({theirs: ours for ours, theirs in _RENAMES})


def to_diffusers_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_to_diffusers_key(k): v for k, v in state_dict.items()}


def from_diffusers_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_from_diffusers_key(k): v for k, v in state_dict.items()}


def to_diffusers_config(cfg: VideoUNetConfig, num_frames: int = 25) -> dict:
    """The `UNetSpatioTemporalConditionModel` config of an architecture.

    diffusers embeds every micro-conditioning value at one width, so per-field widths cannot be exported.
    """
    widths = {width for _, width in cfg.micro_conditioning}
    if len(widths) != 1:
        raise ValueError(
            f"diffusers needs one width for all micro-conditioning fields, got {cfg.micro_conditioning}"
        )
    down = [
        "CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in cfg.attention_levels
    ]
    up = ["CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in cfg.attention_levels]
    return {
        "_class_name": "UNetSpatioTemporalConditionModel",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": down,
        "up_block_types": up[::-1],
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "addition_time_embed_dim": widths.pop(),
        "projection_class_embeddings_input_dim": sum(w for _, w in cfg.micro_conditioning),
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        "num_attention_heads": [cfg.model_channels * m // cfg.head_channels for m in cfg.channel_mult],
        "num_frames": num_frames,
    }


_CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "layers_per_block",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "num_attention_heads",
)


def from_diffusers_config(config: dict, micro_names: tuple[str, ...] | None = None) -> VideoUNetConfig:
    """Our architecture for a diffusers config; `micro_names` name the `added_time_ids` columns in order
    (default: SVD's fps_id, motion_bucket_id, cond_aug)."""
    missing = [key for key in _CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"diffusers config lacks {', '.join(missing)}")
    channels = list(config["block_out_channels"])
    heads = config["num_attention_heads"]
    heads = [heads] * len(channels) if isinstance(heads, int) else list(heads)
    head_channels = {c // h for c, h in zip(channels, heads, strict=True)}
    if len(head_channels) != 1:
        raise ValueError(f"num_attention_heads={heads} gives different head widths per level; need one")
    for key in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        if not isinstance(config[key], int):
            raise ValueError(
                f"diffusers config {key}={config[key]!r}: only one value for all levels is supported"
            )
    width = config["addition_time_embed_dim"]
    n_fields = config["projection_class_embeddings_input_dim"] // width
    names = micro_names or tuple(name for name, _ in SVD_MICRO_CONDITIONING)
    if len(names) != n_fields:
        raise ValueError(
            f"the config embeds {n_fields} micro-conditioning values, {len(names)} names given: {names}"
        )
    attention = tuple(t.startswith("CrossAttn") for t in config["down_block_types"])
    if attention != tuple(t.startswith("CrossAttn") for t in reversed(config["up_block_types"])):
        raise ValueError("down_block_types and up_block_types put attention at different levels")
    return VideoUNetConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=config["layers_per_block"],
        attention_levels=attention,
        head_channels=head_channels.pop(),
        transformer_depth=config["transformer_layers_per_block"],
        context_dim=config["cross_attention_dim"],
        micro_conditioning=tuple((name, width) for name in names),
    )


_WEIGHTS = "diffusion_pytorch_model"


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as error:  # e.g. a truncated download: the library omits the path
        raise CheckpointError(f"{file}: cannot read safetensors ({error})") from error


def _read_safetensors(folder: Path, variant: str | None) -> tuple[dict[str, Tensor], Path]:
    """The state dict in diffusers names, and the file to name in messages (the index if sharded)."""
    stem = f"{_WEIGHTS}.{variant}" if variant else _WEIGHTS
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.exists():
        return _load_safetensors(single), single
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise CheckpointError(
                f"{index}: not a safetensors index with a weight_map ({error!r})"
            ) from error
        return {k: v for shard in shards for k, v in _load_safetensors(folder / shard).items()}, index
    raise FileNotFoundError(f"no {single.name} or {index.name} in {folder}")


def _read_config(config_file: Path, micro_names: tuple[str, ...] | None) -> VideoUNetConfig:
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: expected a diffusers UNet folder")
    try:
        return from_diffusers_config(json.loads(config_file.read_text()), micro_names)
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{config_file}: {error}") from error


def _check_fits(state: dict[str, Tensor], model: VideoUNet, weights_file: Path, config_file: Path) -> None:
    """At most five lines naming both files, the counts and the first few differences (in the file's
    own names), instead of `load_state_dict`'s line per tensor."""
    expected = {k: tuple(v.shape) for k, v in to_diffusers_state_dict(model.state_dict()).items()}
    mismatched = [
        (k, tuple(v.shape), expected[k]) for k, v in state.items() if k in expected and v.shape != expected[k]
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    lines = [
        f"{weights_file} does not match {config_file}: {len(mismatched)} tensors differ in shape, "
        f"{len(missing)} missing from the file, {len(unexpected)} not in the model"
    ]
    if mismatched:
        lines.append(describe_shape_mismatches(mismatched, ("file", "config")))
    names = [f"missing: {name_some(missing)}"] if missing else []
    names += [f"not in the model: {name_some(unexpected)}"] if unexpected else []
    if names:
        lines.append("; ".join(names))
    raise CheckpointError("\n".join(lines))


def load_diffusers_unet(
    path: str | Path, *, variant: str | None = None, micro_names: tuple[str, ...] | None = None
) -> VideoUNet:
    """A VideoUNet from a diffusers UNet folder (e.g. the `unet/` of stabilityai/stable-video-diffusion-*).

    A missing file raises FileNotFoundError; an unreadable file, a config without a needed key, or
    weights that do not fit the config raise CheckpointError naming the file.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    cfg = _read_config(config_file, micro_names)
    state, weights_file = _read_safetensors(folder, variant)
    with torch.device("meta"):
        model = VideoUNet(cfg)
    _check_fits(state, model, weights_file, config_file)
    model.load_state_dict(from_diffusers_state_dict(state), strict=True, assign=True)
    return model


def save_diffusers_unet(model: VideoUNet, path: str | Path, *, num_frames: int = 25) -> None:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` that diffusers loads unchanged."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in to_diffusers_state_dict(model.state_dict()).items()}
    tmp = folder / f".{_WEIGHTS}.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    tmp.replace(folder / f"{_WEIGHTS}.safetensors")  # atomic: a reader never sees half a file
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(model.cfg, num_frames), indent=2))
