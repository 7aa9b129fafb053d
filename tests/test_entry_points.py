"""The demo and the benchmark run end to end as a newcomer would run them (small sizes), and every entry
point of jobs/ answers an ordinary mistake with one line naming the thing, not a traceback."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import av
import pytest
import torch

from svd.config import compose, to_yaml
from svd.data.local_s3 import free_port
from svd.train.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


def job(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"jobs/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT)} | (env or {}),
    )


def assert_one_line(done: subprocess.CompletedProcess, status: int, expected: str) -> None:
    """The exit status, and stderr is exactly one line that contains `expected`."""
    assert done.returncode == status, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    assert expected in done.stderr, done.stderr


@pytest.mark.slow
def test_demo_trains_samples_and_writes_the_video(tmp_path):
    demo = runpy.run_path(str(ROOT / "jobs" / "demo.py"), run_name="demo")
    argv = ["--steps", "40", "--size", "16", "--frames", "14", "--sample-steps", "4", "--out", str(tmp_path)]
    summary = demo["main"](argv)
    assert summary["last_loss"] < summary["first_loss"]
    with av.open(str(tmp_path / "sample.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 14
    assert (frames[0].width, frames[0].height) == (16, 16)
    assert (tmp_path / "sample.gif").stat().st_size > 0
    assert (tmp_path / "training_clip.gif").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "-1"], "--steps=-1 must be ≥ 1"),
        (["--batch", "0"], "--batch=0 must be ≥ 1"),
        (["--fps", "0"], "--fps=0.0 must be > 0"),
        (["--sample-steps", "0"], "--sample-steps=0 must be ≥ 1"),
    ],
)
def test_demo_refuses_bad_arguments_before_any_work(args, message):
    out = job("demo.py", *args)  # its limit is the helper's: 60 s was too short for a busy machine
    assert out.returncode == 2
    assert message in out.stderr
    assert "curation" not in out.stdout


def test_demo_explains_itself():
    out = job("demo.py", "--help")
    assert out.returncode == 0
    assert "--steps" in out.stdout
    assert "space_to_depth" in out.stdout


def numbers(pattern: str, text: str) -> list[float]:
    """The numbers a benchmark printed where `pattern` (with one group per number) matches."""
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return [float(g) for g in match.groups()]


@pytest.mark.slow
def test_loader_benchmark_ratios_are_the_quotients_of_the_rates_it_measured(radosgw):
    argv = [
        "--videos",
        "2",
        "--seconds",
        "3",
        "--video-size",
        "72",
        "128",
        "--rows",
        "500",
        "--bucket",
        "32",
        "48",
        "4",
        "2",
        "--workers",
        "2",
        "--batches",
        "2",
    ]
    out = subprocess.run([sys.executable, "bench/loader.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (limit,) = numbers(r"decode limit \(local files, 1 process\):\s+([\d.]+) clips/s", out.stdout)
    (ours,) = numbers(r"ClipLoader, 2 workers \(radosgw\):\s+([\d.]+) clips/s", out.stdout)
    (in_process,) = numbers(r"ClipLoader, in process \(radosgw\):\s+([\d.]+) clips/s", out.stdout)
    (parquet,) = numbers(r"Parquet \+ fsspec, 2 workers \(radosgw\):\s+([\d.]+) clips/s", out.stdout)
    assert min(limit, ours, in_process, parquet) > 0
    to_limit, in_process_to_limit = numbers(
        r"ratio ours/decode limit: ([\d.]+)\s+\(in process: ([\d.]+)\)", out.stdout
    )
    (to_parquet,) = numbers(r"ratio ours/Parquet:\s+([\d.]+)", out.stdout)
    printed = pytest.approx  # rates are printed to 0.1 clips/s and ratios to 0.01
    assert to_limit == printed(ours / limit, rel=0.05, abs=0.01)
    assert in_process_to_limit == printed(in_process / limit, rel=0.05, abs=0.01)
    assert to_parquet == printed(ours / parquet, rel=0.05, abs=0.01)


@pytest.mark.slow
def test_curation_benchmark_scores_both_detectors_on_the_known_cuts_and_counts_one_clip_per_shot():
    argv = ["--videos", "2", "--shots", "3", "--size", "72", "128", "--detectors", "ours", "ContentDetector"]
    out = subprocess.run([sys.executable, "bench/curate.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    cuts, dissolves = numbers(r"(\d+) cut, (\d+) dissolve", out.stdout)
    assert cuts + dissolves == 2 * (3 - 1)  # every video's shots are joined by a transition
    row = r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"  # F1, P, R, videos/s
    f1, precision, recall, ours_speed = numbers(r"\nours" + row, out.stdout)
    assert (f1, precision, recall) == (1.0, 1.0, 1.0)  # the synthetic transitions are all found, none more
    theirs_f1, _, _, theirs_speed = numbers(r"\nContentDetector" + row, out.stdout)
    compared = numbers(r"ours vs ContentDetector: F1 ([\d.]+) vs ([\d.]+), speed ×([\d.]+)", out.stdout)
    assert compared == pytest.approx([f1, theirs_f1, ours_speed / theirs_speed], rel=0.05, abs=0.01)
    clips, videos, seconds, per_core = numbers(
        r"2 workers: (\d+) clips from (\d+) videos in ([\d.]+) s = ([\d.]+) clips/s per core", out.stdout
    )
    assert (clips, videos) == (2 * 3, 2)  # one clip per shot
    assert per_core == pytest.approx(clips / seconds / 2, rel=0.05, abs=0.01)


@pytest.mark.slow
def test_unet_benchmark_ratios_are_the_quotients_of_the_times_and_memory_it_measured():
    argv = [
        "--model-channels",
        "32",
        "--channel-mult",
        "1",
        "2",
        "--frames",
        "2",
        "--height",
        "8",
        "--width",
        "8",
    ]
    out = subprocess.run(
        [sys.executable, "bench/unet.py", *argv, "--repeats", "1"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    measured = r"fwd\+bwd median\s+([\d.]+) ms\s+peak memory\s+([\d.]+) MiB"
    ours_ms, ours_mib = numbers(r"ours: " + measured, out.stdout)
    theirs_ms, theirs_mib = numbers(r"diffusers: " + measured, out.stdout)
    assert min(ours_ms, ours_mib, theirs_ms, theirs_mib) > 0
    (time_ratio,) = numbers(r"time ratio ours/diffusers:\s+([\d.]+)", out.stdout)
    (memory_ratio,) = numbers(r"memory ratio ours/diffusers:\s+([\d.]+)", out.stdout)
    assert time_ratio == pytest.approx(ours_ms / theirs_ms, rel=0.01)
    assert memory_ratio == pytest.approx(ours_mib / theirs_mib, rel=0.05)


# ---- jobs/export.py: a run directory that is missing, torn or unreachable; an output path that cannot be one


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory as export reads it: config.yaml (the tiny model) and two checkpoints whose tensors
    are not that model's (export must say so rather than fail on the first key)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(compose(["model=tiny", "data.table=unread", "data.frames=4"])))
    weights = {"network.conv_in.weight": torch.ones(2, 3)}
    with Checkpointer(str(run), keep=None, async_save=False) as checkpointer:
        for step in (1, 2):
            checkpointer.save(step, {"model": {"model": weights}, "ema": {"weights": weights}})
    return run


def test_export_of_a_run_without_checkpoints_names_the_run(run_dir, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    done = job("export.py", f"run={fresh}", f"out={tmp_path}/unet")
    assert_one_line(done, 1, f"export: no checkpoint at {fresh}")


def test_export_of_an_unknown_step_names_it_and_the_saved_steps(run_dir, tmp_path):
    done = job("export.py", f"run={run_dir}", "step=7", f"out={tmp_path}/unet")
    step = run_dir / "checkpoints" / "step-00000007"
    assert_one_line(done, 1, f"export: step=7: no checkpoint {step} (saved steps: 1, 2)")


def test_export_of_a_torn_checkpoint_names_its_folder(run_dir, tmp_path):
    data = run_dir / "checkpoints" / "step-00000002" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:64])
    done = job("export.py", f"run={run_dir}", f"out={tmp_path}/unet")
    assert_one_line(done, 1, f"export: loading {data.parent} failed: ")


def test_export_of_a_checkpoint_without_its_metadata_names_its_folder(run_dir, tmp_path):
    (run_dir / "checkpoints" / "step-00000002" / ".metadata").unlink()
    done = job("export.py", f"run={run_dir}", f"out={tmp_path}/unet")
    assert_one_line(done, 1, f"export: {run_dir}/checkpoints/step-00000002 is incomplete")


def test_export_of_weights_that_do_not_fit_the_runs_model_names_the_first_mismatch(run_dir, tmp_path):
    done = job("export.py", f"run={run_dir}", f"out={tmp_path}/unet")
    assert_one_line(done, 1, f"does not fit the model of {run_dir}/config.yaml: ")
    assert "problems in all" in done.stderr


def test_export_from_an_unreachable_store_names_the_run_instead_of_calling_it_missing(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"AWS_ENDPOINT_URL": dead, "AWS_ENDPOINT_URL_S3": dead, "SVD_STORAGE_MAX_ATTEMPTS": "1"}
    done = job("export.py", "run=s3://bucket/run", f"out={tmp_path}/unet", env=env)
    assert_one_line(done, 1, "export: run=s3://bucket/run: cannot read s3://bucket/run/config.yaml (")
    assert "no config.yaml" not in done.stderr


@pytest.mark.parametrize(
    ("out", "fmt", "message"),
    [
        ("a-file/unet", "diffusers", "out={tmp}/a-file/unet: {tmp}/a-file is a file, not a folder"),
        ("a-file", "diffusers", "out={tmp}/a-file is a file; format=diffusers writes a folder"),
        (".", "safetensors", "out={tmp} is a folder; this format writes one file"),
    ],
)
def test_export_to_a_path_that_cannot_be_its_output_names_it_before_reading_weights(
    out, fmt, message, tmp_path
):
    (tmp_path / "a-file").write_text("")
    done = job("export.py", "run=s3://bucket/never-read", f"out={tmp_path / out}", f"format={fmt}")
    assert_one_line(done, 1, "export: " + message.format(tmp=tmp_path))


# ---- jobs/plan.py, jobs/curate.py, jobs/demo.py


def test_plan_names_the_gpus_per_node_it_plans_with():
    done = job("plan.py", "nodes=7")  # 7 nodes × 8 H100 = 56 ranks do not divide the global batch 1536
    assert_one_line(done, 2, "(nodes=7 × gpus_per_node=8)")


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ("missing.yaml", "recipe={tmp}/missing.yaml: cannot be read (No such file or directory)"),
        ("no-recipe.yaml", "recipe={tmp}/no-recipe.yaml: not a dataset card with a recipe"),
        ("bad-rule.yaml", "recipe={tmp}/bad-rule.yaml: not a dataset card with a recipe"),
    ],
)
def test_curate_names_a_recipe_card_it_cannot_use(card, message, tmp_path):
    (tmp_path / "no-recipe.yaml").write_text("name: lvd\n")
    (tmp_path / "bad-rule.yaml").write_text("recipe:\n  drop: [{column: motion_score, share: 0.25}]\n")
    done = job("curate.py", f"output={tmp_path}/clips.lance", f"recipe={tmp_path / card}")
    assert_one_line(done, 2, "curate: " + message.format(tmp=tmp_path))


def test_curate_report_of_a_table_that_does_not_exist_names_it(tmp_path):
    done = job("curate.py", f"output={tmp_path}/clips.lance", f"report={tmp_path}/report")
    assert_one_line(done, 1, f"curate: output={tmp_path}/clips.lance: no table there")
    assert not (tmp_path / "report").exists()


def test_demo_names_an_output_folder_it_cannot_create(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = job("demo.py", "--out", str(tmp_path / "a-file" / "demo"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    out = tmp_path / "a-file" / "demo"
    assert done.stderr.strip().splitlines()[-1] == (  # argparse's convention: usage, then one error line
        f"demo.py: error: --out={out} cannot be a folder (Not a directory: {out})"
    )
