"""Export a run's EMA weights for inference: a diffusers UNet folder, a safetensors file, or LoRA weights.

    python jobs/export.py run=s3://bucket/runs/i2v_finetune out=exported/unet                    # diffusers
    python jobs/export.py run=outputs/runs/video_pretrain out=exported/unet.safetensors format=safetensors
    python jobs/export.py run=outputs/runs/camera_lora out=exported/zoom_in.safetensors format=lora

The run directory's `config.yaml` says which model it trained. Weights are the latest checkpoint's (or
`step=N`'s) model with the EMA average over the parameters it tracks, consolidated on this process with no
process group. A camera LoRA exports its adapters alone (`format=lora`), or merged into the base weights
(`diffusers`, `safetensors`). The diffusers folder loads with `UNetSpatioTemporalConditionModel` and so in
`StableVideoDiffusionPipeline` for the image-to-video stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from svd.config import parse_settings

FORMATS = ("diffusers", "safetensors", "lora")


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
    import torch
    from safetensors.torch import save_file

    from svd.config import from_yaml
    from svd.data.storage import Storage, join
    from svd.diffusion.edm import Denoiser
    from svd.model.autoencoder import build_autoencoder
    from svd.model.lora import apply_lora, lora_state_dict, merge_lora
    from svd.model.video_unet import VideoUNet
    from svd.model.weights import save_diffusers_unet
    from svd.train.task import autoencoder_config, unet_config
    from svd.train.weights import initial_weights

    storage = Storage.from_env()
    fs, path = storage.fsspec(join(cfg.run, "config.yaml"))
    if not fs.exists(path):
        raise FileNotFoundError(f"run={cfg.run}: no config.yaml (is this a run directory?)")
    run = from_yaml(fs.cat_file(path).decode())
    channels = build_autoencoder(autoencoder_config(run)).latent_channels
    missing = channels if run.stage.task == "interpolation" else 0
    model = Denoiser(VideoUNet(unet_config(run, channels)), missing_frame_channels=missing)
    lora = run.stage.trainable == "lora"
    if lora:
        apply_lora(model.network, rank=run.stage.lora_rank)
    source = cfg.run if cfg.step is None else join(cfg.run, "checkpoints", f"step-{cfg.step:08d}")
    model.load_state_dict(initial_weights(source, storage, run.model.cache_dir))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.format == "lora":
        if not lora:
            raise ValueError(
                f"format=lora: run {cfg.run} trained no LoRA (stage.trainable={run.stage.trainable})"
            )
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
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg = parse(argv)
        print(f"wrote {export(cfg)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
