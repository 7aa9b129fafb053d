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
from safetensors.torch import load_file, save_file
from torch import Tensor

from svd.model.video_unet import SVD_MICRO_CONDITIONING, VideoUNet, VideoUNetConfig

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


def from_diffusers_config(config: dict, micro_names: tuple[str, ...] | None = None) -> VideoUNetConfig:
    """Our architecture for a diffusers config; `micro_names` name the `added_time_ids` columns in order
    (default: SVD's fps_id, motion_bucket_id, cond_aug)."""
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


def _read_safetensors(folder: Path, variant: str | None) -> dict[str, Tensor]:
    stem = f"{_WEIGHTS}.{variant}" if variant else _WEIGHTS
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    raise FileNotFoundError(f"no {single.name} or {index.name} in {folder}")


def load_diffusers_unet(
    path: str | Path, *, variant: str | None = None, micro_names: tuple[str, ...] | None = None
) -> VideoUNet:
    """A VideoUNet from a diffusers UNet folder (e.g. the `unet/` of stabilityai/stable-video-diffusion-*)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: expected a diffusers UNet folder")
    cfg = from_diffusers_config(json.loads(config_file.read_text()), micro_names)
    state = from_diffusers_state_dict(_read_safetensors(folder, variant))
    with torch.device("meta"):
        model = VideoUNet(cfg)
    model.load_state_dict(state, strict=True, assign=True)
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
