"""Non-finite losses and gradients: a bad step is skipped, a run of them stops training, and no checkpoint
ever holds a NaN or an infinity. The NaNs come from the data (clips whose stored latents are NaN), as they
would from a corrupt encoding, not from a hook in the trainer."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from svd.config import compose
from svd.data.table import write_clip_table
from svd.launch.local import launch_local
from svd.model.video_unet import VideoUNet
from svd.train.checkpoint import Checkpointer, read_full_state
from svd.train.task import unet_config
from svd.train.trainer import NonFiniteError

LATENT_SHAPE = (4, 12, 8, 8)  # 4 frames of 16×16 through the tiny preset's 2× space_to_depth: 12 channels


def latents_table(train_table: dict, moto_s3, name: str, nan_clips: set[int]) -> str:
    """The video clips of the training table with stored latents; those of `nan_clips` are all NaN."""
    rows = [r for r in train_table["rows"] if r["num_frames"] > 1 and r.get("split") != "val"]
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        latents = (
            np.full(LATENT_SHAPE, np.nan, np.float32) if i in nan_clips else rng.standard_normal(LATENT_SHAPE)
        )
        buffer = io.BytesIO()
        np.save(buffer, latents.astype(np.float32))
        rows[i] = row | {"latents": buffer.getvalue()}
    table = f"{train_table['bucket']}/{name}.lance"
    write_clip_table(table, rows, moto_s3.storage)
    return table


def settings(train_table: dict, table: str, run: str, *extra: str) -> list[str]:
    return [
        "stage=video_pretrain",
        "model=tiny",
        f"data.table={table}",
        f"checkpoint.run_dir={train_table['bucket']}/runs/{run}",
        "data.frames=4",
        "data.fps=4",
        "train.global_batch=2",
        "train.log_every=1",
        *extra,
    ]


def all_finite(run_dir: str, part: str) -> bool:
    return all(bool(t.isfinite().all()) for t in read_full_state(run_dir, part).values())


def test_a_step_with_a_nan_loss_is_skipped_and_training_goes_on_with_finite_weights(
    train_table, moto_s3, s3_env
):
    table = latents_table(train_table, moto_s3, "one_nan_clip", nan_clips={3})
    run_dir = f"{train_table['bucket']}/runs/one_nan"
    result = launch_local(
        compose(settings(train_table, table, "one_nan", "train.steps=8", "checkpoint.every=4"))
    )
    assert result.steps == 8
    assert (
        1 <= len(result.nonfinite_steps) <= 2
    )  # the steps whose batch held the NaN clip (8 steps: 2 epochs)
    skipped = set(result.nonfinite_steps)
    assert all(math.isfinite(loss) for step, loss in enumerate(result.losses, 1) if step not in skipped)
    assert all_finite(run_dir, "model.model")
    assert all_finite(run_dir, "ema.weights")


def test_too_many_non_finite_steps_in_a_row_stop_the_run_in_one_line(train_table, moto_s3, s3_env):
    table = latents_table(train_table, moto_s3, "all_nan", nan_clips=set(range(100)))
    cfg = compose(
        settings(
            train_table,
            table,
            "all_nan",
            "train.steps=20",
            "checkpoint.every=2",
            "train.nonfinite_steps_limit=3",
        )
    )
    with pytest.raises(NonFiniteError, match=r"^training stopped at step 3: 3 steps in a row") as raised:
        launch_local(cfg)
    assert "\n" not in str(raised.value)
    run_dir = f"{train_table['bucket']}/runs/all_nan"
    assert Checkpointer(run_dir, moto_s3.storage).latest_step() == 2  # the skipped steps changed no weight
    assert all_finite(run_dir, "model.model")


def test_weights_with_an_infinity_are_never_saved(train_table, moto_s3, s3_env):
    """A stage started from weights holding an infinity (a bad export, a bit flip) trains on them, skips every
    step, and refuses to checkpoint them: the run directory never gets a non-finite checkpoint."""
    cfg = compose(
        settings(train_table, train_table["table"], "from_infinite", "train.steps=4", "checkpoint.every=1")
    )
    source = f"{train_table['bucket']}/runs/infinite_source"
    weights = {
        f"network.{k}": v for k, v in VideoUNet(unet_config(cfg, latent_channels=12)).state_dict().items()
    }
    weights["network.conv_in.weight"][0, 0, 0, 0] = float("inf")
    with Checkpointer(source, moto_s3.storage, async_save=False) as checkpointer:
        checkpointer.save(1, {"model": {"model": weights}, "ema": {"weights": weights}})
    cfg.stage.init_from = source
    with pytest.raises(NonFiniteError, match=r"^the weights are not finite after step 1: not saved"):
        launch_local(cfg)
    assert Checkpointer(cfg.checkpoint.run_dir, moto_s3.storage).latest_step() is None
