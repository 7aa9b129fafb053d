"""Experiment tracking: what researchers compare across runs, in TensorBoard, Weights & Biases or MLflow.

    tracker = Tracker.for_run(cfg, files, table_version, metrics)   # rank 0; None when `tracking` is empty
    tracker.log(Record("train", step, {"loss": …, "grad_norm": …}))  # returns at once
    tracker.log(Record("validation", step, losses))
    tracker.log(Record("preview", step, video=gif_bytes))
    tracker.close()                                                   # waits tracker.close_timeout_s at most

Prometheus tells an operator whether a job is healthy; these tell a researcher how a run compares with
others: loss curves, validation at fixed σ, preview videos, the resolved config as hyper-parameters and the
run's lineage (table version, code version) as tags.

Training never waits for a tracker (DESIGN decision 12). `log` puts a record on a bounded queue and returns;
one background thread opens the backends (their imports, W&B's service process, an MLflow server's first
request all happen there) and delivers each record to each. A record that finds the queue full is dropped;
a backend call that fails is not retried in place (a server that is down would hold every later record): the
backend is closed and opened again on a later record, at most every RETRY_S seconds, and the records it missed
meanwhile are counted as failures. Both are counted in Prometheus (`svd_tracking_failures_total{backend}`,
`svd_tracking_dropped_total`) and said once, in one line per backend.

A resumed run, on any world size, continues the same tracked run: its id is kept in `<run_dir>/tracking.json`
with, per backend and kind of record, the last step delivered. Steps at or below it are not sent again (a run
that resumes from a checkpoint older than its last logged step trains those steps again), so every value is
logged once per step.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from svd.config import RunConfig, setting, to_yaml
from svd.train.resume import setting_keys
from svd.train.run_files import RunFiles
from svd.version import code_version

STATE_FILE = "tracking.json"
RETRY_S = 30.0  # a backend that failed is opened again after this long, on the next record


@dataclass(frozen=True)
class Record:
    """What rank 0 logs at one step: scalars (`<kind>/<name>` in every backend), or a preview video."""

    kind: str  # train | validation | preview | config
    step: int
    scalars: Mapping[str, float] = field(default_factory=dict)
    video: bytes | None = None  # an animated GIF: every backend shows it as a video


@dataclass(frozen=True)
class TrackedRun:
    """What every backend is told about the run when it opens it."""

    id: str  # the same across resumes: W&B's run id, MLflow's `svd.tracking_id` tag, TensorBoard's folder
    name: str  # the job name
    project: str
    dir: Path  # tracker.dir
    config: dict[str, Any]  # the resolved config, flattened to dotted keys
    config_yaml: str
    tags: dict[str, str]  # lineage
    # What this writer logs of the run: "" for training; another process's part (the evaluation's
    # "eval-<protocol>", svd/eval/tracking.py) joins the run without changing its status or tags, in a
    # TensorBoard folder of its own and, on W&B, a run of its own in the training run's group
    part: str = ""


class Backend(Protocol):
    name: str

    def open(self, run: TrackedRun) -> None: ...

    def log(self, record: Record) -> None: ...

    def close(self) -> None: ...


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as {dotted key: value}, every setting once; a list or dict as its JSON text."""
    values = {key: setting(cfg, key) for key in setting_keys(RunConfig)}
    return {
        k: v if v is None or isinstance(v, bool | int | float | str) else json.dumps(v)
        for k, v in values.items()
    }


class Tracker:
    """Rank 0's tracking: `log` never blocks and never raises; a background thread delivers."""

    def __init__(
        self,
        run: TrackedRun,
        backends: list[Backend],
        *,
        logged: Mapping[str, Mapping[str, int]] | None = None,
        save_logged: Callable[[dict[str, dict[str, int]]], None] = lambda _: None,
        queue_size: int = 1000,
        close_timeout_s: float = 60.0,
        on_failure: Callable[[str], None] = lambda _: None,
        on_dropped: Callable[[], None] = lambda: None,
        warn: Callable[[str], None] = _warn,
        retry_s: float = RETRY_S,
    ):
        self.run = run
        self.backends = backends
        # backend → kind → the last step delivered (this run's and its predecessors')
        self.logged: dict[str, dict[str, int]] = defaultdict(
            dict, {k: dict(v) for k, v in (logged or {}).items()}
        )
        self.failures: dict[str, int] = defaultdict(int)
        self.dropped = 0
        self._save_logged, self._on_failure, self._on_dropped, self._warn = (
            save_logged,
            on_failure,
            on_dropped,
            warn,
        )
        self._close_timeout_s, self._retry_s = close_timeout_s, retry_s
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=queue_size)
        self._open: set[str] = set()
        self._next_try: dict[str, float] = {}
        self._reported: set[str] = set()
        self._thread = threading.Thread(target=self._deliver_all, name="svd-tracking", daemon=True)
        self._thread.start()

    @classmethod
    def for_run(
        cls, cfg: RunConfig, files: RunFiles, table_version: int | None, metrics: Any = None
    ) -> Tracker | None:
        """The tracker of `cfg.tracking` (None when empty), continuing the run that `<run_dir>/tracking.json`
        names, else a new one whose id it records there. A run directory that cannot be read or written
        costs the tracking, never the run."""
        if not cfg.tracking:
            return None
        try:
            state = json.loads(files.read(STATE_FILE) or "{}")
            if "id" not in state:
                state = {"id": new_run_id(cfg.job_name), "logged": {}}
                files.write(STATE_FILE, json.dumps(state))
        except Exception as e:  # storage trouble: training goes on, untracked
            _warn(f"tracking: off for this run, {files.uri(STATE_FILE)} cannot be read or written ({e})")
            return None
        run = tracked_run(cfg, state["id"], table_version)

        def save_logged(logged: dict[str, dict[str, int]]) -> None:
            files.write(STATE_FILE, json.dumps({"id": run.id, "logged": logged}))

        return cls(
            run,
            [BACKENDS[name](cfg) for name in cfg.tracking],
            logged=state.get("logged", {}),
            save_logged=save_logged,
            queue_size=cfg.tracker.queue,
            close_timeout_s=cfg.tracker.close_timeout_s,
            on_failure=metrics.observe_tracking_failure if metrics else lambda _: None,
            on_dropped=metrics.observe_tracking_dropped if metrics else lambda: None,
        )

    def log(self, record: Record) -> None:
        """Queue `record` for every backend; a full queue drops it (counted, said once)."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._on_dropped()
            self._report_once(
                "queue",
                f"tracking: the queue of {self._queue.maxsize} records is full (the trackers are slower than "
                "training); records are dropped and counted in svd_tracking_dropped_total",
            )

    def close(self) -> None:
        """Deliver what is queued, within `close_timeout_s`, then close the backends."""
        deadline = time.monotonic() + self._close_timeout_s
        with contextlib.suppress(queue.Full):  # the thread is stuck: reported below
            self._queue.put(None, timeout=self._close_timeout_s)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._warn(
                f"tracking: {self._queue.qsize()} records were not delivered within "
                f"tracker.close_timeout_s={self._close_timeout_s:g}; the run ends without them"
            )

    # ---- the background thread -----------------------------------------------------------------------
    def _deliver_all(self) -> None:
        while (record := self._queue.get()) is not None:
            delivered = [self._deliver(backend, record) for backend in self.backends]
            if any(delivered):
                try:
                    self._save_logged(dict(self.logged))
                except Exception as e:  # the run directory is out of reach: a resume may log a step twice
                    self._fail("run_dir", e)
        for backend in self.backends:
            if backend.name in self._open:
                try:
                    backend.close()
                except Exception as e:
                    self._fail(backend.name, e)

    def _deliver(self, backend: Backend, record: Record) -> bool:
        """True when `backend` took `record`; False when it had it already, or failed (counted)."""
        if record.step <= self.logged[backend.name].get(record.kind, -1):
            return False
        if backend.name not in self._open:
            if time.monotonic() < self._next_try.get(backend.name, 0.0):
                self._fail(backend.name, None)
                return False
            try:
                backend.open(self.run)
            except Exception as e:
                self._next_try[backend.name] = time.monotonic() + self._retry_s
                self._fail(backend.name, e)
                return False
            self._open.add(backend.name)
        try:
            backend.log(record)
        except Exception as e:  # closed now, opened again later: a server that came back gets the rest
            self._open.discard(backend.name)
            self._next_try[backend.name] = time.monotonic() + self._retry_s
            self._fail(backend.name, e)
            with contextlib.suppress(Exception):  # counted above: the backend is broken either way
                backend.close()
            return False
        self.logged[backend.name][record.kind] = record.step
        return True

    def _fail(self, name: str, error: Exception | None) -> None:
        self.failures[name] += 1
        self._on_failure(name)
        if error is not None:
            self._report_once(
                name,
                f"tracking: {name} failed ({first_line(error)}); "
                f"training goes on, retried every {self._retry_s:g} s, failures counted in "
                "svd_tracking_failures_total",
            )

    def _report_once(self, key: str, line: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self._warn(line)


def tracked_run(cfg: RunConfig, run_id: str, table_version: int | None, part: str = "") -> TrackedRun:
    """What the backends are told of tracked run `run_id`, by training or (`part`) by another writer."""
    return TrackedRun(
        id=run_id,
        name=cfg.job_name,
        project=cfg.tracker.project,
        dir=Path(cfg.tracker.dir).resolve(),
        config=flat_config(cfg),
        config_yaml=to_yaml(cfg),
        tags={
            "table": cfg.data.table,
            "table_version": str(table_version),
            "code_version": code_version(),
            "stage": cfg.stage.name,
            "run_dir": cfg.checkpoint.run_dir,
        },
        part=part,
    )


def first_line(error: Exception) -> str:
    """The error in one line; for a client that is not installed, how to install it."""
    text = str(error).strip()
    line = f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
    return f"{line}; pip install 'svd[tracking]'" if isinstance(error, ImportError) else line


def new_run_id(job_name: str) -> str:
    """`<job>-<8 hex>`: readable in a list of runs, unique, and a valid W&B run id."""
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', job_name)[:48]}-{uuid.uuid4().hex[:8]}"


def scalar_name(record: Record, name: str) -> str:
    return f"{record.kind}/{name}"


# ---- backends ---------------------------------------------------------------------------------------------
class TensorBoardBackend:
    """Event files in `<tracker.dir>/tensorboard/<id>/` (torch.utils.tensorboard): scalars, the preview as an
    animated image (TensorBoard's video summary), the config as hyper-parameters and as text."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig):
        self.writer: Any = None

    def open(self, run: TrackedRun) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        # TensorBoard reads a folder's event files one after another, never going back to an earlier one:
        # two processes writing one folder would hide the rest of the first one's records
        folder = run.dir / "tensorboard" / run.id
        self.writer = SummaryWriter(log_dir=str(folder / run.part if run.part else folder))

    def log(self, record: Record) -> None:
        if record.kind == "config":
            self._log_config(record.step)
        for name, value in record.scalars.items():
            self.writer.add_scalar(scalar_name(record, name), value, record.step)
        if record.video is not None:
            self.writer.file_writer.add_summary(
                gif_summary(f"{record.kind}/video", record.video), record.step
            )
        self.writer.flush()  # delivered means on disk: the step is then never sent again

    def _log_config(self, step: int) -> None:
        from torch.utils.tensorboard.summary import hparams

        run = self.run
        values = {k: v if v is not None else "null" for k, v in run.config.items()}
        for summary in hparams(values, {}):
            self.writer.file_writer.add_summary(summary, step)
        self.writer.add_text("config", f"```yaml\n{run.config_yaml}```", step)
        self.writer.add_text("lineage", "\n\n".join(f"{k}: {v}" for k, v in run.tags.items()), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def gif_summary(tag: str, gif: bytes) -> Any:
    """TensorBoard's video summary (what `SummaryWriter.add_video` writes): an image summary holding an
    animated GIF. Built from the GIF the previewer already encoded, without add_video's moviepy."""
    from PIL import Image as PILImage
    from tensorboard.compat.proto.summary_pb2 import Summary

    with PILImage.open(io.BytesIO(gif)) as image:
        width, height = image.size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class WandbBackend:
    """A W&B run whose id is the tracked run's (offline: `<tracker.dir>/wandb/offline-run-*-<id>/`, each
    resume a folder of its own that `wandb sync` appends to the same run)."""

    name = "wandb"

    def __init__(self, cfg: RunConfig):
        self.mode = cfg.tracker.wandb_mode
        self.wandb_run: Any = None

    def open(self, run: TrackedRun) -> None:
        import wandb

        run.dir.mkdir(parents=True, exist_ok=True)
        self.run = run
        # W&B takes one writer per run, whose steps only increase: another part is a run of its own, grouped
        # with the training run (an evaluation logs steps that training has passed)
        self.wandb_run = wandb.init(
            mode=self.mode,
            dir=str(run.dir),
            id=f"{run.id}-{run.part}" if run.part else run.id,
            group=run.id if run.part else None,
            project=run.project,
            name=f"{run.name}-{run.part}" if run.part else run.name,
            config=run.config,
            tags=[f"{k}={v}"[:64] for k, v in run.tags.items()],
            resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, record: Record) -> None:
        import wandb

        if record.kind == "config":
            self.wandb_run.config.update(self.run.config, allow_val_change=True)
            return
        values: dict[str, Any] = {scalar_name(record, k): v for k, v in record.scalars.items()}
        if record.video is not None:
            path = write_preview(self.run, record)
            values[f"{record.kind}/video"] = wandb.Video(str(path), format="gif")  # the GIF has its rate
        self.wandb_run.log(values, step=record.step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


class MlflowBackend:
    """An MLflow run tagged `svd.tracking_id=<id>` in experiment `tracker.project`, on `tracker.mlflow_uri` or
    a file store in `<tracker.dir>/mlflow`."""

    name = "mlflow"
    ID_TAG = "svd.tracking_id"

    def __init__(self, cfg: RunConfig):
        self.uri = cfg.tracker.mlflow_uri
        self.client: Any = None

    def open(self, run: TrackedRun) -> None:
        if not self.uri:
            # MLflow 3 keeps its file store for offline use but asks for this opt-in; a server needs none
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.run = run
        self.client = MlflowClient(tracking_uri=self.uri or (run.dir / "mlflow").as_uri())
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        found = self.client.search_runs([experiment_id], f"tags.`{self.ID_TAG}` = '{run.id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(
                experiment_id, run_name=run.id, tags={self.ID_TAG: run.id}
            ).info.run_id
        if run.part:  # training's run: its status and lineage are training's to set
            return
        self.client.update_run(self.run_id, status="RUNNING")
        for key, value in run.tags.items():
            self.client.set_tag(self.run_id, f"svd.{key}", value)

    def log(self, record: Record) -> None:
        from mlflow.entities import Metric, Param

        if record.kind == "config":
            # parameters are write-once in MLflow: the first run's; a resume's changes are in its config file
            known = self.client.get_run(self.run_id).data.params
            params = [Param(k, str(v)[:6000]) for k, v in self.run.config.items() if k not in known]
            for first in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[first : first + 100])
            self.client.log_text(self.run_id, self.run.config_yaml, f"config/step-{record.step:08d}.yaml")
            return
        now = int(time.time() * 1000)
        metrics = [Metric(scalar_name(record, k), v, now, record.step) for k, v in record.scalars.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        if record.video is not None:
            self.client.log_artifact(self.run_id, str(write_preview(self.run, record)), "previews")

    def close(self) -> None:
        if self.client is not None and not self.run.part:
            self.client.set_terminated(self.run_id)


def write_preview(run: TrackedRun, record: Record) -> Path:
    """The preview GIF as a local file (what W&B and MLflow upload), once for both."""
    path = run.dir / "previews" / run.id / f"{record.kind}-{record.step:08d}.gif"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record.video or b"")
    return path


BACKENDS: dict[str, Callable[[RunConfig], Backend]] = {
    "tensorboard": TensorBoardBackend,
    "wandb": WandbBackend,
    "mlflow": MlflowBackend,
}
