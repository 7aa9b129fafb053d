"""Metrics: real rank processes writing multiprocess files, one node endpoint scraped over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from svd.config import METRICS_PORT
from svd.config import MetricsConfig as RunMetricsConfig
from svd.train.metrics import (
    ENV_DIR,
    PEAK_FLOPS,
    PORT_TRIES,
    MetricsConfig,
    ProgressLine,
    TrainMetrics,
    flops_per_sample,
    latest_multiprocess_dir,
    launch_multiprocess_dir,
    match_device_name,
    prepare_multiprocess_dir,
    serve_node_metrics,
)

from ..settings import production_settings

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"job": "j1", "stage": "video", "rank": "0", "node": "n0"}

# One rank: records one step, skips and a checkpoint, then exits (its values stay in its mmap file).
RANK = textwrap.dedent(
    """
    import sys
    from svd.train.metrics import MetricsConfig, TrainMetrics
    rank, loss, skipped = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    m = TrainMetrics(MetricsConfig(gpu="H100"), job="j1", stage="video", rank=rank, node="n0",
                     flops_per_sample=2e12)
    m.observe_start(world_size=2, checkpoint_every=5, checkpoint_step=None)
    m.observe_step(step=7, loss=loss, grad_norm=0.25, lr=1e-4, step_seconds=2.0, data_wait_seconds=0.5,
                   samples=4)
    m.observe_skipped({"decode": skipped})
    m.observe_checkpoint(12.0)
    m.observe_checkpoint_committed(5)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank: int, loss: float, skipped: int) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(loss), str(skipped)], env=env)


def scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def by_rank(samples: list, name: str) -> dict[str, float]:
    return {s.labels["rank"]: s.value for s in samples if s.name == name}


@pytest.mark.slow
def test_node_endpoint_serves_every_rank_with_its_labels_and_a_restarted_rank_replaces_its_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_DIR, raising=False)  # restored after the test: prepare exports it
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "gauge_mostrecent_999.db").write_bytes(b"stale values of an earlier run")
    prepare_multiprocess_dir(folder)
    assert os.environ[ENV_DIR] == str(folder)
    assert list(folder.iterdir()) == []

    started = time.time()
    ranks = [start_rank(0, 0.5, 1), start_rank(1, 1.5, 2)]
    assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    finished = time.time()
    port = free_port()
    with serve_node_metrics(port, folder, addr="127.0.0.1") as server:
        first = scrape(server.port)
        assert start_rank(0, 0.75, 3).wait(timeout=120) == 0  # rank 0 restarts and reports again
        second = scrape(server.port)

    loss = first["svd_loss"]
    assert {frozenset(s.labels.items()) for s in loss} == {
        frozenset((LABELS | {"rank": r}).items()) for r in ("0", "1")
    }  # exactly the four labels: no pid label splits a rank's series
    assert by_rank(loss, "svd_loss") == {"0": 0.5, "1": 1.5}
    assert by_rank(first["svd_grad_norm"], "svd_grad_norm") == {"0": 0.25, "1": 0.25}
    assert by_rank(first["svd_learning_rate"], "svd_learning_rate") == {"0": 1e-4, "1": 1e-4}
    assert by_rank(first["svd_samples_per_second"], "svd_samples_per_second") == {"0": 2.0, "1": 2.0}
    assert by_rank(first["svd_mfu_ratio"], "svd_mfu_ratio") == {
        "0": 2e12 * 2.0 / 989e12,
        "1": 2e12 * 2.0 / 989e12,
    }
    assert by_rank(first["svd_data_skipped"], "svd_data_skipped_total") == {"0": 1.0, "1": 2.0}
    assert by_rank(first["svd_step_seconds"], "svd_step_seconds_sum") == {"0": 2.0, "1": 2.0}
    assert by_rank(first["svd_data_wait_seconds"], "svd_data_wait_seconds_sum") == {"0": 0.5, "1": 0.5}
    assert by_rank(first["svd_checkpoint_save_seconds"], "svd_checkpoint_save_seconds_count") == {
        "0": 1.0,
        "1": 1.0,
    }
    assert by_rank(first["svd_world_size"], "svd_world_size") == {"0": 2.0, "1": 2.0}
    assert by_rank(first["svd_checkpoint_step"], "svd_checkpoint_step") == {"0": 5.0, "1": 5.0}
    assert by_rank(first["svd_checkpoint_interval_steps"], "svd_checkpoint_interval_steps") == {
        "0": 5.0,
        "1": 5.0,
    }
    step_times = by_rank(first["svd_step_timestamp_seconds"], "svd_step_timestamp_seconds").values()
    assert len(step_times) == 2
    assert all(started <= t <= finished for t in step_times)
    rss = [s for s in first["svd_memory_bytes"] if s.labels["kind"] == "rss_max"]
    assert len(rss) == 2
    assert all(s.value > 1 << 20 for s in rss)

    assert by_rank(second["svd_loss"], "svd_loss") == {"0": 0.75, "1": 1.5}  # newest value wins
    assert by_rank(second["svd_samples"], "svd_samples_total") == {"0": 8.0, "1": 4.0}  # totals continue
    assert by_rank(second["svd_data_skipped"], "svd_data_skipped_total") == {"0": 4.0, "1": 2.0}

    with pytest.raises(
        urllib.error.URLError, match="refused"
    ):  # closed: nothing listens on the port any more
        scrape(port)


def test_a_rank_refuses_to_start_when_prometheus_client_was_imported_in_single_process_mode(
    tmp_path: Path,
) -> None:
    code = "import prometheus_client\n" + textwrap.dedent(
        """
        from svd.train.metrics import MetricsConfig, TrainMetrics
        TrainMetrics(MetricsConfig(multiproc_dir=sys.argv[1]), job="j", stage="s", rank=0, node="n0")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != ENV_DIR} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, str(tmp_path / "prom")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert f"prometheus_client was imported before {ENV_DIR} was set" in done.stderr.splitlines()[-1]


def held_ports(count: int) -> list[socket.socket]:
    """`count` consecutive ports on 127.0.0.1, each bound and listening (taken) until its socket is closed."""
    for _ in range(50):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        held = [first]
        try:
            for port in range(first.getsockname()[1] + 1, first.getsockname()[1] + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
        except OSError:  # a neighbour is in use: try another start
            for s in held:
                s.close()
            continue
        for s in held:
            s.listen()
        return held
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def test_a_taken_port_moves_the_endpoint_to_the_next_free_port_and_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    taken, following = held_ports(2)
    port = taken.getsockname()[1]
    following.close()  # port + 1 is free
    lines: list[str] = []
    with taken, serve_node_metrics(port, tmp_path, addr="127.0.0.1", warn=lines.append) as server:
        assert server.port == port + 1
        assert scrape(server.port) == {}  # serving (no rank has written yet)
    assert lines == [f"metrics: port {port} is taken; serving on {port + 1}"]


def test_with_every_port_of_the_range_taken_training_goes_on_without_an_endpoint(tmp_path: Path) -> None:
    held = held_ports(PORT_TRIES)
    port = held[0].getsockname()[1]
    lines: list[str] = []
    try:
        assert serve_node_metrics(port, tmp_path, addr="127.0.0.1", warn=lines.append) is None
    finally:
        for s in held:
            s.close()
    assert lines == [
        f"metrics: ports {port}-{port + PORT_TRIES - 1} are all taken; training goes on without a metrics "
        "endpoint on this node (set metrics.port to a free range)"
    ]


def test_a_missing_multiprocess_folder_costs_the_endpoint_not_the_run(tmp_path: Path) -> None:
    lines: list[str] = []
    assert serve_node_metrics(free_port(), tmp_path / "gone", addr="127.0.0.1", warn=lines.append) is None
    assert len(lines) == 1
    assert "gone does not exist; training goes on without a metrics endpoint" in lines[0]


def test_two_launches_of_one_job_name_on_a_host_keep_their_metric_files_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both used <tmp>/svd-metrics/<job>: the second launch cleared the first's files and served them."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv(ENV_DIR, "/the/session's")
    tempfile.tempdir = None  # read TMPDIR again
    try:
        with launch_multiprocess_dir(1, "demo") as first:
            (first / "counter_1.db").write_bytes(b"values of the first run")
            with launch_multiprocess_dir(1, "demo") as second:
                assert os.environ[ENV_DIR] == str(second)
                assert first.parent == second.parent == tmp_path / "svd-metrics"
                assert first != second
                assert (first / "counter_1.db").exists()
            assert os.environ[ENV_DIR] == str(first)
            assert latest_multiprocess_dir("demo") == second
        assert os.environ[ENV_DIR] == "/the/session's"  # the launcher's environment as it was
        assert (first / "counter_1.db").exists()  # the last values stay for a look afterwards
    finally:
        tempfile.tempdir = None
    with launch_multiprocess_dir(0, "demo") as off:
        assert off is None


def test_the_default_port_is_defined_once_and_is_not_dcgm_exporters() -> None:
    assert MetricsConfig().port == RunMetricsConfig().port == METRICS_PORT
    # outside Prometheus' exporter allocations (9100-9999), dcgm-exporter's 9400 among them
    assert not 9100 <= METRICS_PORT <= 9999
    helm = yaml.safe_load((ROOT / "helm/svd/values.yaml").read_text())
    assert helm["metrics"]["port"] == METRICS_PORT
    for doc in ("README.md", "helm/README.md", "docs/runbooks.md"):
        text = (ROOT / doc).read_text()
        assert f"{METRICS_PORT}" in text, doc
        assert "9400" not in text.replace("dcgm-exporter's 9400", ""), doc


HOLDERS = {  # another program on the port: one that only listens, and a plain HTTP server
    "listening program": "import socket, sys, time\n"
    "s = socket.socket()\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen()\nprint('ready', flush=True)\n"
    "time.sleep(3600)",
    "plain http server": "import sys\n"
    "from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer\n"
    "s = ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), SimpleHTTPRequestHandler)\n"
    "print('ready', flush=True)\ns.serve_forever()",
}


@pytest.mark.slow
def test_a_two_rank_run_trains_to_the_end_when_its_metrics_ports_are_taken(
    train_table: dict, s3_env: dict, tmp_path: Path
) -> None:
    """Production settings (loader workers, validation, previews, async checkpoints, the endpoint on), the
    configured port held by a program that only listens and the next one by a plain HTTP server: the run
    finishes, says once where it serves, and serves every rank there. Before the fix local rank 0 raised in
    its first seconds and the run ended (exit 1, a 65-line traceback). One run for both holders: each run
    costs the suite its time."""
    held = held_ports(3)
    port = held[0].getsockname()[1]
    for s in held:
        s.close()  # port + 2 is free for the run
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    programs = [
        subprocess.Popen(
            [sys.executable, "-c", holder, str(port + i)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for i, holder in enumerate(HOLDERS.values())
    ]
    log = tmp_path / "train.log"
    scraped: dict[str, list] = {}
    try:
        assert [program.stdout.readline().strip() for program in programs] == ["ready", "ready"]
        run_dir = f"{train_table['bucket']}/runs/taken-ports-{port}"
        args = production_settings(
            train_table["table"],
            run_dir,
            "train.steps=4",
            "checkpoint.every=2",
            "gpus_per_node=2",
            f"metrics.port={port}",
            f"job_name=taken-ports-{port}",
        )
        with log.open("w") as out:  # a file, not a pipe: the test waits for the run, not for its output
            run = subprocess.Popen(
                [sys.executable, str(ROOT / "jobs" / "launch.py"), *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                while run.poll() is None and not scraped:
                    scraped = scrape_until_both_ranks(port + 2)
                run.wait(timeout=600)
            finally:
                stop_group(run)
    finally:
        for program in programs:
            program.kill()
            program.wait()
    output = log.read_text()
    assert run.returncode == 0, output
    assert "done: 4 steps" in output
    assert [line for line in output.splitlines() if "metrics:" in line] == [
        f"metrics: port {port} is taken; serving on {port + 2}"
    ]
    assert scraped, f"port {port + 2} never served both ranks while the run lasted"
    assert by_rank(scraped["svd_world_size"], "svd_world_size") == {"0": 2.0, "1": 2.0}


def scrape_until_both_ranks(port: int) -> dict[str, list]:
    """One scrape of `port` once it shows both ranks' world size, else {} (not serving yet, or one rank)."""
    try:
        families = scrape(port)
    except OSError:
        time.sleep(0.2)
        return {}
    if len(by_rank(families.get("svd_world_size", []), "svd_world_size")) < 2:
        time.sleep(0.2)
        return {}
    return families


def stop_group(process: subprocess.Popen) -> None:
    """The launcher's process group, and whatever it left behind, gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_port_zero_means_no_endpoint_and_no_multiprocess_files(tmp_path: Path) -> None:
    cfg = MetricsConfig(port=0, multiproc_dir=str(tmp_path / "prom"))
    metrics = TrainMetrics(cfg, job="j1", stage="video", rank=0, node="n0")
    metrics.observe_step(1, 0.5, 1.0, 1e-4, 1.0, 0.1, 2)
    assert metrics.directory is None
    assert serve_node_metrics(cfg.port, metrics.directory) is None
    assert not (tmp_path / "prom").exists()
    assert metrics.registry.get_sample_value("svd_loss", LABELS) == 0.5


# A run on a disk that refuses the data of step 4's checkpoint (as a full or revoked store would): the trainer
# itself, one rank in its own process (prometheus_client's multiprocess mode is fixed per process).
FAILING_SAVE = textwrap.dedent(
    """
    import sys
    import fsspec
    from fsspec.implementations.local import LocalFileSystem
    from svd.config import compose
    from svd.train import run
    from svd.train.metrics import prepare_multiprocess_dir

    class RefusesStep4(LocalFileSystem):
        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode and "step-00000004/" in path:
                raise OSError(28, "No space left on device", path)
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("file", RefusesStep4, clobber=True)
    prepare_multiprocess_dir(sys.argv[1])  # as a launcher does, in a folder the test reads afterwards
    run(compose(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_a_failed_async_save_counts_and_leaves_the_checkpoint_step_at_the_last_good_save(
    train_table: dict, moto_s3, tmp_path: Path
) -> None:
    job, folder = "failed-save", tmp_path / "metrics"
    args = production_settings(
        train_table["table"],
        str(tmp_path / "run"),
        f"job_name={job}",
        "train.global_batch=2",
        "train.steps=6",
        "train.val_every=3",
        "checkpoint.every=2",
    )
    env = os.environ | moto_s3.env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(  # a failed run must also end: the limit turns a hang at exit into a failure
        [sys.executable, "-c", FAILING_SAVE, str(folder), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "step-00000004 failed: rank 0: OSError: [Errno 28] No space left on device" in done.stderr

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    labels = {"job": job, "stage": "video_pretrain", "rank": "0", "node": socket.gethostname()}
    assert registry.get_sample_value("svd_step", labels) == 6  # the failure surfaced at the next save
    assert registry.get_sample_value("svd_checkpoint_step", labels) == 2  # not 4: that save never completed
    assert registry.get_sample_value("svd_checkpoint_failures_total", labels) == 1
    assert registry.get_sample_value("svd_checkpoint_save_seconds_count", labels) == 2  # steps 2 and 4


def test_mfu_is_flops_per_sample_times_samples_per_second_over_the_configured_peak() -> None:
    metrics = TrainMetrics(
        MetricsConfig(port=0, gpu="A100"), job="j1", stage="video", rank=0, node="n0", flops_per_sample=3e9
    )
    metrics.observe_step(5, 0.5, 1.0, 1e-4, step_seconds=0.5, data_wait_seconds=0.0, samples=8)
    assert metrics.registry.get_sample_value("svd_samples_per_second", LABELS) == 16.0
    assert metrics.registry.get_sample_value("svd_mfu_ratio", LABELS) == 3e9 * 16.0 / 312e12


def test_no_mfu_series_on_cpu_without_a_configured_gpu() -> None:
    metrics = TrainMetrics(
        MetricsConfig(port=0), job="j1", stage="video", rank=0, node="n0", flops_per_sample=3e9
    )
    metrics.observe_step(5, 0.5, 1.0, 1e-4, step_seconds=0.5, data_wait_seconds=0.0, samples=8)
    assert metrics.peak_flops is None
    assert metrics.registry.get_sample_value("svd_mfu_ratio", LABELS) is None


def test_skipped_counter_adds_only_what_is_new_in_the_loaders_running_totals() -> None:
    metrics = TrainMetrics(MetricsConfig(port=0), job="j1", stage="video", rank=0, node="n0")

    def skipped(reason: str) -> float | None:
        return metrics.registry.get_sample_value("svd_data_skipped_total", LABELS | {"reason": reason})

    metrics.observe_skipped({"decode": 2})
    metrics.observe_skipped({"decode": 5, "timeout": 1})
    metrics.observe_skipped({"decode": 5, "timeout": 1})  # nothing new
    assert (skipped("decode"), skipped("timeout")) == (5.0, 1.0)
    metrics.observe_skipped({"decode": 1})  # a new loader counts from zero again
    assert (skipped("decode"), skipped("timeout")) == (6.0, 1.0)


def test_memory_on_cpu_is_the_process_peak_rss() -> None:
    metrics = TrainMetrics(MetricsConfig(port=0), job="j1", stage="video", rank=0, node="n0")
    before = metrics.registry.get_sample_value("svd_memory_bytes", LABELS | {"kind": "rss_max"})
    big = torch.ones(64 << 20, dtype=torch.uint8)  # touched: 64 MiB resident
    metrics.observe_step(1, 0.5, 1.0, 1e-4, 1.0, 0.1, 2)
    rss = metrics.registry.get_sample_value("svd_memory_bytes", LABELS | {"kind": "rss_max"})
    assert before is None
    assert rss >= big.numel()
    assert (
        metrics.registry.get_sample_value("svd_memory_bytes", LABELS | {"kind": "cuda_max_allocated"}) is None
    )


def test_flop_counter_equals_the_hand_count_of_forward_and_backward_per_sample() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)  # the data needs no gradient: the first layer's backward is weight-grad only

    def fwd_bwd(batch: torch.Tensor) -> None:
        model(batch).square().mean().backward()

    # forward 2·B·in·out per layer; backward 2·B·in·out (weight grad) + 2·B·in·out (input grad, not layer 1)
    hand = (2 + 2) * 3 * 8 * 16 + (2 + 4) * 3 * 16 * 4
    assert flops_per_sample(fwd_bwd, x) == hand
    assert flops_per_sample(fwd_bwd, x, samples=3) == hand / 3


def test_gpu_names_match_the_longest_table_entry() -> None:
    assert match_device_name("NVIDIA H100 80GB HBM3", PEAK_FLOPS) == 989e12
    assert match_device_name("NVIDIA H100 PCIe", PEAK_FLOPS) == 756e12
    assert match_device_name("NVIDIA A100-SXM4-80GB", PEAK_FLOPS) == 312e12
    assert match_device_name("NVIDIA L40S", PEAK_FLOPS) == 362e12
    assert match_device_name("NVIDIA L4", PEAK_FLOPS) == 121e12
    assert match_device_name("NVIDIA GeForce GTX 1080", PEAK_FLOPS) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "metrics.port=70000"),
        ({"progress_every": 0}, "metrics.progress_every=0"),
        ({"gpu": "TPUv9"}, "metrics.gpu='TPUv9'"),
        ({"peak_flops": {"X": 0.0}}, r"metrics.peak_flops\['X'\]=0.0"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricsConfig(**kwargs)


def test_progress_line_averages_the_window_and_estimates_the_rest_from_its_step_times() -> None:
    lines: list[str] = []
    progress = ProgressLine(total_steps=1000, every=10, write=lines.append)
    for step in range(111, 121):
        loss = 0.1 if step % 2 else 0.2
        progress.update(
            step, loss, samples=4, step_seconds=0.25 if step % 2 else 0.75, data_wait_seconds=0.02
        )
    # window: loss 0.15, 40 samples / 5 s, 0.2 s of 5 s waiting, 880 steps × 0.5 s = 440 s
    assert lines == ["step 120/1000  loss 0.1500  8.0 samples/s  data 4%  ETA 0:07:20"]


def test_progress_line_writes_on_the_last_step_and_counts_hours_past_a_day() -> None:
    lines: list[str] = []
    progress = ProgressLine(total_steps=100_003, every=100, write=lines.append)
    assert progress.update(100, 1.0, samples=2, step_seconds=1.0, data_wait_seconds=0.0) is not None
    assert lines[-1].endswith("ETA 27:45:03")  # 99,903 s
    progress.update(100_003, 1.0, samples=2, step_seconds=1.0, data_wait_seconds=0.0)
    assert lines[-1] == "step 100003/100003  loss 1.0000  2.0 samples/s  data 0%  ETA 0:00:00"
    assert len(lines) == 2
