"""The Ray launcher on a real local Ray (one head on 127.0.0.1 per module): FSDP2 training by Ray Train
workers, a killed worker restarted by Ray and resumed from our checkpoint, curation shards as Ray tasks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from svd.config import compose
from svd.curate.config import CurateConfig
from svd.curate.shards import curate_on_ray, run_shards
from svd.data.local_s3 import free_port
from svd.launch import ray as ray_launcher

pytestmark = pytest.mark.skipif(find_spec("ray") is None, reason="ray is not installed (the ray extra)")
ROOT = Path(__file__).resolve().parents[2]
WORKER_TITLE = b"ray::RayTrainWorker"  # the process title of a Ray Train worker
# How long a "pod eviction" drains its node: the poll for it, the rest of a step and the save must fit, on a
# machine loaded by other tests
DRAIN_S = 45


@pytest.fixture(scope="module")
def ray_head(moto_s3) -> Iterator[str]:
    """A local Ray head of 3 CPUs on 127.0.0.1, started in this process; its workers inherit the S3 server's
    variables, this checkout on PYTHONPATH and one thread each. Yields the address other drivers connect
    to. (Ray reads its settings when imported: this is the first import.)"""
    with pytest.MonkeyPatch.context() as env:
        for key, value in moto_s3.env.items():
            env.setenv(key, value)
        env.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv(ray_launcher.LOCAL_ONLY, "0")
        env.delenv("RAY_ADDRESS", raising=False)
        import ray

        ray.init(
            address="local",  # not a Ray that another test or job left running on this host
            num_cpus=3,
            include_dashboard=False,
            object_store_memory=ray_launcher.LOCAL_OBJECT_STORE_BYTES,
            runtime_env=ray_launcher.runtime_env(),
        )
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def settings(table: dict, run: str, *extra: str) -> list[str]:
    return [
        "launcher=ray",
        "model=tiny",
        "gpus_per_node=2",
        "cluster.cpus_per_task=1",
        f"data.table={table['table']}",
        f"checkpoint.run_dir={table['bucket']}/runs/{run}",
        "data.frames=4",
        "data.fps=4",
        "train.log_every=1",
        "checkpoint.every=2",
        "train.seed=0",
        *extra,
    ]


def marker(moto_s3, table: dict, run: str) -> dict | None:
    fs, path = moto_s3.storage.fsspec(f"{table['bucket']}/runs/{run}/checkpoints/latest")
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def test_a_32_node_job_is_256_workers_without_starting_ray():
    cfg = compose(["launcher=ray", "nodes=32", "gpus_per_node=8", "data.table=s3://b/t.lance"])
    imported = "ray" in sys.modules
    text = ray_launcher.dry_run(cfg)
    assert "ScalingConfig(num_workers=256, use_gpu=True, resources_per_worker={'CPU': 8, 'GPU': 1})" in text
    assert "FailureConfig(max_failures=3)" in text
    assert "RunConfig(name='video_pretrain', storage_path='outputs/runs/video_pretrain/ray')" in text
    assert ("ray" in sys.modules) == imported  # nor imported it


def test_the_cluster_is_ray_address_else_the_environments_else_a_local_ray(monkeypatch):
    cfg = compose(["launcher=ray", "data.table=s3://b/t.lance"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_launcher.dry_run(cfg).startswith("Ray Train TorchTrainer on a local Ray started here\n")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as KubeRay sets it for a RayJob's entrypoint
    assert ray_launcher.dry_run(cfg).startswith(
        "Ray Train TorchTrainer on the Ray cluster at 127.0.0.1:6379\n"
    )
    cfg.launcher.ray_address = "127.0.0.1:6380"
    assert ray_launcher.dry_run(cfg).startswith(
        "Ray Train TorchTrainer on the Ray cluster at 127.0.0.1:6380\n"
    )


def _train_workers() -> list[int]:
    """The Ray Train workers of this module's Ray: processes titled so whose parent (the raylet) this
    process started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if not (stat.parent / "cmdline").read_bytes().startswith(WORKER_TITLE):
                continue
            raylet = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if int(Path(f"/proc/{raylet}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(pids)


@pytest.mark.slow
def test_two_workers_train_and_a_killed_one_is_restarted_by_ray_and_resumes_from_the_checkpoint(
    ray_head,
    train_table,
    moto_s3,
):
    port = free_port()
    args = settings(
        train_table,
        "ray-killed",
        "train.steps=12",  # steps enough that the kill lands before the end on a fast machine
        "launcher.max_requeues=1",
        f"launcher.ray_address={ray_head}",
        f"metrics.port={port}",
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "launch.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while marker(moto_s3, train_table, "ray-killed") is None:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        workers = _train_workers()
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    samples = [line for line in scraped.splitlines() if line.startswith("svd_samples_total{")]
    assert sorted(line.split('rank="')[1].split('"')[0] for line in samples) == ["0", "1"], scraped[
        :3000
    ]  # one endpoint
    assert ray_head.startswith("127.0.0.1:")
    assert f"on the Ray cluster at {ray_head}" in output
    finished = [line for line in output.splitlines() if "ray: rank 0 reached step" in line]
    assert len(finished) == 1, output  # the first worker group never finished
    resumed_from = int(finished[0].rsplit("from step ", 1)[1])
    assert resumed_from in range(2, 12, 2), finished  # a checkpoint of the first worker group
    assert "ray: rank 0 reached step 12" in finished[0]
    assert output.rstrip().endswith(f"done: 12 steps in {train_table['bucket']}/runs/ray-killed")
    saved = marker(moto_s3, train_table, "ray-killed")
    assert (saved["step"], saved["world_size"]) == (12, 2)
    fs, path = moto_s3.storage.fsspec(f"{train_table['bucket']}/runs/ray-killed/ray/video_pretrain")
    assert fs.exists(path)  # Ray Train's own state went to the S3 server too, beside our checkpoints


def test_ray_storage_on_s3_goes_through_svds_storage_settings_and_a_local_path_is_absolute(
    moto_s3, tmp_path, monkeypatch
):
    from pyarrow.fs import LocalFileSystem, PyFileSystem

    fs, path = ray_launcher.ray_storage("s3://bucket/runs/a/ray", moto_s3.storage)
    assert isinstance(fs, PyFileSystem)
    assert path == "bucket/runs/a/ray"
    assert fs.handler.fs.endpoint_url == moto_s3.env["AWS_ENDPOINT_URL_S3"]
    monkeypatch.chdir(tmp_path)
    fs, path = ray_launcher.ray_storage("runs/a/ray", moto_s3.storage)
    assert isinstance(fs, LocalFileSystem)
    assert path == str(tmp_path / "runs" / "a" / "ray")


@pytest.mark.slow
def test_two_curation_shards_as_ray_tasks_fill_one_table(ray_head, train_table, moto_s3, capsys):
    import lance

    output = f"{train_table['bucket']}/ray-curated.lance"
    cfg = CurateConfig(
        input=f"{train_table['bucket']}/raw/", output=output, launcher="ray", shards=2, workers=0
    )
    results = curate_on_ray(cfg)
    assert results.failures == {}
    inputs = [results.summaries[i].videos_in_shard for i in (0, 1)]
    assert min(inputs) > 0  # both shards had work
    assert sum(inputs) == 10  # 6 videos and 4 images
    total = results.total
    assert total.curated == 10
    rows = lance.dataset(output, storage_options=moto_s3.storage.lance_options(output)).count_rows()
    assert rows == total.clips > 0
    capsys.readouterr()
    assert run_shards(cfg) == 0  # a rerun finds everything in the table
    assert "2 of 2 shards: 10 inputs, 10 already in the table, 0 curated → 0 clips" in capsys.readouterr().out


@pytest.mark.slow
def test_curation_on_a_local_ray_reports_each_failed_shard_in_one_line(train_table, moto_s3):
    """Through the command line, without $RAY_ADDRESS: the launcher starts (and stops) a Ray of its own."""
    missing = f"{train_table['bucket']}/missing/"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | moto_s3.env
    env |= {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    argv = [f"input={missing}", f"output={train_table['bucket']}/never.lance", "launcher=ray", "shards=2"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "curate.py"), *argv, "workers=0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("ray: 2 curation shards (1 CPUs each) on a local Ray on this host\n")
    cause = f"InputError: input={missing}: no such file or folder, or nothing in it"
    assert [line for line in done.stderr.splitlines() if line.startswith("curate:")] == [
        f"curate: shard 0/2 failed: {cause}",
        f"curate: shard 1/2 failed: {cause}",
        "curate: 2 of 2 shards failed; rerun the same command",
    ]


@pytest.mark.slow
def test_a_run_that_fails_on_every_worker_is_one_line_and_status_1(ray_head, train_table, capsys):
    table = f"{train_table['bucket']}/no-such-table.lance"
    args = settings(train_table, "ray-failed", "gpus_per_node=1", "launcher.max_requeues=0")
    cfg = compose([*args, f"data.table={table}"])  # not checked here: the workers find it missing
    assert ray_launcher.launch(cfg) == 1
    (line,) = [e for e in capsys.readouterr().err.splitlines() if e.startswith("launch:")]
    assert line.startswith(
        "launch: training on Ray failed: rank 0: FileNotFoundError: cannot open clip table "
    )
    assert table in line


class RayNode:
    """A Ray node as KubeRay runs one in a pod: `ray start --block` as the pod's main process, in a session of
    its own with everything it starts (raylet, GCS, workers)."""

    def __init__(self, env: dict[str, str], temp_dir: Path, name: str, *options: str) -> None:
        self.log = temp_dir / f"{name}.log"
        ports = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("ray")),
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp_dir / name}",  # its own: each node's log monitor sends its workers' lines
                # to the driver, and nodes sharing a folder sent every line once per node
                "--object-store-memory=100000000",
                "--disable-usage-stats",
                f"--metrics-export-port={free_port()}",
                *(f"--{port}={free_port()}" for port in ports),
                *options,
            ],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_started(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no Ray node within {timeout} s"
            time.sleep(0.5)

    def kill(self) -> None:
        """Everything of its session."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == self.process.pid:
                    os.kill(int(stat.parent.name), signal.SIGKILL)
            except (OSError, IndexError, ValueError):
                continue
        self.process.wait()


@pytest.fixture
def ray_nodes(rgw_env) -> Iterator[Callable[..., RayNode]]:
    """Starts Ray nodes on 127.0.0.1 (`start(name, *options, **env)`) whose workers reach radosgw; kills them
    after the test. Their state sits in a short folder: Ray's socket paths must fit in 107 bytes."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    nodes: list[RayNode] = []
    env = rgw_env | {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # several nodes on this host
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }

    def start(name: str, *options: str, **node_env: str) -> RayNode:
        nodes.append(RayNode(env | node_env, temp_dir, name, *options))
        nodes[-1].wait_started()
        return nodes[-1]

    yield start
    for node in reversed(nodes):
        node.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_ranks_save_the_step_under_way_when_a_pod_is_evicted_and_on_ray_job_stop_then_resume_on_one(
    rgw_train_table, radosgw, rgw_env, launched, production, ray_nodes, never_stopped
):
    """A KubeRay-like cluster: a head without CPUs (the driver's node) and a worker node that a "pod
    eviction" ends: SIGTERM to its `ray start --block` only, as Kubernetes signals a pod's main process. The
    ranks save the step under way within the drain window and wait; Ray Train restarts them on a replacement
    node (as a preemption, or once in a while as a failure: see the settings), from that step. Then SIGTERM
    to the driver's process group (what `ray job stop` sends the entrypoint): the ranks save the step under
    way and the run exits 130; the same command on one worker finishes it. Every step is trained once, with
    the losses and final weights of a run never stopped. Before: a pod eviction lost the steps since the last
    periodic checkpoint (and counted as a crash), and SIGTERM to the driver ended the run unsaved."""
    table, bucket = rgw_train_table, rgw_train_table["bucket"]
    port = free_port()
    ray_nodes(
        "head",
        "--head",
        f"--port={port}",
        "--num-cpus=0",
        "--include-dashboard=false",
    )
    evicted = ray_nodes(
        "pod-a",
        f"--address=127.0.0.1:{port}",
        "--num-cpus=2",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=str(DRAIN_S),
    )
    driver_env = rgw_env | {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    ray = [
        "launcher=ray",
        "cluster.cpus_per_task=1",
        f"launcher.ray_address=127.0.0.1:{port}",
        # Ray Train counts the eviction as a preemption, or as a failure when it sees the workers die before
        # the drain deadline passes (a race, see svd/launch/ray.py): one requeue covers either
        "launcher.max_requeues=1",
        "train.steps=12",
    ]
    run = launched(production(table, "ray-stopped", "gpus_per_node=2", *ray), driver_env)
    run.wait_for(r"step 3/12 ")
    evicted.process.send_signal(signal.SIGTERM)
    saved = int(run.wait_for(r"ray: ranks \[0, 1\] are being preempted: step (\d+) saved")[1])
    assert radosgw.latest_step(f"{bucket}/runs/ray-stopped") == saved == max(run.losses())
    ray_nodes("pod-b", f"--address=127.0.0.1:{port}", "--num-cpus=2")  # KubeRay replaces the pod
    run.wait_for(rf"step {saved + 2}/12 ")
    run.signal(signal.SIGTERM)
    assert run.finish() == 130, run.output()
    assert [line for line in run.stderr if line.startswith("launch:")] == [
        "launch: SIGTERM: saving the step under way, then stopping (Ctrl-C again: quit without it)"
    ]
    _, stopped, run_dir = run.stopped()
    assert saved + 2 <= stopped < 12
    assert radosgw.latest_step(run_dir) == stopped == max(run.losses())

    resumed = launched(production(table, "ray-stopped", "gpus_per_node=1", *ray), driver_env)
    assert resumed.finish() == 0, resumed.output()
    assert resumed.stdout[-1] == f"done: 12 steps in {run_dir}"
    assert never_stopped.finish() == 0, never_stopped.output()
    losses = run.losses() | resumed.losses()
    assert list(losses) == list(range(1, 13))  # every step trained once
    assert losses == pytest.approx(never_stopped.losses(), abs=2e-4)  # as printed, to 4 decimals
    radosgw.assert_same_weights(run_dir, never_stopped.run_dir)


EVAL_SMALL = ["samples=4", "shard_size=2", "frames=4", "fps=4", "sampler_steps=2", "motion_buckets=[0,255]"]


@pytest.mark.slow
def test_an_evaluation_in_two_ray_tasks_gives_the_one_process_result(
    ray_head, trained_run, moto_s3, s3_env, capsys
):
    from svd.eval.job import EvaluateSettings, Evaluation
    from svd.eval.protocol import load_protocol
    from svd.launch.evaluation import evaluate_elsewhere

    protocol = load_protocol("motion_adherence", EVAL_SMALL)
    one = Evaluation(
        EvaluateSettings(run=trained_run, out=f"{trained_run}/eval/one"), protocol, moto_s3.storage
    )
    expected = one.evaluate(2, progress=False)["values"]

    settings = EvaluateSettings(
        run=trained_run, out=f"{trained_run}/eval/ray", launcher="ray", ranks_per_node=2, cpus_per_rank=1
    )
    assert evaluate_elsewhere(settings, protocol) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "ray: 2 evaluation processes (1 CPUs each) on a local Ray on this host"
    merged = [line for line in lines[1:] if line.startswith("motion_adherence at step 2: spearman_rho ")]
    assert merged, lines  # by whichever task wrote the last shard (or both, merging at once)
    assert all(line.endswith(f"(8 samples) → {trained_run}/eval/ray/step-00000002") for line in merged)
    fs, path = moto_s3.storage.fsspec(f"{trained_run}/eval/ray/step-00000002/metrics.json")
    values = json.loads(fs.cat_file(path))["values"]
    assert values["spearman_rho"] == pytest.approx(expected["spearman_rho"], rel=1e-6)
    assert values["motion_by_bucket"] == pytest.approx(expected["motion_by_bucket"], rel=1e-6)
