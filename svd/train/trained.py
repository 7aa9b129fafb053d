"""A run's trained model, for the jobs that use it after training (export, evaluation): its configuration
and its EMA weights, in this process, without a process group.

    cfg = read_run_config("s3://bucket/runs/i2v")
    model = trained_denoiser("s3://bucket/runs/i2v", cfg, step=None)       # the latest checkpoint

Every failure is a `RunError` whose one-line message names the run, checkpoint or store: a missing run is
not an unreachable store, and an unknown step lists the saved ones.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from svd.config import from_yaml
from svd.data.storage import Storage, join
from svd.errors import described

if TYPE_CHECKING:
    from svd.config import RunConfig
    from svd.diffusion.edm import Denoiser


class RunError(Exception):
    """A run, checkpoint or store that cannot be used; the message names it, on one line."""


def read_run_config(run: str, storage: Storage) -> RunConfig:
    """The run's `config.yaml`: what model it trained. An unreachable store is not a missing run."""
    uri = join(run, "config.yaml")
    try:
        fs, path = storage.fsspec(uri)
        found = fs.exists(path)
        text = fs.cat_file(path).decode() if found else ""
    except Exception as e:  # any storage client's error: the store cannot be read
        raise RunError(f"run={run}: cannot read {uri} ({described(e)})") from e
    if not found:
        raise RunError(f"run={run}: no config.yaml (is this a run directory?)")
    try:
        return from_yaml(text)
    except Exception as e:  # OmegaConf's errors: a file that is not (or no longer) a run configuration
        raise RunError(f"{uri} is not a run configuration ({described(e)})") from e


def saved_steps(run: str, storage: Storage) -> list[int]:
    from svd.train.checkpoint import STEP_FOLDER

    uri = join(run, "checkpoints")
    try:
        fs, path = storage.fsspec(uri)
        fs.invalidate_cache(path)  # a run that is still training adds steps
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    except Exception as e:  # any storage client's error
        raise RunError(f"run={run}: cannot list {uri} ({described(e)})") from e
    return sorted(int(m[1]) for n in names if (m := STEP_FOLDER.match(n.rstrip("/").rsplit("/", 1)[-1])))


def committed_steps(run: str, storage: Storage) -> list[int]:
    """The saved steps up to the one the run's `latest` marker names: complete checkpoints only. A step
    folder appears while its save is in flight, and the marker moves to it once every rank's data is in."""
    from svd.train.checkpoint import MARKER

    uri = join(run, "checkpoints", MARKER)
    try:
        fs, path = storage.fsspec(uri)
        fs.invalidate_cache(path)
        latest = json.loads(fs.cat_file(path))["step"] if fs.exists(path) else None
    except Exception as e:  # any storage client's error, or a marker that is not JSON
        raise RunError(f"run={run}: cannot read {uri} ({described(e)})") from e
    return [] if latest is None else [s for s in saved_steps(run, storage) if s <= latest]


def checkpoint_source(run: str, step: int | None, storage: Storage) -> str:
    """The run itself (its latest checkpoint) or the folder of checkpoint `step`, which must exist."""
    if step is None:
        return run
    saved = saved_steps(run, storage)
    source = join(run, "checkpoints", f"step-{step:08d}")
    if step not in saved:
        steps = ", ".join(map(str, saved)) or "none"
        raise RunError(f"step={step}: no checkpoint {source} (saved steps: {steps})")
    return source


def trained_denoiser(run: str, cfg: RunConfig, step: int | None, storage: Storage) -> Denoiser:
    """The model `cfg` describes, with the checkpoint's model weights and the EMA over the parameters it
    tracks (what a stage hands on and what is released), LoRA adapters applied but not merged."""
    from svd.diffusion.edm import Denoiser
    from svd.model.autoencoder import build_autoencoder
    from svd.model.lora import apply_lora
    from svd.model.video_unet import VideoUNet
    from svd.train.checkpoint import CheckpointError
    from svd.train.task import autoencoder_config, unet_config
    from svd.train.weights import initial_weights

    channels = build_autoencoder(autoencoder_config(cfg)).latent_channels
    missing = channels if cfg.stage.task == "interpolation" else 0
    model = Denoiser(VideoUNet(unet_config(cfg, channels)), missing_frame_channels=missing)
    if cfg.stage.trainable == "lora":
        apply_lora(model.network, rank=cfg.stage.lora_rank)
    source = checkpoint_source(run, step, storage)
    try:
        weights = initial_weights(source, storage, cfg.model.cache_dir)
    except CheckpointError as e:  # missing, torn or incomplete: its message names the checkpoint
        raise RunError(str(e)) from e
    except Exception as e:  # any storage client's error
        raise RunError(f"{source}: cannot be read ({described(e)})") from e
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # torch lists every mismatched key, one per line
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise RunError(
            f"{source} does not fit the model of {run}/config.yaml: {problems[0] if problems else e} "
            f"({len(problems)} problems in all)"
        ) from e
    return model.eval()
