"""Export a run's EMA weights for inference: a diffusers UNet folder, a safetensors file, or LoRA weights.

    python jobs/export.py run=s3://bucket/runs/i2v_finetune out=exported/unet                    # diffusers
    python jobs/export.py run=outputs/runs/video_pretrain out=exported/unet.safetensors format=safetensors
    python jobs/export.py run=outputs/runs/camera_lora out=exported/zoom_in.safetensors format=lora

The run directory's `config.yaml` says which model it trained. Weights are the latest checkpoint's (or
`step=N`'s) model with the EMA average over the parameters it tracks, consolidated on this process with no
process group. A camera LoRA exports its adapters alone (`format=lora`), or merged into the base weights
(`diffusers`, `safetensors`). The diffusers folder loads with `UNetSpatioTemporalConditionModel` and so in
`StableVideoDiffusionPipeline` for the image-to-video stage.

Exit status: 0 written; 1 the run, its checkpoint, the store or the output path cannot be used (one line on
stderr naming it); 2 bad arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from svd.config import parse_settings
from svd.errors import described

if TYPE_CHECKING:
    from torch import nn

    from svd.config import RunConfig
    from svd.data.storage import Storage

FORMATS = ("diffusers", "safetensors", "lora")


class ExportError(Exception):
    """A run, checkpoint, store or output path that cannot be used; the message names it, on one line."""


@dataclass
class ExportConfig:
    run: str = ""  # the run directory (any URI)
    out: str = ""  # a local folder (diffusers) or file (safetensors, lora)
    format: str = "diffusers"  # diffusers | safetensors | lora
    step: int | None = None  # a checkpoint step; None: the latest


def parse(argv: list[str]) -> ExportConfig:
    cfg = parse_settings(ExportConfig, argv)
    if not cfg.run or not cfg.out:
        raise ValueError("run= and out= are required (see --help)")
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: choose one of {list(FORMATS)}")
    return cfg


def export(cfg: ExportConfig) -> Path:
    from svd.data.storage import Storage

    out = Path(cfg.out)
    check_output(out, folder=cfg.format == "diffusers")
    storage = Storage.from_env()
    run = read_run_config(cfg.run, storage)
    lora = run.stage.trainable == "lora"
    if cfg.format == "lora" and not lora:
        raise ExportError(
            f"format=lora: run {cfg.run} trained no LoRA (stage.trainable={run.stage.trainable})"
        )

    import torch  # after the checks above: they answer in a second, torch takes several to import
    from safetensors.torch import save_file

    from svd.diffusion.edm import Denoiser
    from svd.model.autoencoder import build_autoencoder
    from svd.model.lora import apply_lora, lora_state_dict, merge_lora
    from svd.model.video_unet import VideoUNet
    from svd.model.weights import save_diffusers_unet
    from svd.train.task import autoencoder_config, unet_config

    channels = build_autoencoder(autoencoder_config(run)).latent_channels
    missing = channels if run.stage.task == "interpolation" else 0
    model = Denoiser(VideoUNet(unet_config(run, channels)), missing_frame_channels=missing)
    if lora:
        apply_lora(model.network, rank=run.stage.lora_rank)
    load_checkpoint(model, cfg, storage, run.model.cache_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if cfg.format == "lora":
            save_file({k: v.contiguous() for k, v in lora_state_dict(model.network).items()}, out)
            return out
        if lora:
            merge_lora(model.network)
        if cfg.format == "safetensors":
            state = {k: v.detach().contiguous() for k, v in model.network.state_dict().items()}
            save_file(state, out, metadata={"svd.run": cfg.run})
            return out
        with torch.no_grad():
            save_diffusers_unet(model.network, out, num_frames=run.data.frames)
    except Exception as e:  # OSError, or safetensors' own error for the same causes (disk full, permissions)
        raise ExportError(f"out={out}: cannot be written ({described(e)})") from e
    return out


def check_output(out: Path, *, folder: bool) -> None:
    """Before any weights are read: the output path can be a folder (diffusers) or a file (the others)."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if existing != out and not existing.is_dir():
        raise ExportError(f"out={out}: {existing} is a file, not a folder")
    if existing == out and folder and not out.is_dir():
        raise ExportError(f"out={out} is a file; format=diffusers writes a folder")
    if existing == out and not folder and out.is_dir():
        raise ExportError(f"out={out} is a folder; this format writes one file")


def read_run_config(run: str, storage: Storage) -> RunConfig:
    """The run's `config.yaml`: what model it trained. An unreachable store is not a missing run."""
    from svd.config import from_yaml
    from svd.data.storage import join

    uri = join(run, "config.yaml")
    try:
        fs, path = storage.fsspec(uri)
        found = fs.exists(path)
        text = fs.cat_file(path).decode() if found else ""
    except Exception as e:  # any storage client's error: the store cannot be read
        raise ExportError(f"run={run}: cannot read {uri} ({described(e)})") from e
    if not found:
        raise ExportError(f"run={run}: no config.yaml (is this a run directory?)")
    try:
        return from_yaml(text)
    except Exception as e:  # OmegaConf's errors: a file that is not (or no longer) a run configuration
        raise ExportError(f"{uri} is not a run configuration ({described(e)})") from e


def load_checkpoint(model: nn.Module, cfg: ExportConfig, storage: Storage, cache_dir: str) -> None:
    """The latest checkpoint's (or `step`'s) model and EMA weights into `model`."""
    from svd.data.storage import join
    from svd.train.checkpoint import CheckpointError
    from svd.train.weights import initial_weights

    source = cfg.run
    if cfg.step is not None:
        source = join(cfg.run, "checkpoints", f"step-{cfg.step:08d}")
        saved = saved_steps(cfg.run, storage)
        if cfg.step not in saved:
            steps = ", ".join(map(str, saved)) or "none"
            raise ExportError(f"step={cfg.step}: no checkpoint {source} (saved steps: {steps})")
    try:
        weights = initial_weights(source, storage, cache_dir)
    except CheckpointError as e:  # missing, torn or incomplete: its message names the checkpoint
        raise ExportError(str(e)) from e
    except Exception as e:  # any storage client's error
        raise ExportError(f"{source}: cannot be read ({described(e)})") from e
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # torch lists every mismatched key, one per line
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ExportError(
            f"{source} does not fit the model of {cfg.run}/config.yaml: {problems[0] if problems else e} "
            f"({len(problems)} problems in all)"
        ) from e


def saved_steps(run: str, storage: Storage) -> list[int]:
    from svd.data.storage import join
    from svd.train.checkpoint import STEP_FOLDER

    uri = join(run, "checkpoints")
    try:
        fs, path = storage.fsspec(uri)
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    except Exception as e:  # any storage client's error
        raise ExportError(f"run={run}: cannot list {uri} ({described(e)})") from e
    return sorted(int(m[1]) for n in names if (m := STEP_FOLDER.match(n.rstrip("/").rsplit("/", 1)[-1])))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg = parse(argv)
    except ValueError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    try:
        print(f"wrote {export(cfg)}")
    except ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
