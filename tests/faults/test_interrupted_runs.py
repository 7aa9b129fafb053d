"""Runs that are killed or told to stop (curation, training): nothing is lost or doubled, a stop is prompt."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lance
import pytest

from svd.curate.ledger import log_uri

from ..processes import alive, children
from .conftest import curate_argv, curate_env, video


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


# ---- training: a stop signal saves the step under way, whichever process gets it ---------------------------
QUIT_LINE = "launch: SIGINT again: quitting without saving the step under way"


def stopping_line(name: str) -> str:
    return f"launch: {name}: saving the step under way, then stopping (Ctrl-C again: quit without it)"


@pytest.mark.slow
def test_a_one_rank_run_saves_the_step_under_way_on_ctrl_c_or_sigterm_and_a_second_ctrl_c_quits_at_once(
    rgw_train_table, radosgw, rgw_env, launched, production
):
    """Before: Ctrl-C printed a 102-line traceback, SIGTERM ended the run with status 143; neither saved."""
    run_dir = f"{rgw_train_table['bucket']}/runs/one-rank-stops"
    args = production(rgw_train_table, "one-rank-stops", "gpus_per_node=1", "train.steps=30")
    stopped_at = 0
    for signum in (signal.SIGINT, signal.SIGTERM):
        run = launched(args, rgw_env)
        run.wait_for(rf"^step {stopped_at + 2}/30 ")  # a step after the one it resumed from
        run.signal(signum)
        assert run.finish() == 130, run.output()
        name = signal.Signals(signum).name
        assert run.stderr == [stopping_line(name)]
        assert min(run.losses()) == stopped_at + 1  # resumed from the last stop
        assert run.stopped()[::2] == (name, run_dir)
        stopped_at = run.stopped()[1]
        assert radosgw.latest_step(run_dir) == stopped_at == max(run.losses())

    run = launched(args, rgw_env)
    run.wait_for(rf"^step {stopped_at + 1}/30 ")
    run.signal(signal.SIGINT)
    run.wait_for("saving the step under way")
    run.signal(signal.SIGINT)
    quit_at = time.monotonic()
    assert run.process.wait(timeout=60) == 130
    assert time.monotonic() - quit_at < 10  # at once, not after the save
    assert run.finish() == 130
    assert run.stderr == [stopping_line("SIGINT"), QUIT_LINE]
    assert not [line for line in run.stdout if line.startswith("stopped by")]
    deadline = time.monotonic() + 10  # its loader workers ended with it
    while run.left_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run.left_running() == []


@pytest.mark.slow
def test_two_local_ranks_stopped_by_sigterm_resume_on_one_rank_as_if_never_stopped(
    rgw_train_table, radosgw, rgw_env, launched, production, never_stopped
):
    """SIGTERM to the launcher's process group (the elastic agent, both ranks and their loader workers, as
    Slurm sends it) mid-run: the ranks save the step under way and the run exits 130; the same command on one
    rank trains the remaining steps, with the losses and final weights of a run never stopped. Before: the
    agent killed the ranks with SIGTERM, nothing was saved, and the run failed with ChildFailedError."""
    table = rgw_train_table
    stopped = launched(production(table, "stopped-on-two", "gpus_per_node=2", "train.steps=12"), rgw_env)
    stopped.wait_for(r"^step 4/12 ")
    stopped.signal(signal.SIGTERM)
    assert stopped.finish() == 130, stopped.output()
    assert stopped.stderr == [stopping_line("SIGTERM")]
    _, step, run_dir = stopped.stopped()
    assert 4 <= step < 12
    assert radosgw.latest_step(run_dir) == step == max(stopped.losses())

    resumed = launched(production(table, "stopped-on-two", "gpus_per_node=1", "train.steps=12"), rgw_env)
    assert resumed.finish() == 0, resumed.output()
    assert never_stopped.finish() == 0, never_stopped.output()
    assert min(resumed.losses()) == step + 1
    losses = stopped.losses() | resumed.losses()
    assert list(losses) == list(range(1, 13))  # every step trained once
    assert losses == pytest.approx(never_stopped.losses(), abs=2e-4)  # as printed, to 4 decimals
    radosgw.assert_same_weights(run_dir, never_stopped.run_dir)
