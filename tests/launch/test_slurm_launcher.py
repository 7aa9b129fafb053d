"""`launcher=slurm` on a real two-node Slurm: training across both nodes, a checkpoint and a requeue when the
scheduler warns, a resume after an external requeue, the plain sbatch script, curation as a job array."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import submitit

from svd.config import compose
from svd.curate.config import CurateConfig
from svd.data.local_s3 import free_port
from svd.launch.local import launch_local
from svd.launch.slurm import curate_shards, node_metrics, rendezvous_env
from svd.train.checkpoint import Checkpointer
from svd.train.file_sd import TARGETS_DIR_ENV
from svd.train.metrics import ENV_DIR, serve_node_metrics

ROOT = Path(__file__).resolve().parents[2]


def run_args(table: dict, tmp_path: Path, *extra: str) -> list[str]:
    """A tiny run of 2 ranks, one per node, sharded HSDP (replicated across the nodes)."""
    return [
        "stage=video_pretrain",
        "model=tiny",
        "launcher=slurm",
        "cluster=local_slurm",
        "nodes=2",
        "gpus_per_node=1",
        "parallel.sharding=hsdp",
        f"data.table={table['table']}",
        "data.frames=4",
        "data.fps=4",
        "train.global_batch=2",
        "train.log_every=1",
        f"checkpoint.run_dir={tmp_path / 'run'}",
        f"launcher.folder={tmp_path / 'submitit'}",
        # not the port derived from the job id: job ids restart at 1 in every test session's cluster
        f"launcher.master_port={free_port()}",
        *extra,
    ]


def command(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def submitted_job(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("slurm job "))
    return line.split()[2].rstrip(":")


def wait_for_line(path: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout_s} s"
        time.sleep(0.2)


def results(tmp_path: Path, job_id: str) -> list:
    return submitit.SlurmJob(tmp_path / "submitit", job_id, tasks=(0, 1)).results()


@pytest.mark.slow
def test_a_two_node_job_trains_with_hsdp_to_the_losses_of_one_process_and_writes_a_checkpoint(
    slurm_cluster, train_table, job_env, tmp_path
):
    done = command(
        "launch.py", *run_args(train_table, tmp_path, "train.steps=3", "launcher.wait=true"), cwd=tmp_path
    )

    assert done.returncode == 0, done.stderr
    job_id = submitted_job(done.stdout)
    assert f"done: 3 steps in {tmp_path / 'run'}" in done.stdout
    rank0, rank1 = results(tmp_path, job_id)
    assert (rank0.steps, rank0.resumed_from, rank0.stopped) == (3, None, False)
    assert rank1.losses == rank0.losses  # the all-reduced global loss
    one = launch_local(
        compose(
            [
                *run_args(train_table, tmp_path / "one", "train.steps=3"),
                "launcher=local",
                "nodes=1",
                "parallel.sharding=none",
            ]
        )
    )
    assert rank0.losses == pytest.approx(one.losses, rel=1e-5)
    assert Checkpointer(str(tmp_path / "run")).latest_step() == 3
    assert slurm_cluster.wait_until_finished(job_id) == "COMPLETED"


@pytest.mark.slow
def test_the_preemption_signal_checkpoints_the_current_step_and_the_requeued_job_resumes_from_it(
    slurm_cluster, train_table, job_env, tmp_path
):
    # No periodic checkpoint before the end: the one the requeued job resumes from is the signal's.
    args = run_args(train_table, tmp_path, "train.steps=12", "checkpoint.every=1000")
    submitted = command("launch.py", *args, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted_job(submitted.stdout)
    wait_for_line(tmp_path / "submitit" / f"{job_id}_0_log.out", "step 1/12")  # training: the stop is armed

    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    assert slurm_cluster.wait_until_finished(job_id, timeout_s=180) == "COMPLETED"
    final = results(tmp_path, job_id)[0]
    assert final.resumed_from in range(2, 12)
    assert (final.steps, len(final.losses)) == (12, 12 - final.resumed_from)
    log = (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()
    assert f"step {final.resumed_from}/12" in log  # the step under way when the signal came, then saved
    assert log.count("Requeued job") == 1


@pytest.mark.slow
def test_an_external_requeue_saves_the_step_under_way_and_the_requeued_job_resumes_from_it(
    slurm_cluster, train_table, job_env, tmp_path
):
    # no periodic checkpoint: the one the requeued job resumes from is saved on Slurm's SIGTERM
    args = run_args(train_table, tmp_path, "train.steps=12", "checkpoint.every=1000")
    submitted = command("launch.py", *args, cwd=tmp_path)
    job_id = submitted_job(submitted.stdout)
    log_file = tmp_path / "submitit" / f"{job_id}_0_log.out"
    wait_for_line(log_file, "step 3/12")

    subprocess.run(["scontrol", "requeue", job_id], check=True)

    assert slurm_cluster.wait_until_finished(job_id, timeout_s=180) == "COMPLETED"
    final = results(tmp_path, job_id)[0]
    assert 3 <= final.resumed_from < 12
    assert (final.steps, len(final.losses)) == (12, 12 - final.resumed_from)
    log = log_file.read_text()
    assert log.count(f"step {final.resumed_from}/12") == 1  # the step under way was saved, not trained again
    assert log.count("step 12/12") == 1


@pytest.mark.slow
def test_a_run_that_crashes_is_requeued_max_requeues_times_then_given_up_with_its_error(
    slurm_cluster, train_table, job_env, tmp_path
):
    no_weights = tmp_path / "no_weights"  # exists, so the run is submitted; holds no checkpoint, so it fails
    no_weights.mkdir()
    args = run_args(train_table, tmp_path, "train.steps=2", f"stage.init_from={no_weights}")
    done = command("launch.py", *args, "launcher.max_requeues=1", "launcher.wait=true", cwd=tmp_path)

    assert done.returncode == 1
    job_id = submitted_job(done.stdout)
    assert done.stderr.strip().splitlines()[-1] == (
        f"launch: slurm job {job_id} failed: CrashedTooOftenError: gave up after 1 requeues "
        f"(launcher.max_requeues=1): CheckpointError: no checkpoint at {no_weights}: neither DCP's .metadata "
        "nor checkpoints/latest"
    )
    log = (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()
    assert log.count("requeue 1 of 1") == 1
    assert slurm_cluster.wait_until_finished(job_id) == "FAILED"


@pytest.mark.slow
def test_the_plain_sbatch_script_trains_and_requeues_itself_on_the_preemption_signal(
    slurm_cluster, train_table, job_env, tmp_path, monkeypatch
):
    args = run_args(train_table, tmp_path, "train.steps=12", "checkpoint.every=1000")
    written = command("launch.py", *args, "--cfg", cwd=tmp_path)
    (tmp_path / "run.yaml").write_text(written.stdout)
    monkeypatch.setenv("SVD_PYTHON", sys.executable)
    out = tmp_path / "slurm.out"
    job_id = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--time=10",
            f"--output={out}",
            str(ROOT / "jobs" / "slurm" / "train.sbatch"),
            str(tmp_path / "run.yaml"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_for_line(out, "step 1/12")

    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    assert slurm_cluster.wait_until_finished(job_id, timeout_s=180) == "COMPLETED", out.read_text()
    log = out.read_text()  # both runs: the script appends
    assert "svd: rank 0 leaves for the requeue" in log
    # every step trained once: the requeued run went on from the step the signal saved
    assert [line.split()[1] for line in log.splitlines() if line.startswith("step ")] == [
        f"{step}/12" for step in range(1, 13)
    ]
    assert f"done: 12 steps in {tmp_path / 'run'}" in log
    assert Checkpointer(str(tmp_path / "run")).latest_step() == 12


@pytest.mark.slow
def test_a_job_array_curates_two_shards_into_one_table(slurm_cluster, moto_s3, job_env, tmp_path):
    from svd.curate.pipeline import list_inputs, shard_of
    from svd.data.synthetic import moving_square
    from svd.data.table import open_dataset
    from svd.data.video_io import encode_mp4

    bucket = f"s3://{moto_s3.new_bucket()}"
    # Shards are a hash of the URI (the bucket's name is random): the first video name of each shard, so
    # that both tasks have work.
    names = (f"{bucket}/raw/v{i}.mp4" for i in itertools.count())
    first_of_shard = {}
    while len(first_of_shard) < 2:
        uri = next(names)
        first_of_shard.setdefault(shard_of(uri, 2), uri)
    for shard, uri in first_of_shard.items():  # 3 s each: one clip per video
        fs, path = moto_s3.storage.fsspec(uri)
        fs.pipe_file(path, encode_mp4(moving_square(72, 36, 64, velocity=(0.0, 1.0 + shard)), 24))
    inputs = list_inputs(f"{bucket}/raw/", moto_s3.storage)
    assert inputs == sorted(first_of_shard.values())

    done = command(
        "curate.py",
        f"input={bucket}/raw/",
        f"output={bucket}/clips.lance",
        "launcher=slurm",
        "shards=2",
        "cluster=local_slurm",
        "workers=0",
        f"folder={tmp_path / 'submitit'}",
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert sorted(line.split(":")[0] for line in done.stdout.splitlines() if line.startswith("shard ")) == [
        "shard 0/2",
        "shard 1/2",
    ]
    rows = open_dataset(f"{bucket}/clips.lance", moto_s3.storage).to_table(columns=["video_uri"]).to_pylist()
    assert sorted(r["video_uri"] for r in rows) == inputs


def test_a_dry_run_shows_the_sbatch_script_of_a_32_node_job_without_a_cluster(tmp_path):
    done = command(
        "launch.py",
        "launcher=slurm",
        "nodes=32",
        "gpus_per_node=8",
        "data.table=s3://bucket/lvd/clips.lance",
        "cluster.partition=h100",
        "cluster.account=video",
        "cluster.sbatch_extra.mail-user=me@example.com",
        "cluster.setup=[module load cuda]",
        f"launcher.folder={tmp_path}",
        "--dry-run",
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    header = [line for line in done.stdout.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --account=video",
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --error={tmp_path}/%j_0_log.err",
        "#SBATCH --exclusive",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --job-name=video_pretrain",
        "#SBATCH --mail-user=me@example.com",
        "#SBATCH --mem=0",
        "#SBATCH --nodes=32",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={tmp_path}/%j_0_log.out",
        "#SBATCH --partition=h100",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=4320",
        "#SBATCH --wckey=submitit",
    ]
    assert "module load cuda" in done.stdout.splitlines()
    assert done.stdout.strip().splitlines()[-1].startswith("srun --unbuffered")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "cluster.signal_delay_s=900",
            "cluster.signal_delay_s=900 must be ≥ 0 and shorter than cluster.time_min=10 minutes",
        ),
        (
            "cluster.sbatch_extra.nodes=3",
            "cluster.sbatch_extra.nodes: set by the launcher; use the run's settings",
        ),
    ],
)
def test_bad_cluster_settings_are_refused_in_one_line(setting, message, tmp_path):
    args = ["launcher=slurm", "cluster=local_slurm", "data.table=s3://b/t.lance", setting, "--dry-run"]
    done = command("launch.py", *args, cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"launch: {message}"]


def test_curation_on_an_unknown_cluster_is_refused_before_anything_is_submitted(tmp_path, capsys):
    cfg = CurateConfig(
        input="s3://b/raw/", output="s3://b/clips.lance", launcher="slurm", shards=2, cluster="nope"
    )

    assert curate_shards(cfg) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"curate: cluster='nope': no {ROOT / 'jobs' / 'conf' / 'cluster' / 'nope.yaml'}"
    ]


def test_a_partition_sbatch_refuses_is_reported_in_one_line(slurm_cluster, train_table, job_env, tmp_path):
    done = command("launch.py", *run_args(train_table, tmp_path, "cluster.partition=nope"), cwd=tmp_path)

    assert done.returncode == 2
    # sbatch's own lines (echoed by submitit as they came), then one line of the launcher's
    assert done.stderr.strip().splitlines()[-1] == (
        "launch: sbatch refused the job: sbatch: error: invalid partition specified: nope"
    )


def test_the_rendezvous_is_the_first_task_of_the_first_node_on_a_port_of_the_job(slurm_cluster):
    slurm = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "123456",
    }

    assert rendezvous_env(slurm) == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(15000 + 123456 % 5000),
    }
    assert rendezvous_env(slurm, master_port=29500)["MASTER_PORT"] == "29500"


def test_each_node_announces_the_port_its_endpoint_serves_to_prometheus_while_the_run_lasts(
    tmp_path, monkeypatch
):
    for key, value in {
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": "1",
        "SLURMD_NODENAME": "n2",
        "LOCAL_RANK": "0",
        TARGETS_DIR_ENV: str(tmp_path / "targets"),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the multiprocess folders go
    port = free_port()
    cfg = compose(["model=tiny", "data.table=s3://b/t.lance", f"metrics.port={port}", "job_name=pretrain"])
    target = tmp_path / "targets" / "pretrain-42-n2.json"

    with node_metrics(cfg), socket.create_server(("127.0.0.1", port)):  # another program holds the port
        assert not target.exists()  # nothing serves yet: Prometheus is told nothing
        # a folder of this run of the job: the requeued run (restart 1) does not serve the files of run 0
        assert Path(os.environ[ENV_DIR]) == tmp_path / "svd-metrics" / "pretrain-42-1"
        lines: list[str] = []
        with serve_node_metrics(port, os.environ[ENV_DIR], addr="127.0.0.1", warn=lines.append) as server:
            assert json.loads(target.read_text()) == [
                {
                    "targets": [f"n2:{server.port}"],
                    "labels": {"job": "pretrain", "slurm_job_id": "42", "node": "n2"},
                }
            ]
        assert server.port != port
        assert lines == [f"metrics: port {port} is taken; serving on {server.port}"]
    assert not target.exists()
