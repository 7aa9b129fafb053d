"""Asynchronous checkpoints copy the state to CPU memory beside the next steps (the loop is held only until
the copy is under way): a checkpoint still holds the state of its step, whatever the loop does to the
weights once `wait_for_staging` returned (the optimizer step, the EMA swap of a preview or validation)."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch.distributed.checkpoint.staging import DefaultStager

from svd.config import compose
from svd.launch.local import launch_local
from svd.train.checkpoint import Checkpointer, read_full_state
from svd.train.ema import EMA


def test_a_change_made_after_the_copy_is_not_in_the_checkpoint(tmp_path):
    weights = {"w": torch.arange(1_000_000, dtype=torch.float32)}
    checkpointer = Checkpointer(str(tmp_path), keep=None, async_save=True)
    checkpointer.save(1, {"model": weights})
    checkpointer.wait_for_staging()
    weights["w"].zero_()
    checkpointer.close()
    saved = read_full_state(str(tmp_path), "model")["w"]
    assert torch.equal(saved, torch.arange(1_000_000, dtype=torch.float32))


@pytest.mark.slow
def test_a_checkpoint_holds_its_steps_weights_while_the_loop_goes_on(train_table, s3_env, monkeypatch):
    """The copy is made slow (as a large model's is), and it starts as soon as a preview has swapped the EMA
    weights into the model, if the loop lets the preview run before the copy is done. The preview right after
    the save and the optimizer step after it must both wait for the copy, or the checkpoint of step 2 holds
    the average, or step 3's weights, as step 2's trained weights."""
    swapped = threading.Event()
    applied, copy = EMA.applied, DefaultStager._stage

    @contextlib.contextmanager
    def applied_and_told(self, model):
        with applied(self, model):
            swapped.set()
            yield

    def copy_during_a_swap(self, state_dict, **kwargs):
        swapped.wait(timeout=2.0)
        return copy(self, state_dict, **kwargs)

    monkeypatch.setattr(EMA, "applied", applied_and_told)
    monkeypatch.setattr(DefaultStager, "_stage", copy_during_a_swap)

    def step_2_weights(run: str, preview_every: int) -> dict[str, torch.Tensor]:
        cfg = compose(
            [
                "stage=video_pretrain",
                "model=tiny",
                f"data.table={train_table['table']}",
                f"checkpoint.run_dir={train_table['bucket']}/runs/{run}",
                "data.frames=4",
                "data.fps=4",
                "train.steps=3",
                "train.global_batch=2",
                "checkpoint.every=2",
                "train.val_every=0",  # validation swaps the weights as previews do; one of them is enough
                f"train.preview_every={preview_every}",
            ]
        )
        launch_local(cfg)
        return read_full_state(f"{cfg.checkpoint.run_dir}/checkpoints/step-00000002", "model.model")

    plain, previewed = step_2_weights("staging-plain", 0), step_2_weights("staging-previewed", 2)
    assert plain.keys() == previewed.keys()
    assert all(torch.equal(plain[name], previewed[name]) for name in plain)
