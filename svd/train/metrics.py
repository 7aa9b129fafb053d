"""Training metrics: Prometheus series from every rank, one endpoint per node, and a progress line.

Every rank writes its values with prometheus_client in multiprocess mode (one mmap file per process in a
node-local folder); one process per node serves them all on `metrics.port`, or on the next free port when
another program holds it (a node runs several jobs, or an exporter chose the same port): metrics never stop
training, so a taken port costs one line on stderr, never the run. Each series carries the labels job, stage,
rank and node, so Prometheus sees every rank separately however the processes are placed.

    # launcher, once per node, around the ranks (a folder of its own, removed after them):
    with launch_multiprocess_dir(cfg.metrics.port, job): ...  # a folder of this launch's own
    # every rank (before anything imports prometheus_client):
    metrics = TrainMetrics(cfg.metrics, job=job, stage=stage, rank=rank, node=node, device=device,
                           flops_per_sample=flops_per_sample(fwd_bwd_one_sample))
    server = serve_node_metrics(cfg.metrics.port, metrics.directory) if local_rank == 0 else None  # or None
    progress = ProgressLine(total_steps, cfg.metrics.progress_every) if rank == 0 else None
    ...
    metrics.observe_start(world_size, checkpoint_every, checkpoint_step=resumed_step)
    metrics.observe_step(step, loss, grad_norm, lr, step_seconds, data_wait_seconds, samples)
    metrics.observe_skipped(loader.skipped)
    metrics.observe_checkpoint(seconds)            # or observe_checkpoint_failure() when a save fails
    metrics.observe_checkpoint_committed(step)     # when the checkpoint is complete (async: later)
    metrics.observe_tracking_failure(backend)      # rank 0's tracker (svd/train/tracking.py), from its thread

prometheus_client fixes its mode when it is first imported, from PROMETHEUS_MULTIPROC_DIR. This module
therefore imports it only inside functions, and `TrainMetrics` refuses to start if it finds the mode
already fixed the wrong way (a silent single-process registry would serve nothing).
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from svd.config import METRICS_PORT
from svd.train.file_sd import announce_from_env

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
# metrics.port and the next ports tried in turn when it is taken: a node shared by a few jobs finds one, and
# the range stays small enough to open in a firewall and to find by eye.
PORT_TRIES = 8

T = TypeVar("T")

# Dense (no sparsity) bf16 tensor-core peak per device, FLOP/s, from the vendors' data sheets. A name
# matches when it occurs in `torch.cuda.get_device_name()`; the longest match wins ("H100 PCIe" over "H100").
PEAK_FLOPS: Mapping[str, float] = MappingProxyType(
    {
        "H100": 989e12,  # SXM
        "H100 PCIe": 756e12,
        "H100 NVL": 835e12,
        "H200": 989e12,
        "B200": 2250e12,
        "A100": 312e12,
        "L40S": 362e12,
        "L4": 121e12,
    }
)

LABELS = ("job", "stage", "rank", "node")
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, float("inf"))
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, float("inf"))
SAVE_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))


@dataclass(frozen=True)
class MetricsConfig:
    """Where metrics go. `port=0` turns the endpoint (and multiprocess files) off; `gpu` names the
    `peak_flops` entry for MFU, else it is found from the CUDA device name (on CPU: no MFU unless set)."""

    port: int = METRICS_PORT
    progress_every: int = 10
    multiproc_dir: str | None = None
    gpu: str | None = None
    peak_flops: dict[str, float] = field(default_factory=lambda: dict(PEAK_FLOPS))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics.port={self.port} must be in 0..65535 (0 = no endpoint)")
        if self.progress_every < 1:
            raise ValueError(f"metrics.progress_every={self.progress_every} must be ≥ 1")
        for name, peak in self.peak_flops.items():
            if not peak > 0:
                raise ValueError(f"metrics.peak_flops[{name!r}]={peak} must be > 0")
        if self.gpu is not None and self.gpu not in self.peak_flops:
            raise ValueError(
                f"metrics.gpu={self.gpu!r} is not in metrics.peak_flops {sorted(self.peak_flops)}"
            )

    def directory(self, job: str) -> Path:
        """The node-local folder of the multiprocess files: `multiproc_dir`, else one per job under the
        temporary directory (Slurm and Kubernetes point TMPDIR at the job's local scratch)."""
        if self.multiproc_dir is not None:
            return Path(self.multiproc_dir)
        return Path(tempfile.gettempdir()) / "svd-metrics" / job

    def device_peak_flops(self, device: torch.device) -> float | None:
        """Peak FLOP/s of one device, or None when unknown (then MFU is not reported)."""
        if self.gpu is not None:
            return self.peak_flops[self.gpu]
        if device.type != "cuda":
            return None
        return match_device_name(torch.cuda.get_device_name(device), self.peak_flops)


def match_device_name(device_name: str, table: Mapping[str, T]) -> T | None:
    """The entry of `table` whose key is the longest one found in `device_name` (case-insensitive): a
    CUDA device name ("NVIDIA H100 PCIe") to what is known of its kind."""
    found = [key for key in table if key.lower() in device_name.lower()]
    return table[max(found, key=len)] if found else None


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Create `path` empty, and export it to the ranks this process starts. Call it once per node in the
    launching parent, before any rank starts: files of dead processes would otherwise be served again,
    and clearing it under running ranks would lose their values."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV_DIR] = str(path)
    return path


@contextmanager
def launch_multiprocess_dir(port: int, job: str) -> Iterator[Path | None]:
    """This node's metrics folder for one launch, `<tmp>/svd-metrics/<job>-<launch>` (None with the endpoint
    off: `port` 0). Unique per launch: two runs of one job name on a host (a retry beside a hung run, two
    users' demos) would otherwise clear and serve each other's values. It stays after the launch, holding
    the run's last values for a look afterwards (`latest_multiprocess_dir`); the temporary directory's own
    cleaning removes it."""
    if not port:
        yield None
        return
    before = os.environ.get(ENV_DIR)
    yield prepare_multiprocess_dir(MetricsConfig(port=port).directory(f"{job}-{uuid.uuid4().hex[:8]}"))
    if before is None:
        os.environ.pop(ENV_DIR, None)
    else:
        os.environ[ENV_DIR] = before


def latest_multiprocess_dir(job: str) -> Path | None:
    """The metrics folder of this host's latest launch of `job`, or None."""
    folders = list(MetricsConfig(port=1).directory(job).parent.glob(f"{job}-*"))
    return max(folders, key=lambda folder: folder.stat().st_mtime, default=None)


class MetricsServer:
    """An HTTP endpoint serving one registry; `close()` stops it and frees the port."""

    def __init__(self, port: int, registry: Any, addr: str) -> None:
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port = port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_node_metrics(
    port: int,
    multiproc_dir: str | Path | None,
    addr: str = "0.0.0.0",
    tries: int = PORT_TRIES,
    warn: Callable[[str], None] = _warn,
) -> MetricsServer | None:
    """Serve all ranks of this node (call on local rank 0 only) on `port`, else on the first free one of the
    next `tries - 1` ports (`serve_metrics`).

    None when `port` is 0, or when no endpoint could start: it never raises, because this runs on one rank
    of the node only, and a rank that stopped here would leave the others waiting in a collective."""
    if port == 0:
        return None
    if multiproc_dir is None or not Path(multiproc_dir).is_dir():
        warn(
            f"metrics: the multiprocess folder {multiproc_dir} does not exist; training goes on without "
            f"a metrics endpoint on this node"
        )
        return None
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()  # fresh: only the files, never this process's own registry twice
    MultiProcessCollector(registry, path=str(multiproc_dir))
    return serve_metrics(port, registry, addr, tries, warn, what="training")


def serve_metrics(
    port: int,
    registry: Any,
    addr: str = "0.0.0.0",
    tries: int = PORT_TRIES,
    warn: Callable[[str], None] = _warn,
    *,
    what: str = "training",
) -> MetricsServer | None:
    """Serve `registry` on `port` or the first free one of the next `tries - 1`, then announce the port
    where a launcher asked (Prometheus file_sd). Never raises: `what` goes on without an endpoint, and
    anything but the configured port is said once, in one line through `warn`."""
    last = min(port + tries - 1, 65535)
    for candidate in range(port, last + 1):
        try:
            server = MetricsServer(candidate, registry, addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                continue
            warn(
                f"metrics: cannot serve on {addr}:{candidate} ({e.strerror or e}); {what} goes on without "
                f"a metrics endpoint on this node"
            )
            return None
        if candidate != port:
            warn(f"metrics: port {port} is taken; serving on {candidate}")
        try:
            announce_from_env(candidate)
        except OSError as e:  # a shared folder out of reach: Prometheus misses this node, training goes on
            warn(f"metrics: serving on {candidate}, but cannot announce it to Prometheus: {e}")
        return server
    warn(
        f"metrics: ports {port}-{last} are all taken; {what} goes on without a metrics endpoint on this "
        f"node (set metrics.port to a free range)"
    )
    return None


def _use_multiprocess_dir(path: Path) -> Path:
    """Point this process at the node's folder unless the launcher already did; return the folder in use.
    Refuses if prometheus_client was already imported in single-process mode: this rank's values would
    then never reach the node's endpoint."""
    if "prometheus_client" in sys.modules:
        from prometheus_client import values

        if not values.ValueClass._multiprocess:
            raise RuntimeError(
                f"prometheus_client was imported before {ENV_DIR} was set, so this rank's metrics would "
                f"never reach the node endpoint; build TrainMetrics before anything imports prometheus_client"
            )
    else:
        os.environ.setdefault(ENV_DIR, str(path))
    directory = Path(os.environ[ENV_DIR])
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def flops_per_sample(fn: Callable[..., Any], *args: Any, samples: int = 1) -> float:
    """FLOPs of `fn(*args)` counted by PyTorch's FlopCounterMode, divided by `samples`. Pass a closure that
    runs the model's forward and backward on a batch of `samples` samples: counting the real model catches
    every layer a hand formula would miss."""
    if samples < 1:
        raise ValueError(f"samples={samples} must be ≥ 1")
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / samples


class TrainMetrics:
    """One rank's Prometheus series, all labelled job, stage, rank, node.

    Gauges use multiprocess mode "mostrecent": the rank label already keeps ranks apart, so no pid label
    is needed, and a restarted rank's value replaces its predecessor's. Counters and histograms add up
    over the processes that held the same labels, so a restarted rank continues its totals.
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        job: str,
        stage: str,
        rank: int,
        node: str,
        device: torch.device | None = None,
        flops_per_sample: float | None = None,
    ) -> None:
        # The folder this rank writes to (None: no endpoint, values stay in this process).
        self.directory = _use_multiprocess_dir(cfg.directory(job)) if cfg.port else None
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.device = device or torch.device("cpu")
        self.flops_per_sample = flops_per_sample
        self.peak_flops = cfg.device_peak_flops(self.device)
        self.registry = CollectorRegistry()  # own registry: several instances in one process never clash
        labels = {"job": job, "stage": stage, "rank": str(rank), "node": node}

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            metric = Gauge(
                name, doc, (*LABELS, *extra), registry=self.registry, multiprocess_mode="mostrecent"
            )
            return metric.labels(**labels) if not extra else metric

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, LABELS, registry=self.registry, buckets=buckets).labels(**labels)

        self._labels = labels
        self.step = gauge("svd_step", "Last completed optimizer step.")
        # Wall-clock time of the last step: "stalled" and "rank missing" alerts compare it with time(), since
        # a dead rank's gauges stay in its file and the node keeps serving them.
        self.step_time = gauge("svd_step_timestamp_seconds", "Unix time at which the last step completed.")
        self.world_size = gauge("svd_world_size", "Ranks in the job (fewer reporting: a rank is missing).")
        self.loss = gauge("svd_loss", "Training loss of the last step (this rank's batch).")
        self.grad_norm = gauge("svd_grad_norm", "Global gradient norm of the last step, before clipping.")
        self.lr = gauge("svd_learning_rate", "Learning rate of the last step.")
        self.samples_per_second = gauge("svd_samples_per_second", "This rank's samples / step time.")
        # No series at all when MFU cannot be computed: a 0 would read as an idle device.
        self.mfu = (
            gauge(
                "svd_mfu_ratio", "Model FLOPs utilisation: FLOPs per sample × samples/s ÷ device peak (0-1)."
            )
            if flops_per_sample is not None and self.peak_flops is not None
            else None
        )
        self.memory = gauge("svd_memory_bytes", "Peak memory: cuda_max_allocated, rss_max.", ("kind",))
        self.step_seconds = histogram("svd_step_seconds", "Wall time of a training step.", STEP_BUCKETS)
        self.data_wait = histogram("svd_data_wait_seconds", "Time a step waited for its batch.", WAIT_BUCKETS)
        self.checkpoint_seconds = histogram(
            "svd_checkpoint_save_seconds", "Checkpoint save time.", SAVE_BUCKETS
        )
        # svd_step − svd_checkpoint_step exceeds the interval only when a due checkpoint was not saved.
        self.checkpoint_step = gauge("svd_checkpoint_step", "Step of the last checkpoint saved or restored.")
        self.checkpoint_interval = gauge("svd_checkpoint_interval_steps", "Steps between checkpoints.")
        self.checkpoint_failures = Counter(
            "svd_checkpoint_failures", "Checkpoint saves that failed.", LABELS, registry=self.registry
        ).labels(**labels)
        self.nonfinite_steps = Counter(
            "svd_nonfinite_steps",
            "Steps skipped because their loss or gradient norm was not finite.",
            LABELS,
            registry=self.registry,
        ).labels(**labels)
        self.samples = Counter("svd_samples", "Samples trained on.", LABELS, registry=self.registry).labels(
            **labels
        )
        self.skipped = Counter(
            "svd_data_skipped",
            "Clips skipped by the loader, by reason.",
            (*LABELS, "reason"),
            registry=self.registry,
        )
        self._skipped_seen: dict[str, int] = {}
        # Experiment tracking (rank 0, svd/train/tracking.py): records a backend did not take, and records
        # dropped because the trackers fell behind. Training never waits for them.
        self.tracking_failures = Counter(
            "svd_tracking_failures",
            "Tracking records a backend (or run_dir, for the tracking state) failed to take.",
            (*LABELS, "backend"),
            registry=self.registry,
        )
        self.tracking_dropped = Counter(
            "svd_tracking_dropped",
            "Tracking records dropped: the queue was full.",
            LABELS,
            registry=self.registry,
        ).labels(**labels)

    def observe_start(self, world_size: int, checkpoint_every: int, checkpoint_step: int | None) -> None:
        """The run's shape, once before the first step; `checkpoint_step` is the step resumed from."""
        self.world_size.set(world_size)
        self.checkpoint_interval.set(checkpoint_every)
        self.checkpoint_step.set(checkpoint_step or 0)

    def observe_step(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        lr: float,
        step_seconds: float,
        data_wait_seconds: float,
        samples: int,
    ) -> None:
        """One optimizer step: `samples` is this rank's batch; `step_seconds` includes the data wait."""
        if not step_seconds > 0:
            raise ValueError(f"step_seconds={step_seconds} must be > 0")
        throughput = samples / step_seconds
        self.step.set(step)
        self.step_time.set_to_current_time()
        self.loss.set(loss)
        self.grad_norm.set(grad_norm)
        self.lr.set(lr)
        self.step_seconds.observe(step_seconds)
        self.data_wait.observe(data_wait_seconds)
        self.samples.inc(samples)
        self.samples_per_second.set(throughput)
        if self.mfu is not None:
            self.mfu.set(self.flops_per_sample * throughput / self.peak_flops)
        self._observe_memory()

    def observe_checkpoint(self, seconds: float) -> None:
        """A save that blocked training `seconds` (async saves: their failure shows at the next)."""
        self.checkpoint_seconds.observe(seconds)

    def observe_checkpoint_committed(self, step: int) -> None:
        """The checkpoint of `step` is complete: a run restarted now resumes from it. Not when its save
        starts: an asynchronous save that then fails must leave the step of the last good one."""
        self.checkpoint_step.set(step)

    def observe_checkpoint_failure(self) -> None:
        self.checkpoint_failures.inc()

    def observe_nonfinite_step(self) -> None:
        self.nonfinite_steps.inc()

    def observe_tracking_failure(self, backend: str) -> None:
        self.tracking_failures.labels(**self._labels, backend=backend).inc()

    def observe_tracking_dropped(self) -> None:
        self.tracking_dropped.inc()

    def observe_skipped(self, totals: Mapping[str, int]) -> None:
        """Add what is new in the loader's running totals by reason (`ClipLoader.skipped`) since the last
        call, so it may be called every step or every N steps. A total that went down means a new loader
        started counting from zero: all of it is new."""
        for reason, total in totals.items():
            seen = self._skipped_seen.get(reason, 0)
            new = total - seen if total >= seen else total
            if new:
                self.skipped.labels(**self._labels, reason=reason).inc(new)
            self._skipped_seen[reason] = total

    def _observe_memory(self) -> None:
        if self.device.type == "cuda":
            self.memory.labels(**self._labels, kind="cuda_max_allocated").set(
                torch.cuda.max_memory_allocated(self.device)
            )
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.memory.labels(**self._labels, kind="rss_max").set(rss_kib * 1024)


class ProgressLine:
    """Rank 0's line every `every` steps: `step 120/1000  loss 0.1234  12.3 samples/s  data 4%  ETA 0:03:21`.
    Loss, throughput and data-wait share are over the window since the last line; the ETA is the window's
    mean step time × the steps left. Times are passed in, so the line never reads a clock."""

    def __init__(self, total_steps: int, every: int, write: Callable[[str], None] = print) -> None:
        if every < 1:
            raise ValueError(f"progress line every={every} steps must be ≥ 1")
        self.total_steps = total_steps
        self.every = every
        self.write = write
        self._reset()

    def _reset(self) -> None:
        self._steps = 0
        self._loss = 0.0
        self._samples = 0
        self._seconds = 0.0
        self._wait = 0.0

    def update(
        self, step: int, loss: float, samples: int, step_seconds: float, data_wait_seconds: float
    ) -> str | None:
        """Add a finished step; write and return the line when `step` is a multiple of `every` or the last."""
        if not step_seconds > 0:
            raise ValueError(f"step_seconds={step_seconds} must be > 0")
        self._steps += 1
        self._loss += loss
        self._samples += samples
        self._seconds += step_seconds
        self._wait += data_wait_seconds
        if step % self.every and step != self.total_steps:
            return None
        eta = self._seconds / self._steps * max(self.total_steps - step, 0)
        line = (
            f"step {step}/{self.total_steps}  loss {self._loss / self._steps:.4f}  "
            f"{self._samples / self._seconds:.1f} samples/s  data {self._wait / self._seconds:.0%}  "
            f"ETA {format_duration(eta)}"
        )
        self._reset()
        self.write(line)
        return line


def format_duration(seconds: float) -> str:
    """H:MM:SS with unbounded hours (a long run's ETA stays one field)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
