"""`launcher=slurm` on a real two-node Slurm: training across both nodes stopped by Slurm and resumed on one
rank, a checkpoint and a requeue when the scheduler warns, crashes requeued then given up, the plain sbatch
script, curation as a job array."""

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
from svd.data.local_s3 import free_port
from svd.data.storage import Storage, join
from svd.launch.slurm import node_metrics
from svd.launch.slurm_requeue import CrashLedger, job_restarts
from svd.train.checkpoint import Checkpointer
from svd.train.file_sd import TARGETS_DIR_ENV
from svd.train.metrics import ENV_DIR, serve_node_metrics

ROOT = Path(__file__).resolve().parents[2]


def run_args(table: dict, tmp_path: Path, *extra: str) -> list[str]:
    """A tiny run of 2 ranks, one per node, sharded HSDP (replicated across the nodes), in the production
    configuration: 2 loader workers per rank, the metrics endpoint on a free port (both nodes are this host:
    the second takes the next port), validation and previews every few steps, asynchronous checkpoints."""
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
        "data.num_workers=2",
        f"metrics.port={free_port()}",
        "train.global_batch=2",
        "train.log_every=1",
        "train.val_every=2",
        "train.preview_every=3",
        "checkpoint.async_save=true",
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
        timeout=600,
    )


def submitted_job(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("slurm job "))
    return line.split()[2].rstrip(":")


def wait_for_line(path: Path, text: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout_s} s"
        time.sleep(0.2)


def results(tmp_path: Path, job_id: str) -> list:
    return submitit.SlurmJob(tmp_path / "submitit", job_id, tasks=(0, 1)).results()


def step_lines(log: Path) -> list[int]:
    """The steps a rank's progress lines report, in order ("step 3/8 …" → 3)."""
    return [
        int(line.split()[1].split("/")[0])
        for line in log.read_text().splitlines()
        if line.startswith("step ")
    ]


def validation(storage: Storage, run_dir: str) -> dict[int, dict[str, float]]:
    """validation.jsonl of a run: step → losses."""
    fs, path = storage.fsspec(join(run_dir, "validation.jsonl"))
    rows = [json.loads(line) for line in fs.cat_file(path).decode().splitlines()]
    return {row.pop("step"): row for row in rows}


@pytest.mark.slow
def test_a_two_node_run_that_slurm_cancels_resumes_on_one_rank_and_trains_each_step_once_to_the_same_losses(
    slurm_cluster, radosgw_train_table, radosgw_job_env, radosgw, tmp_path
):
    steps, run_dir = 8, f"s3://{radosgw.new_bucket()}/run"

    def submit(name: str, *extra: str) -> tuple[str, Path]:
        args = run_args(radosgw_train_table, tmp_path / name, f"train.steps={steps}", "checkpoint.every=4")
        submitted = command("launch.py", *args, *extra, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        return submitted_job(submitted.stdout), tmp_path / name / "submitit"

    # the same run without a stop, on one rank beside it (its own run directory)
    whole_job, whole = submit("whole", "nodes=1", f"checkpoint.run_dir={run_dir}-whole")
    stopped_job, stopped = submit("stopped", f"checkpoint.run_dir={run_dir}")
    wait_for_line(stopped / f"{stopped_job}_0_log.out", f"step 3/{steps}")

    # As Slurm ends a job (scancel, the time limit, a preemption): SIGTERM to every process of the job, the
    # loader workers included, and SIGKILL KillWait seconds later.
    subprocess.run(["scancel", stopped_job], check=True)
    assert slurm_cluster.wait_until_finished(stopped_job, timeout_s=600) == "CANCELLED"
    rank0, rank1 = submitit.SlurmJob(stopped, stopped_job, tasks=(0, 1)).results()
    saved = rank0.steps
    assert (rank0.stopped, rank1.stopped, rank1.steps) == (True, True, saved)
    assert 3 <= saved < steps
    assert Checkpointer(run_dir, radosgw.storage).latest_step() == saved

    resumed_job, resumed = submit("resumed", "nodes=1", f"checkpoint.run_dir={run_dir}", "launcher.wait=true")
    final = submitit.SlurmJob(resumed, resumed_job).result()
    whole_run = submitit.SlurmJob(whole, whole_job).result()

    assert (final.resumed_from, final.steps, final.stopped) == (saved, steps, False)
    assert step_lines(stopped / f"{stopped_job}_0_log.out") == list(range(1, saved + 1))
    assert step_lines(resumed / f"{resumed_job}_0_log.out") == list(range(saved + 1, steps + 1))
    # 2 ranks (HSDP) then 1: the global loss of every step as the uninterrupted run computed it
    assert rank0.losses + final.losses == pytest.approx(whole_run.losses, rel=1e-5)
    # validation (EMA weights) as without the stop: the average came back whole on the new world size
    validated, validated_whole = (validation(radosgw.storage, uri) for uri in (run_dir, f"{run_dir}-whole"))
    assert list(validated_whole) == [2, 4, 6, 8]
    assert {6, 8} <= set(validated) <= {2, 4, 6, 8}
    for step, losses in validated.items():
        assert losses == pytest.approx(validated_whole[step], rel=1e-5), f"validation at step {step}"
    fs, previews = radosgw.storage.fsspec(join(run_dir, "previews"))
    assert f"{previews}/step-00000006.mp4" in fs.ls(previews, refresh=True)
    assert Checkpointer(run_dir, radosgw.storage).latest_step() == steps


@pytest.mark.slow
def test_the_preemption_signal_checkpoints_the_current_step_and_the_requeued_job_resumes_from_it(
    slurm_cluster, train_table, job_env, tmp_path
):
    # No periodic checkpoint before the end: the one the requeued job resumes from is the signal's.
    args = run_args(train_table, tmp_path, "train.steps=8", "checkpoint.every=1000")
    submitted = command("launch.py", *args, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted_job(submitted.stdout)
    wait_for_line(tmp_path / "submitit" / f"{job_id}_0_log.out", "step 1/8")  # training: the stop is armed

    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    assert slurm_cluster.wait_until_finished(job_id, timeout_s=600) == "COMPLETED"
    final = results(tmp_path, job_id)[0]
    assert final.resumed_from in range(2, 8)
    assert (final.steps, len(final.losses)) == (8, 8 - final.resumed_from)
    log = (tmp_path / "submitit" / f"{job_id}_0_log.out").read_text()
    assert f"step {final.resumed_from}/8" in log  # the step under way when the signal came, then saved
    assert log.count("Requeued job") == 1


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
    # both ranks crashed at once (rank 1 on rank 0's word: only rank 0 reads stage.init_from), and each asked
    # for the requeue and left for it
    for rank, error in (
        (0, "CheckpointError: "),
        (1, "InitFromError: stage.init_from: rank 0 could not read"),
    ):
        log = (tmp_path / "submitit" / f"{job_id}_{rank}_log.out").read_text()
        assert log.count(f"svd: rank {rank} crashed ({error}") == 1
        assert log.count("requeue 1 of 1") == 1
        assert log.count(f"svd: rank {rank} leaves for the requeue") == 1
    assert slurm_cluster.wait_until_finished(job_id) == "FAILED"
    # requeued once, and each run of the job counted once however many of its ranks crashed
    assert job_restarts(job_id) == 1
    assert CrashLedger(tmp_path / "submitit", job_id).crashes() == 2


@pytest.mark.slow
def test_the_plain_sbatch_script_trains_and_requeues_itself_on_the_preemption_signal(
    slurm_cluster, train_table, job_env, tmp_path, monkeypatch
):
    args = run_args(train_table, tmp_path, "train.steps=8", "checkpoint.every=1000")
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
    wait_for_line(out, "step 1/8")

    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    assert slurm_cluster.wait_until_finished(job_id, timeout_s=600) == "COMPLETED", out.read_text()
    log = out.read_text()  # both runs: the script appends
    assert "svd: rank 0 leaves for the requeue" in log
    # every step trained once: the requeued run went on from the step the signal saved
    assert [line.split()[1] for line in log.splitlines() if line.startswith("step ")] == [
        f"{step}/8" for step in range(1, 9)
    ]
    assert f"done: 8 steps in {tmp_path / 'run'}" in log
    assert Checkpointer(str(tmp_path / "run")).latest_step() == 8


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


def test_a_partition_sbatch_refuses_is_reported_in_one_line(slurm_cluster, train_table, job_env, tmp_path):
    done = command("launch.py", *run_args(train_table, tmp_path, "cluster.partition=nope"), cwd=tmp_path)

    assert done.returncode == 2
    # sbatch's own lines (echoed by submitit as they came), then one line of the launcher's
    assert done.stderr.strip().splitlines()[-1] == (
        "launch: sbatch refused the job: sbatch: error: invalid partition specified: nope"
    )


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


@pytest.mark.slow
def test_a_watch_as_a_slurm_job_of_two_tasks_evaluates_the_run_and_announces_its_endpoints(
    slurm_cluster, trained_run, moto_s3, job_env, tmp_path, monkeypatch, capsys
):
    """`jobs/evaluate.py launcher=slurm watch=true` beside a (here finished) run: one task per node, the
    one-process metrics, and each task's endpoint announced to Prometheus (file_sd) while it watches."""
    import threading
    import urllib.request

    from svd.eval.job import EvaluateSettings, Evaluation
    from svd.eval.protocol import load_protocol
    from svd.launch.evaluation import evaluate_elsewhere

    protocol = load_protocol(
        "motion_adherence",
        ["samples=4", "shard_size=2", "frames=4", "fps=4", "sampler_steps=2", "motion_buckets=[0,255]"],
    )
    one = EvaluateSettings(run=trained_run, out=f"{trained_run}/eval/one-for-slurm")
    expected = Evaluation(one, protocol, moto_s3.storage).evaluate(2, progress=False)["values"]

    targets = tmp_path / "targets"
    monkeypatch.setenv(TARGETS_DIR_ENV, str(targets))  # Slurm passes the submitter's environment on
    settings = EvaluateSettings(
        run=trained_run,
        out=f"{trained_run}/eval/slurm",
        watch=True,
        poll_s=0.5,
        metrics_port=free_port(),
        launcher="slurm",
        nodes=2,
        cluster="local_slurm",
        folder=str(tmp_path / "submitit"),
    )
    status: list[int] = []
    submitter = threading.Thread(target=lambda: status.append(evaluate_elsewhere(settings, protocol)))
    submitter.start()
    announced: dict[str, list] = {}
    while submitter.is_alive():  # scrape each announcement while its task watches
        for path in targets.glob("*.json") if targets.exists() else []:
            try:
                (target,) = json.loads(path.read_text())
                port = target["targets"][0].rsplit(":", 1)[1]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                    served = page.read().decode()
            except (OSError, ValueError):  # the task ended meanwhile
                continue
            announced.setdefault(path.name, [target, served])
        time.sleep(0.1)
    submitter.join()

    assert status == [0]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("slurm job ")
    assert lines[0].endswith(f"2 processes, logs in {tmp_path}/submitit")
    assert any(line.startswith("motion_adherence at step 2: spearman_rho ") for line in lines[1:]), lines
    fs, path = moto_s3.storage.fsspec(f"{trained_run}/eval/slurm/step-00000002/metrics.json")
    values = json.loads(fs.cat_file(path))["values"]
    assert values["spearman_rho"] == pytest.approx(expected["spearman_rho"], rel=1e-6)
    assert values["motion_by_bucket"] == pytest.approx(expected["motion_by_bucket"], rel=1e-6)
    job_id = lines[0].split()[2].rstrip(":")
    assert sorted(announced) == [f"eval-motion_adherence-{job_id}-{rank}.json" for rank in (0, 1)]
    for rank, (target, served) in enumerate(
        announced[f"eval-motion_adherence-{job_id}-{r}.json"] for r in (0, 1)
    ):
        assert target["labels"] == {
            "job": "eval-motion_adherence",
            "slurm_job_id": job_id,
            "node": ("n1", "n2")[rank],
            "eval_rank": str(rank),
        }
        assert "# TYPE svd_eval_metric gauge" in served
    assert not list(targets.glob("*.json"))  # each announcement went with its watch
