"""A real training run (2 ranks, the tiny model, a clip table with one damaged video on the S3 server),
scraped by a real Prometheus through file-based discovery with the target labels the chart's PodMonitor gives
a worker pod (namespace, pod, container, endpoint): its series carry the labels they carry on Kubernetes, and
every dashboard query and alert expression evaluates against them. Beside it, as on Kubernetes: the watch
that evaluates the run's checkpoints as they land (jobs/evaluate.py watch=true; its own endpoint, its pod's
target labels); Ray's own
metrics port, that of a real Ray head on 127.0.0.1 (ray[default]'s metrics agent, as in the image); and
dcgm-exporter's endpoint, a recorded sample (tests/monitoring/data/) served by a small file server, since CI
has no GPU."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from svd.data.local_s3 import free_port
from svd.data.synthetic import synthetic_corpus
from svd.data.table import write_clip_table
from svd.launch import ray as ray_launcher
from svd.train.file_sd import write_target
from svd.train.stop import StopRequest

from .conftest import (
    DASHBOARD,
    KUBERNETES_LABELS,
    ROOT,
    Prometheus,
    QueryError,
    alert_rules,
    dashboard_queries,
    measured,
    wait_until,
)

pytestmark = pytest.mark.slow  # the run trains ~30 s before Prometheus holds what the tests query

JOB, STAGE = "monitored-run", "video_pretrain"
NAMESPACE, POD = "ml", "monitored-run-gpu-workers-w1"  # the pod the recorded dcgm-exporter sample names
POD_TARGET = {"namespace": NAMESPACE, "pod": POD, "container": "ray-worker"}  # what the PodMonitor adds
EVAL_POD_TARGET = POD_TARGET | {"pod": "monitored-run-eval-workers-w1"}  # the watch's RayJob's worker pod
DATA = Path(__file__).with_name("data")
CHECKPOINT_EVERY = 3
RAY_CPUS = 1  # the Ray head's logical CPUs: its ray_resources say so
# Alerts a healthy run must not trigger. (SVDLowMFU and SVDDataLoaderStarved may well hold on 2 shared CPU
# cores measured against a made-up peak; SVDLossExploding needs a history this run does not have.)
FAILURE_ALERTS = (
    "SVDTrainingStalled",
    "SVDRankMissing",
    "SVDMetricsEndpointDown",
    "SVDNonFiniteSteps",
    "SVDCheckpointFailing",
    "SVDCheckpointLate",
    "SVDGPUXidError",
    "SVDGPUThermalThrottling",
)


@pytest.fixture(scope="module")
def damaged_table(moto_s3) -> str:
    """4 clips of 2 videos, and one row whose video is garbage (the loader skips and counts it)."""
    bucket = f"s3://{moto_s3.new_bucket()}"
    rows = synthetic_corpus(f"{bucket}/raw", moto_s3.storage, videos=2, seconds=3.0, clip_seconds=1.5)
    fs, _ = moto_s3.storage.fsspec(bucket)
    garbage = f"{bucket}/raw/garbage.mp4"
    fs.pipe_file(garbage.removeprefix("s3://"), np.random.default_rng(0).bytes(20_000))
    rows.append(rows[0] | {"clip_id": "garbage", "video_uri": garbage})
    write_clip_table(f"{bucket}/clips.lance", rows, moto_s3.storage)
    return bucket


@pytest.fixture(scope="module")
def ray_node(prometheus: Prometheus) -> Iterator[dict]:
    """A real Ray head on 127.0.0.1 (this process its driver), its metrics agent exporting on a free port as
    `ray start --metrics-export-port` does on each of the run's pods, in Prometheus' Ray target folder with
    the target labels the PodMonitor's second endpoint attaches. No task runs on it: its node, resource and
    object-store series are there from the start. The run's ranks do not train on it (the module's run uses
    the default launcher); its series stand for those of the run's pod."""
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv(ray_launcher.LOCAL_ONLY, "0")
        env.delenv("RAY_ADDRESS", raising=False)
        import ray

        ray.init(
            address="local",  # not a Ray that another test or job left running on this host
            num_cpus=RAY_CPUS,
            include_dashboard=False,  # the head's dashboard; the metrics agent runs on every node regardless
            object_store_memory=ray_launcher.LOCAL_OBJECT_STORE_BYTES,
            logging_level=logging.WARNING,
            _metrics_export_port=port,  # ray.init's name for `ray start --metrics-export-port`
        )
        labels = {"job": JOB, **POD_TARGET, "endpoint": "metrics", "exporter": "ray"}
        target = write_target(JOB, "127.0.0.1", port, labels, prometheus.ray_targets_dir)
        try:
            yield {"port": port, "version": ray.__version__}
        finally:
            target.unlink(missing_ok=True)
            ray.shutdown()


@pytest.fixture(scope="module")
def recorded_dcgm_exporter(prometheus: Prometheus) -> Iterator[None]:
    """dcgm-exporter's endpoint of the run's node: a recorded sample (no GPU here) served over HTTP, in
    Prometheus' dcgm target folder with the target labels its chart's ServiceMonitor attaches (the exporter
    pod's own namespace, pod and container)."""
    server = serve_file(DATA / "dcgm-exporter.prom")
    write_target(
        "dcgm",
        "127.0.0.1",
        server.server_port,
        {
            "job": "nvidia-dcgm-exporter",
            "namespace": "gpu-operator",
            "pod": "nvidia-dcgm-exporter-x7k2p",
            "container": "nvidia-dcgm-exporter",
            "endpoint": "gpu-metrics",
            "service": "nvidia-dcgm-exporter",
        },
        prometheus.dcgm_targets_dir,
    )
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def serve_file(path: Path) -> ThreadingHTTPServer:
    """`path` as a Prometheus text endpoint on 127.0.0.1 (any URL path), in a thread."""
    body = path.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def run(
    prometheus: Prometheus,
    ray_node: dict,
    recorded_dcgm_exporter,
    moto_s3,
    damaged_table: str,
    tmp_path_factory,
) -> Iterator[dict]:
    """`jobs/launch.py` training until stopped, its node endpoint in Prometheus' target folder with a worker
    pod's target labels; yields once Prometheus holds several scrapes with checkpoints and a skipped clip, the
    GPU join has the run's GPUs and Ray's node metrics are in (Ray starts its metrics agent meanwhile)."""
    folder = tmp_path_factory.mktemp("run")
    port = free_port()
    args = [
        f"stage={STAGE}",
        "model=tiny",
        "gpus_per_node=2",
        f"job_name={JOB}",
        f"data.table={damaged_table}/clips.lance",
        f"checkpoint.run_dir={damaged_table}/runs/{JOB}",
        f"checkpoint.every={CHECKPOINT_EVERY}",
        "data.frames=4",
        "data.fps=4",
        "train.global_batch=2",
        "train.steps=100000",  # runs until the fixture stops it
        f"metrics.port={port}",
        "metrics.gpu=cpu",  # a made-up peak, so that CPU ranks report MFU
        "metrics.gpu_peak_flops.cpu=1e11",
    ]
    env = os.environ | moto_s3.env | {"PYTHONPATH": str(ROOT), "TMPDIR": str(folder), "OMP_NUM_THREADS": "1"}
    log = (folder / "train.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "launch.py"), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the elastic agent and both ranks stop together
    )
    labels = {"job": JOB, **POD_TARGET, "endpoint": "svd-metrics"}
    target = write_target(JOB, "127.0.0.1", port, labels, prometheus.targets_dir)
    eval_port, stop_watch = free_port(), StopRequest()
    watcher = threading.Thread(
        target=watch_the_run,
        args=(f"{damaged_table}/runs/{JOB}", eval_port, stop_watch, moto_s3),
        daemon=True,
    )
    watcher.start()
    # The watch is a release of its own (its `up` says so); its series keep the run's job (honorLabels)
    eval_labels = {"job": f"{JOB}-eval", **EVAL_POD_TARGET, "endpoint": "svd-metrics"}
    eval_target = write_target(f"{JOB}-eval", "127.0.0.1", eval_port, eval_labels, prometheus.targets_dir)

    checkpoint_late = next(r["expr"] for r in alert_rules() if r.get("alert") == "SVDCheckpointLate")

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(
                f"training exited with {process.returncode}: {(folder / 'train.log').read_text()}"
            )
        saves = prometheus.query(f'min(svd_checkpoint_save_seconds_count{{job="{JOB}"}}) >= 2')
        # an asynchronous save is counted when it starts, its step set when it commits (later, on a busy host)
        committed = prometheus.query(f'min(svd_checkpoint_step{{job="{JOB}"}}) >= {2 * CHECKPOINT_EVERY}')
        skipped = prometheus.query(f'svd_data_skipped_total{{job="{JOB}"}}')
        scrapes = prometheus.query(f'min(count_over_time(svd_step{{job="{JOB}"}}[1m])) >= 5')
        gpus = prometheus.query(f'svd:gpu_utilization:ratio{{job="{JOB}"}}')
        ray_memory = prometheus.query(f'ray_node_mem_used{{job="{JOB}"}}')
        evaluated = prometheus.query(f'svd_eval_metric{{job="{JOB}"}}')
        assert watcher.is_alive(), "the evaluation watch ended (its error is above)"
        # The watch evaluates on the training's two cores here (on a cluster it has nodes of its own), which
        # can hold up the commit of a due checkpoint for a while: the run is ready once it has caught up
        late = prometheus.query(checkpoint_late)
        ready = saves and committed and skipped and scrapes and gpus and ray_memory and evaluated
        return bool(ready and not late)

    what = (
        f"two committed checkpoints, a skipped clip, 5 scrapes, the GPUs of {JOB}, Ray's node metrics and an "
        "evaluated checkpoint, with no checkpoint late"
    )
    try:
        # over 2 min at a load of 25 on 2 cores (150 s timed out there): the loader's workers start slowly
        wait_until(ready, 300, f"{what} (Ray's: ray[default] installed? its metrics agent exports them)")
        yield {"port": port, "node": socket.gethostname(), "ray": ray_node}
    finally:
        target.unlink(missing_ok=True)
        eval_target.unlink(missing_ok=True)
        stop_watch.set()
        watcher.join(timeout=120)
        stop_group(process)
        log.close()


def watch_the_run(run_dir: str, port: int, stop: StopRequest, store) -> None:
    """`jobs/evaluate.py watch=true` on the run (motion adherence of 2 prompts, in this process): once a
    checkpoint is committed, the watch evaluates what is committed at its first look, serves the gauges, and
    looks again only after an hour (each evaluation takes CPU from the training the fixture waits for)."""
    from svd.eval.job import EvaluateSettings
    from svd.eval.protocol import load_protocol
    from svd.eval.share import open_evaluation
    from svd.eval.watch import watch
    from svd.train.trained import committed_steps

    small = ["samples=2", "shard_size=2", "frames=4", "fps=4", "sampler_steps=2", "motion_buckets=[0,255]"]
    # the run's table has no held-out split: prompts, and the table's clips as the references
    prompts = f"{run_dir}/eval-prompts.txt"
    fs, path = store.storage.fsspec(prompts)
    fs.pipe_file(path, b"a red ball rolls\na boat on a lake\n")
    small += [
        "conditions=prompts",
        f"prompts={prompts}",
        f"references={run_dir.split('/runs/')[0]}/clips.lance",
    ]
    settings = EvaluateSettings(run=run_dir, watch=True, poll_s=1.0, metrics_port=port)
    evaluation = open_evaluation(
        settings, load_protocol("motion_adherence", small), store.storage, rank=0, world_size=1, local_rank=0
    )
    while not committed_steps(run_dir, store.storage):
        if stop.is_set():
            return
        time.sleep(1.0)
    watch(evaluation, poll_s=3600, metrics_port=port, stop=stop, say=lambda line: None)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the launcher's process group (its elastic agent stops the ranks), SIGKILL if it lingers."""
    for sig, timeout in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            break
        try:
            process.wait(timeout=timeout)
            break
        except subprocess.TimeoutExpired:
            continue


def values_by_rank(prometheus: Prometheus, expr: str) -> dict[str, float]:
    return {s["metric"]["rank"]: float(s["value"][1]) for s in prometheus.query(expr)}


def test_every_rank_is_scraped_with_the_runs_labels_and_values(prometheus: Prometheus, run: dict) -> None:
    steps = prometheus.query(f'svd_step{{job="{JOB}"}}')
    assert sorted(s["metric"]["rank"] for s in steps) == ["0", "1"]
    for series in steps:
        labels = series["metric"]
        assert labels | {"rank": "0"} == {
            "__name__": "svd_step",
            "job": JOB,  # the run's own label, and the target's
            "stage": STAGE,
            "rank": "0",
            "node": run["node"],
            "exporter": "svd",
            "instance": f"127.0.0.1:{run['port']}",
            "namespace": NAMESPACE,
            "pod": POD,
            "container": "ray-worker",
            "endpoint": "svd-metrics",
        }
        assert set(labels) - {"__name__"} == KUBERNETES_LABELS  # the label names the promtool tests use
        assert float(series["value"][1]) >= 6  # two checkpoints every 3 steps
    assert values_by_rank(prometheus, f'svd_world_size{{job="{JOB}"}}') == {"0": 2.0, "1": 2.0}
    assert values_by_rank(prometheus, f'svd_checkpoint_interval_steps{{job="{JOB}"}}') == {"0": 3.0, "1": 3.0}
    saved = values_by_rank(prometheus, f'svd_checkpoint_step{{job="{JOB}"}}')
    assert sorted(saved) == ["0", "1"]  # else the checks below hold for no rank at all
    assert all(step >= 6 and step % CHECKPOINT_EVERY == 0 for step in saved.values())
    mfu = values_by_rank(prometheus, f'svd_mfu_ratio{{job="{JOB}"}}')
    assert sorted(mfu) == ["0", "1"]
    assert all(0 < value < 1 for value in mfu.values())
    skipped = prometheus.query(f'sum by (reason) (svd_data_skipped_total{{job="{JOB}"}})')
    assert [s["metric"]["reason"] for s in skipped] == ["corrupt"]
    assert float(skipped[0]["value"][1]) >= 1
    up = prometheus.query(f'up{{job="{JOB}", exporter="svd"}}')
    assert [float(s["value"][1]) for s in up] == [1.0]


def test_rays_own_metrics_are_scraped_beside_the_runs_with_its_pod_and_job(
    prometheus: Prometheus, run: dict
) -> None:
    """Ray's metrics agent on its metrics export port, scraped without honoured labels: its series carry the
    PodMonitor's target labels and Ray's own. Latest values within 30 s, so that one scrape slowed past its
    1 s timeout on a busy machine (its series then go stale) does not empty the query."""
    ray = run["ray"]
    up = prometheus.query(f'max_over_time(up{{job="{JOB}", exporter="ray"}}[30s])')
    assert [(s["metric"]["endpoint"], float(s["value"][1])) for s in up] == [("metrics", 1.0)]
    node = f'job="{JOB}", namespace="{NAMESPACE}", pod="{POD}", container="ray-worker", endpoint="metrics"'
    (used,) = prometheus.query(f"last_over_time(ray_node_mem_used{{{node}}}[30s])")
    labels = used["metric"]
    assert (labels["exporter"], labels["instance"]) == ("ray", f"127.0.0.1:{ray['port']}")
    assert (labels["Version"], labels["IsHeadNode"], labels["ip"]) == (ray["version"], "true", "127.0.0.1")
    (total,) = prometheus.query(f"last_over_time(ray_node_mem_total{{{node}}}[30s])")
    assert 0 < float(used["value"][1]) < float(total["value"][1])
    # available + used of each resource: what the fixture gave the head
    resources = f"sum by (Name) (last_over_time(ray_resources{{{node}}}[30s]))"
    totals = {s["metric"]["Name"]: float(s["value"][1]) for s in prometheus.query(resources)}
    assert totals["CPU"] == RAY_CPUS
    assert totals["object_store_memory"] == ray_launcher.LOCAL_OBJECT_STORE_BYTES


def test_the_gpus_of_the_runs_pod_are_joined_to_the_run_and_no_other(
    prometheus: Prometheus, run: dict
) -> None:
    """dcgm-exporter scraped without honoured labels: the pod using a GPU is in exported_pod."""
    joined = prometheus.query(f'svd:gpu_memory_used:bytes{{job="{JOB}"}}')
    assert sorted(s["metric"]["gpu"] for s in joined) == ["0", "1"]  # GPU 2 is idle: no pod
    for series in joined:
        assert (series["metric"]["namespace"], series["metric"]["pod"]) == (NAMESPACE, POD)
        assert (series["metric"]["stage"], series["metric"]["node"]) == (STAGE, run["node"])
    assert {s["metric"]["gpu"]: float(s["value"][1]) for s in joined} == {
        "0": 71790 * 2**20,
        "1": 71526 * 2**20,
    }


def test_every_dashboard_query_returns_data_for_the_run(prometheus: Prometheus, run: dict) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard, JOB, STAGE)
    assert len(queries) >= 15
    empty = {name: expr for name, expr in queries.items() if not prometheus.query(expr)}
    assert empty == {}


def test_the_dashboard_variables_list_the_run_and_its_stage(prometheus: Prometheus, run: dict) -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    # label_values(metric{selector}, label) is Grafana's: the values of `label` among the series it selects,
    # here with the namespace and the run chosen and the other variables on All
    chosen = {"$namespace": NAMESPACE, "$job": JOB, "$stage": ".*"}
    found = {}
    for name in ("namespace", "job", "stage", "rank", "node"):
        definition = variables[name]["definition"]
        selector, label = definition.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        for variable, value in chosen.items():
            selector = selector.replace(variable, value)
        found[name] = sorted(
            {s["metric"][label] for s in prometheus.query(f"count by ({label}) ({selector})")}
        )
    assert NAMESPACE in found["namespace"]
    assert JOB in found["job"]
    assert (found["stage"], found["rank"], found["node"]) == ([STAGE], ["0", "1"], [run["node"]])


def test_every_alert_expression_evaluates_and_finds_the_runs_series(
    prometheus: Prometheus, run: dict
) -> None:
    rules = alert_rules()
    assert len([r for r in rules if "alert" in r]) == 11
    for rule in rules:
        prometheus.query(rule["expr"])  # raises on any PromQL error
    # with comparisons made `bool`, each alert returns its outcome for every series it watches
    quiet = {
        r.get("alert", r.get("record")): r["expr"] for r in rules if not prometheus.query(measured(r["expr"]))
    }
    assert quiet == {}


def test_a_healthy_run_triggers_none_of_the_failure_alerts(prometheus: Prometheus, run: dict) -> None:
    rules = {r["alert"]: r["expr"] for r in alert_rules() if "alert" in r}
    firing = {name: prometheus.query(rules[name]) for name in FAILURE_ALERTS}
    assert firing == {name: [] for name in FAILURE_ALERTS}
    outcomes = prometheus.query(measured(rules["SVDCheckpointLate"]))
    assert [float(s["value"][1]) for s in outcomes] == [0.0]


def test_a_wrong_expression_is_an_error_not_an_empty_result(prometheus: Prometheus) -> None:
    with pytest.raises(QueryError, match="parse error"):
        prometheus.query("sum by (job) (rate(svd_step_seconds_sum[5m])")
