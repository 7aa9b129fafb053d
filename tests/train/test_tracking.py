"""The tracker's promises without a training run: it never blocks or raises into training, it counts and
reports each failure once, it never sends a step twice, and a backend that failed is opened again later."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from svd.config import compose
from svd.data.local_s3 import free_port
from svd.train.metrics import MetricsConfig, TrainMetrics
from svd.train.tracking import BACKENDS, Record, TrackedRun, Tracker, flat_config

TABLE = "data.table=s3://bucket/clips.lance"


class Taking:
    """A backend that keeps what it is given; `gate` (when set) holds each call until it opens."""

    def __init__(self, name: str = "taking", gate: threading.Event | None = None, fail_opens: int = 0):
        self.name, self.gate, self.fail_opens = name, gate, fail_opens
        self.records: list[Record] = []
        self.opened = 0

    def open(self, run: TrackedRun) -> None:
        self.opened += 1
        if self.opened <= self.fail_opens:
            raise ConnectionRefusedError("server down")

    def log(self, record: Record) -> None:
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self.records.append(record)

    def close(self) -> None:
        pass


def tracked_run(tmp_path: Path) -> TrackedRun:
    cfg = compose(["model=tiny", TABLE])
    return TrackedRun(
        "job-0123abcd", "job", "svd", tmp_path, flat_config(cfg), "a: 1\n", {"code_version": "x"}
    )


def metrics() -> TrainMetrics:
    return TrainMetrics(MetricsConfig(port=0), job="j", stage="s", rank=0, node="n0")


def counted(m: TrainMetrics, name: str, **labels: str) -> float:
    base = {"job": "j", "stage": "s", "rank": "0", "node": "n0"}
    return m.registry.get_sample_value(name, base | labels) or 0.0


def test_failing_backends_never_block_training_are_counted_and_reported_once(tmp_path, monkeypatch):
    """An unreachable MLflow server and a TensorBoard folder that cannot be created (a full or read-only
    disk): every record still reaches the working backend, `log` stays a queue put, each failure counts."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries would only slow it
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cfg = compose(["model=tiny", TABLE, f"tracker.mlflow_uri=http://127.0.0.1:{free_port()}"])
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the event folder should be")
    run = tracked_run(blocked)
    good, m, lines = Taking(), metrics(), []
    tracker = Tracker(
        run,
        [BACKENDS["mlflow"](cfg), BACKENDS["tensorboard"](cfg), good],
        on_failure=m.observe_tracking_failure,
        on_dropped=m.observe_tracking_dropped,
        warn=lines.append,
        retry_s=0.0,  # every record tries again: the worst case for the thread, none for training
    )
    started = time.perf_counter()
    for step in range(1, 21):
        tracker.log(Record("train", step, {"loss": 1.0 / step}))
    logging_s = time.perf_counter() - started
    tracker.close()

    assert [r.step for r in good.records] == list(range(1, 21))
    assert logging_s < 0.5, f"20 log calls took {logging_s:.3f} s: training waited for the trackers"
    assert tracker.failures == {"mlflow": 20, "tensorboard": 20}
    assert counted(m, "svd_tracking_failures_total", backend="mlflow") == 20
    assert counted(m, "svd_tracking_failures_total", backend="tensorboard") == 20
    assert sorted(line.split()[1] for line in lines) == ["mlflow", "tensorboard"], lines
    assert all("\n" not in line and "training goes on" in line for line in lines)


def test_a_full_queue_drops_records_counts_them_and_says_so_once(tmp_path):
    gate, m, lines = threading.Event(), metrics(), []
    slow = Taking(gate=gate)
    tracker = Tracker(
        tracked_run(tmp_path),
        [slow],
        queue_size=2,
        on_dropped=m.observe_tracking_dropped,
        warn=lines.append,
    )
    for step in range(1, 11):
        tracker.log(Record("train", step, {"loss": 1.0}))
    gate.set()
    tracker.close()

    assert tracker.dropped >= 10 - 3  # the queue's 2 and at most the one the thread holds
    assert len(slow.records) == 10 - tracker.dropped
    assert counted(m, "svd_tracking_dropped_total") == tracker.dropped
    assert len(lines) == 1
    assert "svd_tracking_dropped_total" in lines[0]


def test_steps_already_logged_are_not_sent_again_per_kind_and_the_last_step_is_saved(tmp_path):
    taking, saved = Taking(), []
    tracker = Tracker(
        tracked_run(tmp_path),
        [taking],
        logged={"taking": {"train": 5, "validation": 4}},
        save_logged=lambda logged: saved.append({k: dict(v) for k, v in logged.items()}),
    )
    for step in range(3, 8):
        tracker.log(Record("train", step, {"loss": 1.0}))
    tracker.log(Record("validation", 4, {"mean": 1.0}))
    tracker.log(Record("validation", 8, {"mean": 1.0}))
    tracker.close()

    assert [(r.kind, r.step) for r in taking.records] == [("train", 6), ("train", 7), ("validation", 8)]
    assert saved[-1] == {"taking": {"train": 7, "validation": 8}}


def test_a_backend_that_could_not_open_is_opened_again_and_gets_the_later_records(tmp_path):
    flaky, lines = Taking(fail_opens=2), []
    tracker = Tracker(tracked_run(tmp_path), [flaky], warn=lines.append, retry_s=0.0)
    for step in range(1, 6):
        tracker.log(Record("train", step, {"loss": 1.0}))
    tracker.close()

    assert [r.step for r in flaky.records] == [3, 4, 5]
    assert tracker.failures == {"taking": 2}
    assert len(lines) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking=[tensorboard,comet]", "tracking=['tensorboard', 'comet']: choose any of"),
        ("profile.steps=[4,2]", "profile.steps=[4, 2] must be [first, last] with 1 ≤ first ≤ last"),
        ("profile.ranks=[2]", "profile.ranks=[2] must name one or more ranks in [0, 1]"),
        ("tracker.dir=s3://bucket/tb", "tracker.dir=s3://bucket/tb: must be a local or shared folder"),
    ],
)
def test_tracking_and_profiling_settings_are_refused_in_one_line_naming_the_key(override, message):
    from svd.config import ConfigError

    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        compose(["model=tiny", TABLE, "gpus_per_node=2", override])


def test_tensorboard_is_the_default_tracker_and_model_tiny_has_none():
    assert compose([TABLE]).tracking == ["tensorboard"]
    assert compose(["model=tiny", TABLE]).tracking == []
