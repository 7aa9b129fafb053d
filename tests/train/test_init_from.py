"""`stage.init_from` on a sharded model: each rank reads its share of the source, and the weights are the
ones a full read gives (the source read whole in one process, adapted and loaded: what every rank did
before), bit for bit."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svd.model.transfer import adapt_state_dict
from svd.model.video_unet import VideoUNet
from svd.model.weights import save_diffusers_unet
from svd.train.checkpoint import checkpoint_folder, saved_tensors
from svd.train.weights import INPUT_CONVS, RUN_PARTS, initial_weights

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("init_from_worker.py")
worker = runpy.run_path(str(WORKER))


def run_ranks(*args: str, env: dict[str, str]) -> None:
    environment = os.environ | env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(WORKER), *args], env=environment, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]


def full_read(source: str, storage, cache: Path) -> tuple[dict[str, torch.Tensor], object]:
    """The target model's weights and report when the whole source is read in one process."""
    model = worker["target_model"]()
    adapted, report = adapt_state_dict(
        model, initial_weights(source, storage, str(cache)), input_convs=INPUT_CONVS
    )
    model.load_state_dict(adapted, strict=False)
    return model.state_dict(), report


def assert_same_weights(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(loaded[name], expected[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def source_run(moto_s3) -> str:
    """A text-to-video run saved on 2 ranks: model, AdamW state and an EMA that differs from the model."""
    uri = f"s3://{moto_s3.new_bucket()}/runs/t2v"
    run_ranks("save", uri, env=moto_s3.env)
    return uri


@pytest.mark.slow
def test_each_rank_reads_only_its_shards_of_a_run_and_loads_what_a_full_read_gives(
    source_run, moto_s3, tmp_path
):
    out = tmp_path / "loaded.pt"
    run_ranks("load", source_run, str(out), env=moto_s3.env)
    loaded = torch.load(out, weights_only=False)

    expected, report = full_read(source_run, moto_s3.storage, tmp_path)
    assert_same_weights(loaded["weights"], expected)
    assert loaded["report"] == report
    assert [name for name, _, _ in report.reshaped] == ["network.conv_in.weight"]  # 4 → 9 input channels
    assert report.added == ("missing_frame",)

    saved = saved_tensors(checkpoint_folder(source_run, moto_s3.storage), moto_s3.storage)
    whole = sum(
        entry.size.numel() * entry.properties.dtype.itemsize
        for key, entry in saved.items()
        if key.startswith(RUN_PARTS)
    )  # the model and EMA tensors: what every rank read before, at least
    shares = [b / whole for b in loaded["bytes_read"]]
    print(f"bytes read per rank / model and EMA ({whole} bytes): {shares}")
    assert all(0.3 < share <= 0.6 for share in shares), f"bytes read per rank / model and EMA: {shares}"


@pytest.mark.slow
def test_rank_0_alone_reads_a_diffusers_folder_and_every_rank_loads_what_a_full_read_gives(
    source_run, moto_s3, tmp_path
):
    unet = VideoUNet(worker["source_model"]().network.cfg)
    weights = initial_weights(source_run, moto_s3.storage, str(tmp_path))
    unet.load_state_dict({k.removeprefix("network."): v for k, v in weights.items()})
    save_diffusers_unet(unet, tmp_path / "unet")
    folder = f"s3://{moto_s3.new_bucket()}/unet"
    fs, path = moto_s3.storage.fsspec(folder)
    fs.put(str(tmp_path / "unet"), path, recursive=True)
    size = sum(fs.size(f) for f in fs.find(path))

    out = tmp_path / "loaded.pt"
    run_ranks("load", folder, str(out), env=moto_s3.env)  # each rank with its own cache, as on two nodes
    loaded = torch.load(out, weights_only=False)

    expected, report = full_read(folder, moto_s3.storage, tmp_path / "cache")
    assert_same_weights(loaded["weights"], expected)
    assert loaded["report"] == report
    assert loaded["bytes_read"][1] == 0
    assert size <= loaded["bytes_read"][0] <= 1.05 * size
