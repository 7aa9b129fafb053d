"""The trainer end to end on CPU: the tiny model, the clip table on a real S3 server, real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from svd.config import compose
from svd.launch.local import launch_local
from svd.train import run
from svd.train.checkpoint import read_full_state
from svd.train.ema import EMA
from svd.train.stop import StopRequest
from svd.train.trainer import Trainer, TrainResult

from ..processes import launched_ranks

ROOT = Path(__file__).resolve().parents[2]


def settings(train_table: dict, run: str, *extra: str) -> list[str]:
    return [
        "stage=video_pretrain",
        "model=tiny",
        f"data.table={train_table['table']}",
        f"checkpoint.run_dir={train_table['bucket']}/runs/{run}",
        "data.frames=4",
        "data.fps=4",
        "train.log_every=1",
        "checkpoint.every=2",
        *extra,
    ]


def train(train_table: dict, run: str, *extra: str) -> TrainResult:
    return launch_local(compose(settings(train_table, run, *extra)))


def test_loss_falls_when_overfitting_a_handful_of_clips(train_table, s3_env):
    result = train(
        train_table,
        "overfit",
        "data.filter=clip_id IN ('video_0000_000', 'video_0001_000')",
        "train.steps=40",
        "train.lr=2e-3",
        "train.global_batch=2",
        "diffusion.p_mean=0.5",
        "diffusion.cond_dropout=0",
        "checkpoint.every=40",
    )
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)


@pytest.mark.slow
def test_two_fsdp_processes_give_the_losses_of_one_process_with_the_same_global_batch(train_table, s3_env):
    one = train(train_table, "dp1", "train.steps=3", "gpus_per_node=1")
    two = train(train_table, "dp2", "train.steps=3", "gpus_per_node=2")
    assert two.steps == one.steps == 3
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    assert one.losses[0] != one.losses[1]  # different samples and noise each step


@pytest.mark.slow
def test_resume_continues_exactly_and_on_other_world_sizes_no_sample_is_lost_or_repeated(train_table, s3_env):
    common = ("train.global_batch=6", "checkpoint.every=2")
    reference = train(train_table, "uninterrupted", *common, "train.steps=6")
    first = train(train_table, "resumed", *common, "train.steps=2", "gpus_per_node=2")
    second = train(train_table, "resumed", *common, "train.steps=4", "gpus_per_node=1")
    third = train(train_table, "resumed", *common, "train.steps=6", "gpus_per_node=3")
    assert (second.resumed_from, third.resumed_from) == (2, 4)
    resumed = first.losses + second.losses + third.losses
    # every sample's noise is seeded by its stream position: equal losses mean the same samples, in order
    assert resumed == pytest.approx(reference.losses, rel=1e-5, abs=1e-6)
    ema_a = read_full_state(f"{train_table['bucket']}/runs/uninterrupted", "ema.weights")
    ema_b = read_full_state(f"{train_table['bucket']}/runs/resumed", "ema.weights")
    assert ema_a.keys() == ema_b.keys()
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) < 1e-5


def test_resume_in_the_same_world_size_is_exact(train_table, s3_env):
    common = ("train.global_batch=2", "checkpoint.every=2")
    reference = train(train_table, "exact_ref", *common, "train.steps=4")
    first = train(train_table, "exact", *common, "train.steps=2")
    second = train(train_table, "exact", *common, "train.steps=4")
    assert second.resumed_from == 2
    assert first.losses + second.losses == pytest.approx(reference.losses, rel=1e-6, abs=1e-7)
    a = read_full_state(f"{train_table['bucket']}/runs/exact_ref", "model.model")
    b = read_full_state(f"{train_table['bucket']}/runs/exact", "model.model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_request_saves_the_current_step_and_the_next_run_resumes_exactly_from_it(train_table, s3_env):
    common = ("train.global_batch=2", "checkpoint.every=100")
    reference = train(train_table, "stop_ref", *common, "train.steps=3")
    stop = StopRequest()
    with stop.on_signals([signal.SIGUSR1]):
        os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm's warning before a time limit: the run has not begun
    assert stop.is_set()
    assert stop.signal == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    stopped = run(compose(settings(train_table, "stop", *common, "train.steps=3")), stop)
    assert (stopped.stopped, stopped.steps) == (True, 1)  # the step under way finishes, then a checkpoint
    resumed = train(train_table, "stop", *common, "train.steps=3")
    assert (resumed.resumed_from, resumed.stopped) == (1, False)
    assert stopped.losses + resumed.losses == pytest.approx(reference.losses, rel=1e-6, abs=1e-7)


def test_a_run_writes_previews_validation_and_its_config(train_table, s3_env, moto_s3):
    result = train(
        train_table,
        "artefacts",
        "train.steps=2",
        "train.global_batch=2",
        "train.val_every=2",
        "train.preview_every=2",
    )
    fs, path = moto_s3.storage.fsspec(f"{train_table['bucket']}/runs/artefacts")
    names = {p.removeprefix(path + "/") for p in fs.find(path)}
    assert {
        "config.yaml",
        "validation.jsonl",
        "previews/step-00000002.mp4",
        "previews/step-00000002.gif",
    } <= names
    assert {"checkpoints/latest", "checkpoints/step-00000002/.metadata"} <= names
    losses = result.validation[0]
    assert set(losses) == {"sigma_0.05", "sigma_0.3", "sigma_1", "sigma_3", "sigma_10", "mean"}
    assert losses["mean"] == pytest.approx(sum(v for k, v in losses.items() if k != "mean") / 5)
    written = fs.cat_file(f"{path}/validation.jsonl").decode().splitlines()
    assert [json.loads(line) for line in written] == [{"step": 2, **losses}]


def test_validation_reads_the_held_out_set_once_and_measures_the_same_samples_every_time(
    train_table, s3_env, monkeypatch
):
    """Later validations reuse the first one's encoded batches. With the EMA frozen at the initial weights,
    every validation measures the same weights, so the losses agree; a read of other samples or other noise
    would move them by percents."""
    built = []
    build = Trainer._build_loader

    def counted(self, state, *, validation=False):
        built.append(validation)
        return build(self, state, validation=validation)

    monkeypatch.setattr(Trainer, "_build_loader", counted)
    monkeypatch.setattr(EMA, "update", lambda self, model: None)
    result = train(
        train_table,
        "validation-once",
        "train.steps=3",
        "train.global_batch=2",
        "train.val_every=1",
    )
    assert built.count(True) == 1
    means = [losses["mean"] for losses in result.validation]
    assert len(means) == 3
    assert means == pytest.approx([means[0]] * 3, rel=1e-6)


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_cleanly_and_a_restart_resumes_from_the_last_checkpoint(
    train_table, s3_env, moto_s3
):
    args = settings(
        train_table, "killed", "gpus_per_node=2", "train.steps=200", "parallel.collective_timeout_s=30"
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "launch.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the ranks too are ended below, whatever happens
    )
    fs, marker = moto_s3.storage.fsspec(f"{train_table['bucket']}/runs/killed/checkpoints/latest")
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(marker):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        ranks = launched_ranks(process.pid, 2)
        os.kill(ranks[-1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)  # the other rank is stopped, not left hanging
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 1
    # one line names the killed rank, not torch's ChildFailedError banner under its agent's log lines
    lines = stderr.strip().splitlines()
    assert re.fullmatch(
        r"launch: training failed: rank [01]( \(and 1 more\))?: killed by SIGKILL \(each rank's error: \S+\)",
        lines[-1],
    ), stderr
    assert not [line for line in lines if "torch/distributed/elastic" in line or "Traceback" in line], stderr
    saved = json.loads(fs.cat_file(marker))["step"]
    resumed = train(train_table, "killed", "gpus_per_node=2", f"train.steps={saved + 2}")
    assert resumed.resumed_from == saved >= 2
    assert resumed.steps == saved + 2
    assert len(resumed.losses) == 2


@pytest.mark.slow
def test_validation_and_previews_leave_training_bit_for_bit_unchanged_on_two_fsdp_ranks(train_table, s3_env):
    """The EMA swap reaches the parameters FSDP2 keeps gathered at the root after a forward: the steps after
    a validation or a preview train the trained weights, not the average."""
    common = ("gpus_per_node=2", "train.steps=8", "train.global_batch=2", "checkpoint.every=8")
    # the one run here without validation and previews: the reference they must not change
    plain = train(train_table, "plain", *common, "train.val_every=0", "train.preview_every=0")
    watched = train(train_table, "watched", *common, "train.val_every=2", "train.preview_every=3")
    assert len(watched.validation) == 4
    assert watched.losses == plain.losses  # exact: the same samples, noise and weights at every step
