"""The demo and the benchmark run end to end as a newcomer would run them (small sizes)."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    out = subprocess.run(
        [sys.executable, "jobs/demo.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "curation" not in out.stdout


def test_demo_explains_itself():
    out = subprocess.run([sys.executable, "jobs/demo.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    assert "--steps" in out.stdout
    assert "space_to_depth" in out.stdout


@pytest.mark.slow
def test_loader_benchmark_prints_both_ratios(radosgw):
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
    assert re.search(r"ratio ours/decode limit:\s+\d+\.\d+", out.stdout)
    assert re.search(r"ratio ours/Parquet:\s+\d+\.\d+", out.stdout)


@pytest.mark.slow
def test_curation_benchmark_compares_with_pyscenedetect():
    argv = ["--videos", "2", "--shots", "3", "--size", "72", "128", "--detectors", "ours", "ContentDetector"]
    out = subprocess.run([sys.executable, "bench/curate.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"vs ContentDetector: F1 \d\.\d\d vs \d\.\d\d", out.stdout)
    assert re.search(r"\d+\.\d+ clips/s per core", out.stdout)


@pytest.mark.slow
def test_unet_benchmark_prints_both_ratios():
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
    assert re.search(r"time ratio ours/diffusers:\s+\d+\.\d+", out.stdout)
    assert re.search(r"memory ratio ours/diffusers:\s+\d+\.\d+", out.stdout)
