"""Runs that are killed or told to stop: nothing is lost or doubled, and a stop is prompt."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lance
import pytest

from svd.curate.ledger import log_uri

from .conftest import alive, children, curate_argv, curate_env, video


def raw_folder(path: Path, count: int) -> Path:
    path.mkdir()
    for v in range(count):
        (path / f"v{v}.mp4").write_bytes(video(v))
    return path


def logged(output: Path) -> int:
    try:
        return lance.dataset(log_uri(str(output))).count_rows()
    except ValueError:
        return 0  # not created yet


def start_and_wait(argv: list[str], output: Path, records: int) -> subprocess.Popen:
    """A run, once its video log holds `records` records (the run may also have finished)."""
    process = subprocess.Popen(argv, env=curate_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while logged(output) < records and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_a_run_killed_at_any_point_resumes_with_no_video_missing_or_doubled(tmp_path):
    raw, output = raw_folder(tmp_path / "raw", 6), tmp_path / "clips.lance"
    argv = curate_argv(f"input={raw}", f"output={output}", "commit_every=1")
    for records in (0, 2, 4):  # while starting, after two commits, after four
        process = start_and_wait(argv, output, records)
        process.kill()
        process.wait()
    done = subprocess.run(argv, env=curate_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    clips = lance.dataset(str(output)).to_table(columns=["clip_id", "video_uri"]).to_pylist()
    assert sorted(c["video_uri"] for c in clips) == [f"{raw}/v{v}.mp4" for v in range(6)]
    assert len({c["clip_id"] for c in clips}) == 6


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_and_its_workers_within_a_second(tmp_path, signum):
    raw, output = raw_folder(tmp_path / "raw", 8), tmp_path / "clips.lance"
    argv = curate_argv(f"input={raw}", f"output={output}", "commit_every=1", "workers=2")
    process = start_and_wait(argv, output, 1)
    assert process.poll() is None, "finished before it could be stopped"
    workers = children(process.pid)
    assert len(workers) >= 2
    os.kill(process.pid, signum)
    process.wait(timeout=1)
    assert process.returncode == 130
    assert process.stderr.read().decode().strip().endswith("interrupted; rerun the same command to continue")
    deadline = time.monotonic() + 1
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
