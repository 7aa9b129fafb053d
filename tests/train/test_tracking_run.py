"""One tracked run end to end, as a user starts it: 2 ranks that log to TensorBoard, W&B (offline) and MLflow
(a file store) and trace two steps, then a resume on 1 rank from a checkpoint older than the last logged
step. Every backend holds every value at every logged step exactly once, in one tracked run."""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import pytest
from PIL import Image

from ..settings import production_settings

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCALARS = ("loss", "grad_norm", "lr", "samples_per_s", "data_wait_s", "skipped_samples")
SIGMAS = ("sigma_0.05", "sigma_0.3", "sigma_1", "sigma_3", "sigma_10", "mean")


def wandb_history(run_file: Path) -> list[dict[str, object]]:
    """The history rows (with their `_step`) of a W&B offline run file (`run-<id>.wandb`): LevelDB's log
    format (32 KiB blocks of records with a 7-byte header: CRC, length, type) holding W&B's Record protobufs,
    after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, rows, pending, offset = run_file.read_bytes(), [], b"", 7
    while offset + 7 <= len(data):
        room = 32768 - offset % 32768
        if room < 7:  # a block's tail too short for a header is padding
            offset += room
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    item.key or ".".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                rows.append(row | {"_step": record.history.step.num})
    return rows


@pytest.mark.slow
def test_a_tracked_run_resumed_on_another_world_size_logs_every_value_once_in_every_backend(
    local_table, launched, tmp_path, monkeypatch
):
    run_dir, tracking = tmp_path / "run", tmp_path / "tracking"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    settings = production_settings(
        local_table, str(run_dir), "tracking=[tensorboard,wandb,mlflow]", f"tracker.dir={tracking}"
    )
    # checkpoints at 3 and 6, validation at 4, a preview at 6; rank 1 traces steps 2 and 3
    first = launched(
        [*settings, "gpus_per_node=2", "train.steps=6", "profile.steps=[2,3]", "profile.ranks=[1]"], env
    )
    assert first.finish() == 0, first.output()
    # As if it died after logging step 6 but before its checkpoint of step 6 was committed: the resume trains
    # steps 4-6 again (their validation and preview too), which the trackers already have.
    marker = run_dir / "checkpoints" / "latest"
    marker.write_text(json.dumps(json.loads(marker.read_text()) | {"step": 3, "folder": "step-00000003"}))
    second = launched([*settings, "gpus_per_node=1", "train.steps=8"], env)
    assert second.finish() == 0, second.output()
    assert "resumed from step 3" in second.output()
    losses = first.losses() | {step: loss for step, loss in second.losses().items() if step > 6}
    run_id = json.loads((run_dir / "tracking.json").read_text())["id"]
    assert "tracking:" not in first.output() + second.output()  # no backend failed

    # TensorBoard, read by its own event reader: one run folder, each value once per logged step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in (tracking / "tensorboard").iterdir()] == [run_id]
    events = EventAccumulator(
        str(tracking / "tensorboard" / run_id), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    for name in TRAIN_SCALARS:
        assert [e.step for e in events.Scalars(f"train/{name}")] == list(range(1, 9)), name
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(losses, abs=1e-4)
    for name in SIGMAS:
        assert [e.step for e in events.Scalars(f"validation/{name}")] == [4, 8], name
    (preview,) = events.Images("preview/video")
    with Image.open(io.BytesIO(preview.encoded_image_string)) as video:
        assert (preview.step, video.format, video.n_frames) == (6, "GIF", 4)

    # W&B offline: one folder per start, both of the same run id, together the same history
    files = sorted((tracking / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2
    rows = [row for file in files for row in wandb_history(file)]
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps))  # no step twice, in order
    by_step = {row["_step"]: row for row in rows}
    assert sorted(s for s, row in by_step.items() if "train/loss" in row) == list(range(1, 9))
    logged = {s: row["train/loss"] for s, row in by_step.items() if "train/loss" in row}
    assert logged == pytest.approx(losses, abs=1e-4)
    assert sorted(s for s, row in by_step.items() if "validation/mean" in row) == [4, 8]
    assert by_step[6]["preview/video._type"] == "video-file"

    # MLflow's file store: one run, found again by its tracking id, the same history, config and lineage
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for reading a file store
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracking / "mlflow").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("svd").experiment_id])
    assert run.data.tags["svd.tracking_id"] == run_id
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses, abs=1e-4)
    assert len(history) == 8
    assert [m.step for m in client.get_metric_history(run.info.run_id, "validation/mean")] == [4, 8]
    assert run.data.params["train.global_batch"] == "4"
    assert run.data.tags["svd.table_version"] == "1"
    assert run.data.tags["svd.code_version"] not in ("", "unknown")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "previews")] == [
        "previews/preview-00000006.gif"
    ]

    # the profile of rank 1: steps 2 and 3 only, the model's operators, and the data-wait share printed
    trace = json.loads((run_dir / "profiles" / "rank001.steps-2-3.pt.trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {
        "train_step_2",
        "train_step_3",
        "aten::convolution",
        "aten::scaled_dot_product_attention",
    } <= names
    assert not {"train_step_1", "train_step_4"} & names
    assert "profile of steps 2-3 on rank 1" in first.output()
    assert "data wait: " in first.output()
