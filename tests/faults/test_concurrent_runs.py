"""Runs that overlap: curation on a real object store (radosgw: moto's conditional writes are weaker for
Lance's commits), training runs into one run directory (the clip table's moto; the lease needs only
`If-None-Match`, which moto honours; tests/train/test_lease.py races it on radosgw too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import lance
import pytest

from svd.config import from_yaml
from svd.curate.ledger import log_uri
from svd.train.lease import RUN_OWNER

from ..settings import production_settings
from .conftest import ROOT, curate_argv, curate_env, video

COMMIT_AT = """
import sys, time
import pyarrow as pa
from svd.data.storage import Storage
from svd.data.table import merge_commit, to_arrow
start, uri, who = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [dict(clip_id=f"{who}-{i}", video_uri=f"/v{who}", start_s=0.0, end_s=1.0, fps=24.0, width=64,
             height=48, num_frames=24) for i in range(5)]
time.sleep(max(0.0, start - time.time()))
merge_commit(uri, to_arrow(rows), Storage.from_env(), "clip_id")
"""


def at_once(argvs: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen(a, env=env, **pipes) for a in argvs]
    results = []
    for p, argv in zip(processes, argvs, strict=True):
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_runs_of_one_shard_at_once_commit_every_clip_once(radosgw):
    bucket = f"s3://{radosgw.new_bucket()}"
    fs, _ = radosgw.storage.fsspec(bucket)
    for v in range(4):
        fs.pipe_file(f"{bucket[5:]}/raw/v{v}.mp4", video(v))
    output = f"{bucket}/clips.lance"
    argv = curate_argv(f"input={bucket}/raw/", f"output={output}", "commit_every=1")
    for done in at_once([argv, argv], curate_env(radosgw.env)):
        assert done.returncode == 0, done.stderr[-2000:]
    options = radosgw.storage.lance_options(output)
    table = lance.dataset(output, storage_options=options)
    clip_ids = table.to_table(columns=["clip_id"]).column("clip_id").to_pylist()
    assert len(clip_ids) == len(set(clip_ids)) == 4
    log = lance.dataset(log_uri(output), storage_options=radosgw.storage.lance_options(log_uri(output)))
    assert Counter(log.to_table(columns=["video_uri"]).column("video_uri").to_pylist()) == Counter(
        {f"{bucket}/raw/v{v}.mp4": 1 for v in range(4)}
    )
    assert len(table.tags.list()) == 2  # one per run, distinct although started in the same second


@pytest.mark.slow
def test_runs_that_race_to_create_the_table_lose_no_rows(radosgw):
    """Lance turns a losing `create` into an overwrite; the first commit of each run must not."""
    uri = f"s3://{radosgw.new_bucket()}/clips.lance"
    start = time.time() + 3  # after every interpreter has started
    argvs = [[sys.executable, "-c", COMMIT_AT, str(start), uri, str(who)] for who in range(3)]
    for done in at_once(argvs, curate_env(radosgw.env) | {"PYTHONPATH": str(ROOT)}):
        assert done.returncode == 0, done.stderr[-2000:]
    table = lance.dataset(uri, storage_options=radosgw.storage.lance_options(uri))
    assert sorted(table.to_table(columns=["clip_id"]).column("clip_id").to_pylist()) == sorted(
        f"{who}-{i}" for who in range(3) for i in range(5)
    )


# One rank as the Slurm launcher starts it (svd.launch.slurm.train_rank): the job names the run's owner.
RANK = """
import sys
from svd.config import compose
from svd.train import run
result = run(compose(sys.argv[1:]))
print(f"rank 0 ended at step {result.steps}", flush=True)
"""


def training(train_table: dict, run: str, *extra: str) -> list[str]:
    """The production settings of a tiny run (`production_settings`) with a checkpoint every 2 steps."""
    run_dir = f"{train_table['bucket']}/runs/{run}"
    return production_settings(
        train_table["table"], run_dir, "train.global_batch=2", "checkpoint.every=2", *extra
    )


def launch_argv(settings: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "launch.py"), *settings]


@pytest.mark.slow
def test_two_training_runs_started_at_once_into_one_run_directory_one_trains_and_the_other_refuses(
    train_table, s3_env, moto_s3, tmp_path
):
    """The winner trains long enough that the other run meets it whatever the machine's load; it is killed
    once the other has given up and it has checkpointed."""
    run_dir = f"{train_table['bucket']}/runs/twice"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    logs = {seed: (tmp_path / f"seed{seed}.out", tmp_path / f"seed{seed}.err") for seed in (1, 2)}
    runs = {
        seed: subprocess.Popen(
            launch_argv(
                training(train_table, "twice", "gpus_per_node=2", "train.steps=500", f"train.seed={seed}")
            ),
            env=env,
            start_new_session=True,  # its own process group: the elastic agent, its ranks, their workers
            stdout=logs[seed][0].open("w"),
            stderr=logs[seed][1].open("w"),
        )
        for seed in (1, 2)
    }
    fs, path = moto_s3.storage.fsspec(run_dir)
    try:
        deadline = time.monotonic() + 600
        while all(p.poll() is None for p in runs.values()):
            assert time.monotonic() < deadline, "neither run stopped within 600 s"
            time.sleep(0.5)
        lost = next(seed for seed, p in runs.items() if p.poll() is not None)
        seed = 3 - lost
        assert runs[seed].poll() is None, "both runs ended"  # the other one trains on
        assert runs[lost].returncode != 0
        out, err = (f.read_text() for f in logs[lost])
        in_use = f"checkpoint.run_dir={run_dir} is in use by"
        refusals = [line for line in err.splitlines() if in_use in line]
        assert refusals, err[-3000:]
        assert "is in use by local-" in refusals[0]
        assert f"(host {os.uname().nodename}, pid " in refusals[0]
        assert "expires at" in refusals[0]
        assert "step 1/" not in out  # refused before training, on both of its ranks

        while not fs.exists(f"{path}/validation.jsonl"):  # the winner's first checkpoint and validation
            assert runs[seed].poll() is None, logs[seed][1].read_text()[-3000:]
            assert time.monotonic() < deadline, "no validation within 600 s"
            time.sleep(0.5)
    finally:
        for p in runs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    cfg = from_yaml(fs.cat_file(f"{path}/config.yaml").decode())
    assert cfg.train.seed == seed
    steps = [
        json.loads(line)["step"] for line in fs.cat_file(f"{path}/validation.jsonl").decode().splitlines()
    ]
    every = cfg.train.val_every
    assert steps == list(range(every, every * len(steps) + 1, every))  # one run's, each step once


@pytest.mark.slow
def test_a_restarted_job_takes_its_run_directory_back_from_its_hung_predecessor_and_others_are_refused(
    train_table, s3_env, moto_s3, tmp_path
):
    job = os.environ | {"PYTHONPATH": str(ROOT), RUN_OWNER: "slurm-77"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    log = (tmp_path / "hung.log").open("w")
    hung = subprocess.Popen(
        [sys.executable, "-c", RANK, *training(train_table, "requeued", "train.steps=200")],
        env=job,
        start_new_session=True,  # its own process group, with its loader workers
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    fs, marker = moto_s3.storage.fsspec(f"{train_table['bucket']}/runs/requeued/checkpoints/latest")
    try:
        deadline = time.monotonic() + 300
        while not fs.exists(marker):
            assert hung.poll() is None, (tmp_path / "hung.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        os.killpg(
            hung.pid, signal.SIGSTOP
        )  # a job step that hangs: alive, holding the lease, renewing no more
        saved = json.loads(fs.cat_file(marker))["step"]

        other = subprocess.run(
            launch_argv(training(train_table, "requeued", f"train.steps={saved + 2}")), timeout=300, **pipes
        )
        assert other.returncode != 0
        assert f"is in use by slurm-77 (host {os.uname().nodename}, pid {hung.pid}, since " in other.stderr

        requeued = subprocess.run(
            [sys.executable, "-c", RANK, *training(train_table, "requeued", f"train.steps={saved + 2}")],
            env=job,
            timeout=300,
            **pipes,
        )
        assert requeued.returncode == 0, requeued.stderr[-3000:]
        assert "taken back from an earlier run of the same job, slurm-77" in requeued.stdout
        assert f"resumed from step {saved} of " in requeued.stdout
        assert f"rank 0 ended at step {saved + 2}" in requeued.stdout

        os.killpg(hung.pid, signal.SIGCONT)  # the hung step wakes up: it stops at its next write
        assert hung.wait(timeout=120) != 0
        lost = f"checkpoint.run_dir={train_table['bucket']}/runs/requeued was taken by slurm-77 (host "
        assert lost in (tmp_path / "hung.log").read_text()
        assert json.loads(fs.cat_file(marker))["step"] == saved + 2  # the requeued run's last checkpoint
    finally:
        os.killpg(hung.pid, signal.SIGKILL)
        hung.wait()
        log.close()
