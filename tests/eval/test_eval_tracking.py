"""An evaluation's metrics reach the run's trackers: in the tracked run training recorded, at the checkpoint's
step, once (a rerun logs nothing new), from a process of its own that never writes training's state, and
never at the cost of the evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from svd.config import compose, to_yaml
from svd.data.storage import Storage
from svd.eval.tracking import track_evaluation
from svd.train.run_files import RunFiles
from svd.train.tracking import Record, Tracker

from ..train.test_tracking_run import wandb_history
from .test_evaluate_job import SMALL, evaluation

TABLE = "data.table=s3://bucket/clips.lance"


def eval_metrics(step: int, fvd: float) -> dict:
    return {"protocol": "p", "step": step, "values": {"fvd": fvd, "fvd_interval_95": [fvd - 1, fvd + 1]}}


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def mlflow_runs(tracking: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracking / "mlflow").as_uri())
    experiment = client.get_experiment_by_name("svd")
    return [client.get_run(r.info.run_id) for r in client.search_runs([experiment.experiment_id])]


def mlflow_history(tracking: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracking / "mlflow").as_uri())
    return sorted((m.step, pytest.approx(m.value)) for m in client.get_metric_history(run_id, key))


def trained_with_tracking(tmp_path: Path, backends: str) -> tuple:
    """A run directory as a tracked training leaves it (config.yaml, tracking.json, the train scalars of
    steps 1 and 2 in each backend), without training: the tracker's own code logs them."""
    run, tracking = tmp_path / "run", tmp_path / "tracking"
    cfg = compose(
        [
            "model=tiny",
            TABLE,
            f"tracking=[{backends}]",
            f"tracker.dir={tracking}",
            f"checkpoint.run_dir={run}",
        ]
    )
    files = RunFiles(str(run), Storage())
    files.write("config.yaml", to_yaml(cfg))
    tracker = Tracker.for_run(cfg, files, table_version=3)
    for step in (1, 2):
        tracker.log(Record("train", step, {"loss": 1.0 / step}))
    tracker.close()
    return cfg, str(run), tracking, json.loads(files.read("tracking.json"))


def test_each_step_is_logged_once_in_the_training_runs_tensorboard_wandb_and_mlflow(tmp_path, monkeypatch):
    import wandb

    init, groups = wandb.init, []

    def init_and_note_the_group(**settings):
        groups.append(settings.get("group"))
        return init(**settings)

    monkeypatch.setattr(wandb, "init", init_and_note_the_group)
    cfg, run, tracking, training_state = trained_with_tracking(tmp_path, "tensorboard,wandb,mlflow")
    out = f"{run}/eval/p"
    for step, fvd in [(2, 50.0), (2, 50.0), (4, 40.0), (2, 99.0)]:  # a rerun of 2, then 4, then 2 again
        track_evaluation(cfg, run, out, Storage(), eval_metrics(step, fvd))

    run_id = training_state["id"]
    # training's state is training's: the evaluation keeps its own
    assert json.loads(Path(run, "tracking.json").read_text()) == training_state
    logged = {"tensorboard": {"eval/p": 4}, "wandb": {"eval/p": 4}, "mlflow": {"eval/p": 4}}
    assert json.loads(Path(out, "tracking.json").read_text()) == {"id": run_id, "logged": logged}

    # TensorBoard: a folder of its own inside the training run's (one writer per folder)
    training_events = tracking / "tensorboard" / run_id
    assert tensorboard_scalars(training_events / "eval-p", "eval/p/fvd") == [(2, 50), (4, 40)]
    assert tensorboard_scalars(training_events, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert tensorboard_scalars(training_events / "eval-p", "eval/p/fvd_interval_95") == []

    # MLflow: the training run itself, its status (training closed it) and lineage left as they were
    (mlflow_run,) = mlflow_runs(tracking)
    assert mlflow_run.data.tags["svd.tracking_id"] == run_id
    assert mlflow_run.data.tags["svd.table_version"] == "3"
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_history(tracking, mlflow_run.info.run_id, "eval/p/fvd") == [(2, 50), (4, 40)]
    assert mlflow_history(tracking, mlflow_run.info.run_id, "train/loss") == [(1, 1.0), (2, 0.5)]

    # W&B: its own run in the training run's group (W&B takes one writer per run, its steps increasing)
    # (each tracker session an offline folder of its own, that `wandb sync` appends to the one run)
    sessions = (tracking / "wandb").glob(f"offline-run-*-{run_id}-eval-p*/run-{run_id}-eval-p.wandb")
    rows = [r for session in sessions for r in wandb_history(session) if "eval/p/fvd" in r]
    assert sorted((r["_step"], r["eval/p/fvd"]) for r in rows) == [(2, 50), (4, 40)]
    assert groups == [None, run_id, run_id]  # training's run, then steps 2 and 4 (a rerun opens nothing)


def test_tracking_that_cannot_work_never_fails_the_evaluation_and_says_why_once(tmp_path, capsys):
    cfg, run, _, _ = trained_with_tracking(tmp_path, "tensorboard")
    out = f"{run}/eval/p"
    Path(run, "tracking.json").unlink()  # a run whose training never opened its tracker
    track_evaluation(cfg, run, out, Storage(), eval_metrics(2, 50.0))
    assert capsys.readouterr().err == f"tracking: step 2 not tracked, {run}/tracking.json names no run yet\n"
    assert not Path(out, "tracking.json").exists()  # a later run of the step logs it

    Path(run, "tracking.json").write_text(json.dumps({"id": "job-0123abcd", "logged": {}}))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    cfg = replace(cfg, tracker=replace(cfg.tracker, dir=str(blocked)))  # no folder can be made under it
    track_evaluation(cfg, run, out, Storage(), eval_metrics(2, 50.0))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tracking: tensorboard failed (")
    assert not Path(out, "tracking.json").exists()


def test_an_evaluation_logs_the_step_it_merges_and_a_rerun_logs_nothing_new(
    trained_run, moto_s3, s3_env, tmp_path
):
    """Through the evaluation job, on a run in the object store (its state files there too)."""
    tracking = tmp_path / "tracking"
    overrides = [*SMALL, "motion_buckets=[0,255]"]
    files = RunFiles(trained_run, moto_s3.storage)  # the session's run: no other test tracks it
    files.write("tracking.json", json.dumps({"id": "eval-trained-0123abcd", "logged": {}}))
    rhos = []
    for _ in range(2):  # the rerun finds every shard written and merges again
        job = evaluation(trained_run, "motion_adherence", overrides, moto_s3)
        job.out = f"{trained_run}/eval/tracked"
        tracker = replace(job.run_config.tracker, dir=str(tracking))
        job.run_config = replace(job.run_config, tracking=["tensorboard"], tracker=tracker)
        rhos.append(job.evaluate(2, progress=False)["values"]["spearman_rho"])
    assert rhos[0] == rhos[1]
    folder = tracking / "tensorboard" / "eval-trained-0123abcd" / "eval-motion_adherence"
    assert tensorboard_scalars(folder, "eval/motion_adherence/spearman_rho") == [(2, rhos[0])]
    state = json.loads(RunFiles(job.out, moto_s3.storage).read("tracking.json"))
    assert state["logged"] == {"tensorboard": {"eval/motion_adherence": 2}}
