"""Asynchronous checkpoints copy the state to CPU memory beside the next steps (the loop is held only until
the copy is under way): a checkpoint still holds the state of its step, whatever the loop does to the
weights once `wait_for_staging` returned (the optimizer step, the EMA swap of a preview or validation)."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from svd.config import compose
from svd.launch.local import launch_local
from svd.train.checkpoint import Checkpointer, read_full_state
from svd.train.ema import EMA
from svd.train.staging import ReusingStager


def test_a_change_made_after_the_copy_is_not_in_the_checkpoint(tmp_path):
    weights = {"w": torch.arange(1_000_000, dtype=torch.float32)}
    checkpointer = Checkpointer(str(tmp_path), keep=None, async_save=True)
    checkpointer.save(1, {"model": weights})
    checkpointer.wait_for_staging()
    weights["w"].zero_()
    checkpointer.close()
    saved = read_full_state(str(tmp_path), "model")["w"]
    assert torch.equal(saved, torch.arange(1_000_000, dtype=torch.float32))


def test_the_stager_refreshes_its_copy_in_place_and_takes_new_values_without_tensors():
    """After the first save the copy's buffers are reused (no new memory per save), each save holds its own
    step's values, and values without tensors (a learning rate, the loader's state) are taken as they are."""
    weights = {"w": torch.arange(6, dtype=torch.float32), "b": torch.zeros(2)}
    stager = ReusingStager()
    try:
        first = stager.stage({"model": weights, "lr": 0.1, "data": '{"consumed": 4}'}).result()
        weights["w"].mul_(2)
        weights["b"].fill_(7)
        second = stager.stage({"model": weights, "lr": 0.05, "data": '{"consumed": 8}'}).result()
        weights["w"].zero_()  # after staging: not in the copy
    finally:
        stager.close()
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert second["model"]["w"].data_ptr() != weights["w"].data_ptr()
    assert torch.equal(second["model"]["w"], 2 * torch.arange(6, dtype=torch.float32))
    assert torch.equal(second["model"]["b"], torch.full((2,), 7.0))
    assert (second["lr"], second["data"]) == (0.05, '{"consumed": 8}')


@pytest.mark.parametrize(
    "changed",
    [
        {"w": torch.ones(3), "extra": torch.ones(1)},  # a new key
        {"w": torch.ones(4)},  # another shape
        {"w": torch.ones(3, dtype=torch.float64)},  # another dtype
        {"w": 1.0},  # a tensor became a plain value
    ],
    ids=["key", "shape", "dtype", "kind"],
)
def test_a_state_whose_structure_changed_is_copied_whole(changed):
    stager = ReusingStager()
    try:
        stager.stage({"w": torch.zeros(3)}).result()
        staged = stager.stage(changed).result()
    finally:
        stager.close()
    assert staged.keys() == changed.keys()
    for key, value in changed.items():
        if isinstance(value, torch.Tensor):
            assert staged[key].dtype == value.dtype
            assert torch.equal(staged[key], value)
            assert staged[key].data_ptr() != value.data_ptr()
        else:
            assert staged[key] == value


@pytest.mark.slow
def test_a_checkpoint_holds_its_steps_weights_while_the_loop_goes_on(train_table, s3_env, monkeypatch):
    """The copy is made slow (as a large model's is), and it starts as soon as a preview has swapped the EMA
    weights into the model, if the loop lets the preview run before the copy is done. The preview right after
    the save and the optimizer step after it must both wait for the copy, or the checkpoint of step 2 holds
    the average, or step 3's weights, as step 2's trained weights."""
    swapped = threading.Event()
    applied = EMA.applied

    @contextlib.contextmanager
    def applied_and_told(self, model):
        with applied(self, model):
            swapped.set()
            yield

    def during_a_swap(copy):  # the first save copies it all, later ones refresh the copy
        def copy_during_a_swap(self, *args):
            swapped.wait(timeout=2.0)
            return copy(self, *args)

        return copy_during_a_swap

    monkeypatch.setattr(EMA, "applied", applied_and_told)
    monkeypatch.setattr(ReusingStager, "_copy_all", during_a_swap(ReusingStager._copy_all))
    monkeypatch.setattr(ReusingStager, "_copy_into_buffers", during_a_swap(ReusingStager._copy_into_buffers))

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
