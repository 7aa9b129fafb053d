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

from svd.config import parse_settings
from svd.errors import described

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
    from svd.train.trained import RunError, read_run_config, trained_denoiser

    out = Path(cfg.out)
    check_output(out, folder=cfg.format == "diffusers")
    storage = Storage.from_env()
    try:
        run = read_run_config(cfg.run, storage)
        lora = run.stage.trainable == "lora"
        if cfg.format == "lora" and not lora:
            raise ExportError(
                f"format=lora: run {cfg.run} trained no LoRA (stage.trainable={run.stage.trainable})"
            )
        model = trained_denoiser(cfg.run, run, cfg.step, storage)
    except RunError as e:
        raise ExportError(str(e)) from e

    import torch  # after the checks above: they answer in a second, torch takes several to import
    from safetensors.torch import save_file

    from svd.model.lora import lora_state_dict, merge_lora
    from svd.model.weights import save_diffusers_unet

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
