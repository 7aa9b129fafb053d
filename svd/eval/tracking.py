"""An evaluation's metrics in the run's trackers (`tracking` of the run's config, svd/train/tracking.py):
scalars `eval/<protocol>/<metric>` at the checkpoint's step, logged by the process that merged the step.

The evaluation runs beside training, in another process, so it is a second writer of the tracked run that
training recorded in `<run_dir>/tracking.json`: it reads that id and never writes that file. What it has
logged is kept in a file of its own, `<run_dir>/eval/<protocol>/tracking.json` (backend → kind → last step),
so a rerun of a step logs nothing new. Each backend takes the second writer as it can (`TrackedRun.part`):
MLflow logs into training's run (without touching its status or tags); TensorBoard into a subfolder of
training's, `tensorboard/<id>/eval-<protocol>` (one writer per folder); W&B, which takes one writer per run
with steps that only increase, into a run of its own, `<id>-eval-<protocol>`, in group `<id>`.

Tracking never fails the evaluation: a backend's error is said once and the step stays unlogged for it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from svd.config import RunConfig
from svd.data.storage import Storage
from svd.train.run_files import RunFiles
from svd.train.tracking import BACKENDS, STATE_FILE, Record, Tracker, tracked_run


def track_evaluation(
    run_config: RunConfig, run: str, out: str, storage: Storage, metrics: dict[str, Any]
) -> None:
    """Log `metrics` (a merged metrics.json) to the run's trackers, once per step; waits for delivery."""
    if not run_config.tracking:
        return
    training, evaluation = RunFiles(run, storage), RunFiles(out, storage)
    try:
        run_id = json.loads(training.read(STATE_FILE) or "{}").get("id")
        logged = json.loads(evaluation.read(STATE_FILE) or "{}").get("logged", {})
    except Exception as e:  # storage trouble: the evaluation goes on, untracked
        _warn(f"tracking: step {metrics['step']} not tracked, the tracking state cannot be read ({e})")
        return
    if run_id is None:  # training logs nothing before it records its id: there is no run to join yet
        _warn(f"tracking: step {metrics['step']} not tracked, {training.uri(STATE_FILE)} names no run yet")
        return
    kind = f"eval/{metrics['protocol']}"

    def save_logged(state: dict[str, dict[str, int]]) -> None:
        evaluation.write(STATE_FILE, json.dumps({"id": run_id, "logged": state}))

    tracker = Tracker(
        tracked_run(run_config, run_id, None, part=f"eval-{metrics['protocol']}"),
        [BACKENDS[name](run_config) for name in run_config.tracking],
        logged=logged,
        save_logged=save_logged,
        close_timeout_s=run_config.tracker.close_timeout_s,
    )
    tracker.log(Record(kind, int(metrics["step"]), scalars(metrics["values"])))
    tracker.close()


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The metrics that are one number (intervals and curves are in metrics.json and the report)."""
    return {k: v for k, v in values.items() if isinstance(v, float)}
