"""Checkpoints: DCP to local paths and S3 (moto), the `latest` marker, async save, resharding, pruning."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from svd.data.storage import Storage
from svd.train.checkpoint import Checkpointer, CheckpointError, ModelOptimizerState, read_full_state

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("checkpoint_worker.py")


def tiny_model(seed: int, hidden: int = 6, layers: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    sizes = [4] + [hidden] * (layers - 1) + [2]
    return torch.nn.Sequential(*(torch.nn.Linear(a, b) for a, b in itertools.pairwise(sizes)))


class Run:
    """A plain single-process model, AdamW, an EMA dict and a loader-state dict, as the trainer holds them."""

    def __init__(self, seed: int, **model_args: int):
        self.model = tiny_model(seed, **model_args)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.ema = {k: torch.zeros_like(v) for k, v in self.model.state_dict().items()}
        self.data: dict[str, Any] = {"epoch": 0}
        self.parts = {
            "train": ModelOptimizerState(self.model, self.optimizer),
            "ema": self.ema,
            "data": self.data,
        }

    def train(self, step: int) -> None:
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
        self.model(x).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                self.ema[name].lerp_(value, 0.5)
        self.data |= {"epoch": 1, "consumed": {"bucket-16x24": 2 * step}}

    def snapshot(self) -> dict[str, Any]:
        return clone(
            {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "ema": self.ema}
        )


def clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(clone(v) for v in value)
    return value


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Exact equality of nested state (tensors bit for bit), naming the first differing key."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


def folders(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


def marker(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "latest").read_text())


@pytest.mark.parametrize("spelling", ["path", "file-uri", "s3"])
def test_a_saved_run_resumes_into_fresh_objects_exactly(spelling, tmp_path, moto_s3, s3_bucket):
    uris = {"path": str(tmp_path / "run"), "file-uri": f"file://{tmp_path}/run", "s3": f"{s3_bucket}/runs/r1"}
    uri = uris[spelling]
    run = Run(seed=0)
    for step in (1, 2):
        run.train(step)
    with Checkpointer(uri, moto_s3.storage, async_save=False) as checkpointer:
        checkpointer.save(2, run.parts)
    expected = run.snapshot()

    fresh = Run(seed=1)
    assert not torch.equal(fresh.model[0].weight, run.model[0].weight)
    with Checkpointer(uri, moto_s3.storage) as checkpointer:
        assert checkpointer.load(fresh.parts) == 2
    assert_same(fresh.snapshot(), expected)
    assert fresh.data == {"epoch": 1, "consumed": {"bucket-16x24": 4}}


def test_a_fresh_run_has_nothing_to_load(tmp_path):
    run = Run(seed=0)
    with Checkpointer(str(tmp_path / "run")) as checkpointer:
        assert checkpointer.load(run.parts) is None
        assert checkpointer.latest_step() is None
    assert run.data == {"epoch": 0}


def test_a_save_torn_before_its_marker_is_ignored_and_the_previous_step_loads(tmp_path):
    uri = tmp_path / "run"
    run = Run(seed=0)
    run.train(1)
    with Checkpointer(str(uri), async_save=False) as checkpointer:
        checkpointer.save(1, run.parts)
    at_step_1 = run.snapshot()

    # The crash: step 2's data and .metadata written by DCP, the marker never moved; step 3 half written.
    run.train(2)
    state = ModelOptimizerState(run.model, run.optimizer).state_dict()
    dcp.save(
        {"train": state, "ema": run.ema, "data": json.dumps(run.data)},
        checkpoint_id=uri / "checkpoints/step-00000002",
    )
    (uri / "checkpoints/step-00000003").mkdir()
    (uri / "checkpoints/step-00000003/__0_0.distcp").write_bytes(b"partial")

    resumed = Run(seed=1)
    with Checkpointer(str(uri), keep=3, async_save=False) as checkpointer:
        assert checkpointer.load(resumed.parts) == 1
        assert_same(resumed.snapshot(), at_step_1)
        resumed.train(2)
        checkpointer.save(2, resumed.parts)  # overwrites the torn folder; prunes the leftover step 3
    assert marker(uri)["step"] == 2
    assert folders(uri) == ["step-00000001", "step-00000002"]
    assert_same(read_full_state(str(uri), "ema"), resumed.ema)


class Cursor:
    """A Stateful without tensors, like the clip loader: saved as one JSON document."""

    def __init__(self, consumed: tuple[int, ...]):
        self.consumed = consumed

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": list(self.consumed), "seed": 3}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = tuple(state["consumed"])


def test_a_stateful_without_tensors_round_trips_even_when_its_keys_changed(tmp_path):
    uri = str(tmp_path / "run")
    with Checkpointer(uri, async_save=False) as checkpointer:
        checkpointer.save(1, {"data": Cursor((5, 0, 12)), "meta": {"seed": 1, "buckets": {"16x24": [1, 2]}}})
    cursor, meta = Cursor(()), {"old": True}
    with Checkpointer(uri) as checkpointer:
        assert checkpointer.load({"data": cursor, "meta": meta}) == 1
    assert cursor.consumed == (5, 0, 12)
    assert meta == {"seed": 1, "buckets": {"16x24": [1, 2]}}


def test_a_part_that_is_neither_tensors_nor_json_is_named(tmp_path):
    with (
        Checkpointer(str(tmp_path)) as checkpointer,
        pytest.raises(CheckpointError, match="part 'meta' holds"),
    ):
        checkpointer.save(1, {"meta": {"when": object()}})


def test_a_corrupt_marker_is_an_error_naming_it(tmp_path):
    uri = tmp_path / "run"
    (uri / "checkpoints").mkdir(parents=True)
    (uri / "checkpoints/latest").write_text("{not json")
    with (
        Checkpointer(str(uri)) as checkpointer,
        pytest.raises(CheckpointError, match=r"marker .*latest is not valid"),
    ):
        checkpointer.load(Run(seed=0).parts)


def test_a_marker_pointing_at_a_folder_without_metadata_is_an_error_not_a_fresh_start(tmp_path):
    uri = tmp_path / "run"
    run = Run(seed=0)
    with Checkpointer(str(uri), async_save=False) as checkpointer:
        checkpointer.save(1, run.parts)
    (uri / "checkpoints/step-00000001/.metadata").unlink()
    with (
        Checkpointer(str(uri)) as checkpointer,
        pytest.raises(CheckpointError, match="step-00000001 is incomplete"),
    ):
        checkpointer.load(run.parts)


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_deletes_the_oldest_checkpoints_after_the_marker_moves(tmp_path, async_save):
    uri = tmp_path / "run"
    run = Run(seed=0)
    with Checkpointer(str(uri), keep=2, async_save=async_save) as checkpointer:
        for step in (1, 2, 3, 4):
            run.train(step)
            checkpointer.save(step * 10, run.parts)
    assert folders(uri) == ["step-00000030", "step-00000040"]
    assert marker(uri) | {"time": None} == {
        "step": 40,
        "folder": "step-00000040",
        "time": None,
        "world_size": 1,
    }

    with Checkpointer(str(uri), keep=None, async_save=async_save) as checkpointer:
        checkpointer.save(50, run.parts)
    assert folders(uri) == ["step-00000030", "step-00000040", "step-00000050"]


def test_async_save_writes_the_same_checkpoint_as_sync_and_holds_its_own_copy_once_staged(tmp_path):
    """An async save copies the state beside the caller's next steps; the caller waits for that copy
    (`wait_for_staging`) before it changes the state, as the trainer does before its optimizer step."""
    run = Run(seed=0)
    run.train(1)
    expected = run.snapshot()
    with Checkpointer(str(tmp_path / "sync"), async_save=False) as checkpointer:
        checkpointer.save(1, run.parts)
    with Checkpointer(str(tmp_path / "async"), async_save=True) as checkpointer:
        checkpointer.save(1, run.parts)
        checkpointer.wait_for_staging()
        with torch.no_grad():  # training goes on while the thread writes
            for value in [*run.model.parameters(), *run.ema.values()]:
                value.add_(1.0)

    step_folder = "checkpoints/step-00000001"
    assert sorted(os.listdir(tmp_path / "sync" / step_folder)) == [".metadata", "__0_0.distcp"]
    assert sorted(os.listdir(tmp_path / "async" / step_folder)) == [".metadata", "__0_0.distcp"]
    assert (tmp_path / "sync" / step_folder / "__0_0.distcp").read_bytes() == (
        tmp_path / "async" / step_folder / "__0_0.distcp"
    ).read_bytes()
    for prefix in ("train.model", "ema"):
        saved = read_full_state(str(tmp_path / "async"), prefix)
        assert_same(saved, read_full_state(str(tmp_path / "sync"), prefix))
        assert_same(saved, expected["model" if prefix == "train.model" else "ema"])


class HeldDisk(LocalFileSystem):
    """A local disk whose checkpoint data writes wait for `release`, then take `delay` seconds more: a store
    slower than anything else a save does, by construction rather than by luck."""

    cachable = False  # fsspec would hand every test the same instance

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.delay = 0.0

    def _open(self, path: str, mode: str = "rb", **kwargs: Any):
        if "w" in mode and path.endswith(".distcp"):
            self.release.wait(timeout=20)  # a save that waits here before returning fails the test, not hangs
            time.sleep(self.delay)
        return super()._open(path, mode, **kwargs)


class OnDisk(Storage):
    """Local storage whose file system is `disk` for every URI (the rest of `Storage` as it is: its error
    hints, its deadlines)."""

    def __init__(self, disk: LocalFileSystem):
        super().__init__()
        object.__setattr__(self, "disk", disk)  # Storage is frozen

    def fsspec(self, uri: str) -> tuple[LocalFileSystem, str]:
        return self.disk, uri


def test_an_async_save_blocks_training_less_than_a_sync_save_because_it_does_not_wait_for_the_store(tmp_path):
    disk, run = HeldDisk(), Run(seed=0)
    run.train(1)
    with Checkpointer(str(tmp_path / "async"), OnDisk(disk), async_save=True) as checkpointer:
        async_blocked = checkpointer.save(1, run.parts)  # returns while the data write is held
        assert not (tmp_path / "async/checkpoints/step-00000001/.metadata").exists()
        assert checkpointer.latest_step() is None
        disk.release.set()
    assert marker(tmp_path / "async")["step"] == 1  # closing waited for the write and committed it

    disk.delay = async_blocked + 0.1  # each data write now takes longer than the async save blocked
    with Checkpointer(str(tmp_path / "sync"), OnDisk(disk), async_save=False) as checkpointer:
        sync_blocked = checkpointer.save(1, run.parts)
        assert marker(tmp_path / "sync")["step"] == 1  # returned only once written and committed
    assert sync_blocked > disk.delay > async_blocked


def test_on_commit_hears_of_a_save_once_it_is_complete_and_never_of_one_that_failed(tmp_path):
    disk, run, committed = HeldDisk(), Run(seed=0), []
    checkpointer = Checkpointer(str(tmp_path), OnDisk(disk), async_save=True)
    checkpointer.save(1, run.parts, on_commit=committed.append)
    assert committed == []  # the data is still being written
    disk.release.set()
    checkpointer.wait()
    assert committed == [1]
    (tmp_path / "checkpoints/step-00000002").write_text("a file where the folder goes")
    checkpointer.save(2, run.parts, on_commit=committed.append)
    with pytest.raises(CheckpointError, match="step-00000002 failed"):
        checkpointer.close()
    assert committed == [1]
    with Checkpointer(str(tmp_path / "sync"), async_save=False) as checkpointer:
        checkpointer.save(3, run.parts, on_commit=committed.append)
        assert committed == [1, 3]  # a synchronous save is complete when it returns


def test_read_full_state_takes_a_run_or_one_step_folder_and_names_a_missing_prefix(
    tmp_path, moto_s3, s3_bucket
):
    uri = f"{s3_bucket}/runs/r1"
    run = Run(seed=0)
    with Checkpointer(uri, moto_s3.storage, keep=None, async_save=False) as checkpointer:
        run.train(1)
        checkpointer.save(1, run.parts)
        at_step_1 = run.snapshot()
        run.train(2)
        checkpointer.save(2, run.parts)
    assert_same(read_full_state(uri, "train.model", moto_s3.storage), run.model.state_dict())
    step_1 = read_full_state(f"{uri}/checkpoints/step-00000001", "train.model", moto_s3.storage)
    assert_same(step_1, at_step_1["model"])
    with pytest.raises(CheckpointError, match=r"step-00000002 has no tensors under 'emma'"):
        read_full_state(uri, "emma", moto_s3.storage)
    with pytest.raises(CheckpointError, match=f"no checkpoint at {s3_bucket}/runs/r2"):
        read_full_state(f"{s3_bucket}/runs/r2", "ema", moto_s3.storage)


def test_loading_into_a_different_model_names_the_missing_unexpected_and_reshaped_keys(tmp_path):
    uri = str(tmp_path / "run")
    saved = Run(seed=0)
    with Checkpointer(uri, async_save=False) as checkpointer:
        checkpointer.save(1, {**saved.parts, "seed": {"seed": 7}})
    bigger = Run(seed=0, layers=3)  # a third layer, and the second one is now 6→6 instead of 6→2
    with Checkpointer(uri) as checkpointer, pytest.raises(CheckpointError) as error:
        checkpointer.load(bigger.parts)
    message = str(error.value)
    assert message.startswith(f"{uri}/checkpoints/step-00000001 does not match the parts: ")
    assert "\n" not in message
    assert "missing ['ema.2.bias', 'ema.2.weight', 'train.model.2.bias'] (10 in all)" in message
    assert "unexpected ['seed'] (1 in all)" in message
    assert (
        "reshaped ['ema.1.bias (2,)→(6,)', 'ema.1.weight (2, 6)→(6, 6)', 'train.model.1.bias (2,)→(6,)']"
        in message
    )
    assert bigger.data == {"epoch": 0}  # nothing was loaded


def test_a_uri_that_cannot_be_written_fails_at_start_in_one_line_naming_it(tmp_path, moto_s3):
    (tmp_path / "a-file").write_text("")
    local = f"{tmp_path}/a-file/run"
    with pytest.raises(
        CheckpointError, match=f"^cannot write checkpoints to {re.escape(local)}/checkpoints: "
    ) as e:
        Checkpointer(local)
    assert "\n" not in str(e.value)
    bucketless = "s3://no-such-bucket/r"
    with pytest.raises(
        CheckpointError, match=f"^cannot write checkpoints to {re.escape(bucketless)}/checkpoints: "
    ):
        Checkpointer(bucketless, moto_s3.storage)


def test_a_failed_async_save_surfaces_at_the_next_call_and_leaves_the_marker(tmp_path):
    uri = tmp_path / "run"
    run = Run(seed=0)
    checkpointer = Checkpointer(str(uri), async_save=True)
    checkpointer.save(1, run.parts)
    checkpointer.wait()
    (uri / "checkpoints/step-00000002").write_text("a file where the folder goes")
    checkpointer.save(2, run.parts)
    with pytest.raises(CheckpointError, match=r"saving .*step-00000002 failed: rank 0: FileExistsError") as e:
        checkpointer.close()
    assert "\n" not in str(e.value)
    assert marker(uri)["step"] == 1


def test_saving_the_same_step_again_is_a_no_op_and_an_earlier_step_is_an_error(tmp_path):
    uri = tmp_path / "run"
    run = Run(seed=0)
    with Checkpointer(str(uri), async_save=False) as checkpointer:
        checkpointer.save(5, run.parts)
        written = (uri / "checkpoints/latest").read_text()
        checkpointer.save(5, run.parts)
        assert (uri / "checkpoints/latest").read_text() == written
        with pytest.raises(CheckpointError, match="step 4 is before the last checkpoint step 5"):
            checkpointer.save(4, run.parts)


def test_bad_settings_and_part_names_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint.keep=0 must be ≥ 1"):
        Checkpointer(str(tmp_path), keep=0)
    with Checkpointer(str(tmp_path)) as checkpointer, pytest.raises(ValueError, match=r"part name 'a\.b'"):
        checkpointer.save(1, {"a.b": {}})


# Real processes: FSDP2 on gloo, saved on 2 ranks to S3, resumed on 1 and 3.


def run_ranks(world: int, *args: str, env: dict[str, str]) -> None:
    environment = os.environ | env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(world), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def saved_on_two_ranks(moto_s3, tmp_path_factory) -> dict[str, Any]:
    run_uri = f"s3://{moto_s3.new_bucket()}/runs/r1"
    out = tmp_path_factory.mktemp("two-ranks") / "saved.pt"
    run_ranks(2, "save", run_uri, str(out), env=moto_s3.env)
    return {"uri": run_uri, "state": torch.load(out, weights_only=False)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 3])
def test_fsdp_state_saved_on_two_ranks_resumes_on_another_world_size(
    world, saved_on_two_ranks, moto_s3, tmp_path
):
    out = tmp_path / "loaded.pt"
    run_ranks(world, "load", saved_on_two_ranks["uri"], str(out), env=moto_s3.env)
    loaded, saved = torch.load(out, weights_only=False), saved_on_two_ranks["state"]
    assert loaded["step"] == 3
    assert_same(loaded, saved)  # model, AdamW state, EMA, loader state, seed
    assert loaded["data"] == {"epoch": 1, "consumed": {"bucket-16x24": 24}}


@pytest.mark.slow
def test_fsdp_checkpoint_consolidates_without_a_process_group(saved_on_two_ranks, moto_s3):
    uri, saved = saved_on_two_ranks["uri"], saved_on_two_ranks["state"]
    assert_same(read_full_state(uri, "train.model", moto_s3.storage), saved["model"])
    assert_same(read_full_state(uri, "ema", moto_s3.storage), saved["ema"])
    fs, path = moto_s3.storage.fsspec(f"{uri}/checkpoints")
    assert sorted(name.rsplit("/", 1)[-1] for name in fs.ls(path)) == [
        "latest",
        "step-00000002",
        "step-00000003",
    ]
    assert json.loads(fs.cat_file(f"{path}/latest"))["world_size"] == 2
    assert sorted(name.rsplit("/", 1)[-1] for name in fs.ls(f"{path}/step-00000003")) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_into_a_plain_model_without_a_process_group(saved_on_two_ranks, moto_s3):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))  # the worker's
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ema = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    data, seed = {}, {}
    parts = {"train": ModelOptimizerState(model, optimizer), "ema": ema, "data": data, "seed": seed}
    with Checkpointer(saved_on_two_ranks["uri"], moto_s3.storage) as checkpointer:
        assert checkpointer.load(parts) == 3
    model_state, optim_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True)
    )
    saved = saved_on_two_ranks["state"]
    assert_same(
        {"model": model_state, "optim": optim_state, "ema": ema},
        {k: saved[k] for k in ("model", "optim", "ema")},
    )
    assert (data, seed) == (saved["data"], saved["seed"])


@pytest.mark.slow
def test_a_path_that_ranks_do_not_share_fails_on_every_rank_instead_of_hanging(tmp_path):
    run_ranks(2, "unshared", str(tmp_path / "node-local"), str(tmp_path / "error"), env={})
    for rank in (0, 1):
        error = (tmp_path / f"error.rank{rank}").read_text()
        assert error == f"rank 1 does not see rank 0's files in {tmp_path}/node-local/rank1/checkpoints"
