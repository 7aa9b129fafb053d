"""Object storage that fails: a server that stops mid-run and comes back, an endpoint that never answers
(or stops answering mid-run): every client gives up within the deadlines of svd/data/storage.py, and a run
fails within a minute, in one line that names the URI and the settings to raise."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import lance
import pytest
import torch

from svd.curate.ledger import already_processed, log_uri
from svd.curate.pipeline import InputError, list_inputs
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.storage import Storage
from svd.data.table import TableUnreadableError
from svd.train.checkpoint import Checkpointer, CheckpointError

from ..settings import production_settings
from .conftest import (
    DEADLINES,
    RETRYING_DEADLINES,
    ROOT,
    SilentEndpoint,
    curate_argv,
    curate_env,
    give_up_within_s,
    tries,
    video,
)

KEYS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}


def finishes_within(seconds: float, call: Callable[[], Any]) -> BaseException | None:
    """What `call` raised (None if it returned), failing the test if it is still running after `seconds`:
    a hang must fail the test, not stall the suite."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:  # handed to the test to assert on
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    return outcome[0]


def silent_storage(endpoint: str, deadlines: dict[str, str] = DEADLINES) -> Storage:
    return Storage.from_env({"AWS_ENDPOINT_URL_S3": endpoint} | KEYS | deadlines)


def gives_up(
    endpoint: SilentEndpoint, storage: Storage, client: str, call: Callable[[], Any]
) -> BaseException:
    """What `call` raised, checking that it gave up after each of the tries its client composes from the
    deadlines, one connection each, and no sooner (failing the test if it still runs after a minute)."""
    before, started = len(endpoint.connections), time.monotonic()
    raised = finishes_within(60, call)
    assert raised is not None
    assert len(endpoint.connections) - before == tries(storage, client)
    assert time.monotonic() - started >= tries(storage, client) * storage.read_timeout
    assert storage.timeout_hint(raised).startswith(" (no answer in time: SVD_STORAGE_READ_TIMEOUT=")
    return raised


@pytest.mark.slow
def test_an_s3_outage_mid_run_fails_the_run_and_the_rerun_completes_it(gate, moto_s3):
    bucket = f"s3://{moto_s3.new_bucket()}"
    fs, _ = moto_s3.storage.fsspec(bucket)
    for v in range(12):
        fs.pipe_file(f"{bucket}/raw/v{v:02d}.mp4"[5:], video(v))
    output = f"{bucket}/clips.lance"
    argv = curate_argv(f"input={bucket}/raw/", f"output={output}", "commit_every=1")
    env = curate_env(moto_s3.env | {"AWS_ENDPOINT_URL_S3": gate.endpoint})
    gate.on_request = (b"/raw/v04.mp4", gate.stop)  # the server stops as the fifth video is opened
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1
    last_line = first.stderr.strip().splitlines()[-1]
    assert last_line.startswith("curate: "), first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    gate.start()  # the server is back, with its objects
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "12 inputs, 4 already in the table, 8 curated → 8 clips" in second.stdout
    storage = moto_s3.storage
    clips = lance.dataset(output, storage_options=storage.lance_options(output)).to_table().to_pylist()
    assert sorted(c["video_uri"] for c in clips) == [f"{bucket}/raw/v{v:02d}.mp4" for v in range(12)]
    log = lance.dataset(log_uri(output), storage_options=storage.lance_options(log_uri(output)))
    assert sorted(r["status"] for r in log.to_table(columns=["status"]).to_pylist()) == ["ok"] * 12


@pytest.mark.slow
def test_a_silent_endpoint_stops_curation_within_seconds_in_one_line(silent_endpoint, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "v0.mp4").write_bytes(video(0))
    keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    env = curate_env({"AWS_ENDPOINT_URL_S3": silent_endpoint} | keys)
    argv = curate_argv(f"input={tmp_path}/raw", "output=s3://bucket/clips.lance")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("curate: cannot read table s3://bucket/clips.lance: ")
    assert done.stderr.count("\n") == 1
    assert "s3cr3t" not in done.stderr


def test_an_input_on_a_silent_endpoint_is_an_error_not_an_empty_input(silent_endpoint):
    raised = finishes_within(30, lambda: list_inputs("s3://bucket/raw/", silent_storage(silent_endpoint)))
    assert isinstance(raised, InputError)
    assert str(raised).startswith("input=s3://bucket/raw/: cannot be listed: ")


def test_the_default_deadlines_give_up_on_a_silent_endpoint_within_a_minute():
    """Per client, from how it composes the deadlines, which the tests below count."""
    bounds = {client: give_up_within_s(Storage(), client) for client in ("s3fs", "lance", "pyarrow")}
    assert max(bounds.values()) < 60, bounds


S3FS_CALLS: dict[str, Callable[[Any, str], Any]] = {
    "exists": lambda fs, path: fs.exists(path),
    "cat_file": lambda fs, path: fs.cat_file(path),
    "pipe_file": lambda fs, path: fs.pipe_file(path, b"step: 3\n"),  # botocore asks Expect: 100-continue
    "pipe_file of 32 MiB": lambda fs, path: fs.pipe_file(path, bytes(32 << 20)),  # more than TCP buffers hold
}


@pytest.mark.slow
@pytest.mark.parametrize("call", S3FS_CALLS)
def test_every_s3fs_call_gives_up_on_a_silent_endpoint_after_its_tries(silent_endpoint, call):
    storage = silent_storage(silent_endpoint, RETRYING_DEADLINES)
    fs, path = storage.fsspec("s3://bucket/runs/r/config.yaml")
    gives_up(silent_endpoint, storage, "s3fs", lambda: S3FS_CALLS[call](fs, path))


@pytest.mark.slow
def test_pyarrow_gives_up_on_a_silent_endpoint_after_its_tries(silent_endpoint):
    storage = silent_storage(silent_endpoint, RETRYING_DEADLINES)
    pa_fs, path = storage.pyarrow("s3://bucket/raw/a.parquet")

    def write() -> None:
        with pa_fs.open_output_stream(path) as f:
            f.write(bytes(1 << 20))

    for call in (lambda: pa_fs.get_file_info(path), write):
        assert "Timeout was reached" in str(gives_up(silent_endpoint, storage, "pyarrow", call))


@pytest.mark.slow
def test_a_checkpoint_save_to_a_store_that_stops_answering_fails_within_its_deadlines(gate, moto_s3):
    storage = Storage.from_env(moto_s3.env | {"AWS_ENDPOINT_URL_S3": gate.endpoint} | RETRYING_DEADLINES)
    run = f"s3://{moto_s3.new_bucket()}/runs/r"
    parts = {"ema": {"w": torch.ones(8 << 20)}, "train": {"step": 1}}  # 32 MiB: more than TCP buffers hold
    gate.on_request = (b"/step-00000001/__0_", gate.silence)  # the store hangs as rank 0 sends its data
    with Checkpointer(run, storage, async_save=True) as checkpointer:
        checkpointer.save(1, parts)
        raised = finishes_within(60, checkpointer.wait)  # the upload, then s3fs deletes what it left
    assert isinstance(raised, CheckpointError), raised
    message = str(raised)
    assert message.startswith(f"saving {run}/checkpoints/step-00000001 failed: rank 0: ")
    assert message.endswith("SVD_STORAGE_MAX_ATTEMPTS=2; raise them for a slow store)")
    assert "\n" not in message


@pytest.mark.slow
def test_a_table_on_a_silent_endpoint_is_unreadable_never_absent(silent_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_endpoint)  # Lance prefers it to storage_options
    storage = silent_storage(silent_endpoint, RETRYING_DEADLINES)
    raised = gives_up(
        silent_endpoint, storage, "lance", lambda: already_processed("s3://bucket/clips.lance", storage)
    )
    assert isinstance(raised, TableUnreadableError)
    assert str(raised).startswith("cannot read table s3://bucket/clips.lance: ")
    assert str(raised).endswith("SVD_STORAGE_MAX_ATTEMPTS=2; raise them for a slow store)")


@pytest.mark.slow
def test_the_loader_gives_up_on_a_silent_endpoint_within_seconds(silent_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_endpoint)
    uri = "s3://bucket/clips.lance"
    buckets = (Bucket(32, 48, 8, 2, fps=8),)
    config = LoaderConfig(table=uri, buckets=buckets, num_workers=0, cache_dir=str(tmp_path))
    storage = silent_storage(silent_endpoint)
    raised = finishes_within(60, lambda: ClipLoader(config, storage=storage, rank=0, world_size=1))
    assert isinstance(raised, OSError)  # through open_table, like any table it cannot read
    assert str(raised).startswith(f"cannot open clip table {uri} ")
    assert str(raised).endswith("SVD_STORAGE_MAX_ATTEMPTS=1; raise them for a slow store)")


def launch(table: str, run_dir: str, endpoint: SilentEndpoint, env: dict[str, str]) -> tuple[Any, float]:
    """One rank in the production configuration (loader workers, metrics, validation, previews, async
    checkpoints), through jobs/launch.py as a user starts it, and the seconds from its first connection to
    `endpoint` to its end (its start-up, imports and model, is no storage wait); fails the test if the run
    lasts 300 s."""
    argv = [
        sys.executable,
        str(ROOT / "jobs" / "launch.py"),
        *production_settings(table, run_dir, "train.steps=4"),
    ]
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the run still hangs after 300 s")
    assert endpoint.first_connection_at is not None, done.stderr[-3000:]
    return done, time.monotonic() - endpoint.first_connection_at


def deadline_free_env(endpoint: str) -> dict[str, str]:
    """This environment with the endpoint, keys and this checkout, and the default storage deadlines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SVD_STORAGE_", "AWS_"))}
    return env | {"AWS_ENDPOINT_URL_S3": endpoint, "PYTHONPATH": str(ROOT)} | KEYS


@pytest.mark.slow
def test_a_run_directory_on_a_silent_endpoint_fails_the_run_within_a_minute_in_one_line(
    silent_endpoint, local_table
):
    """The default deadlines, end to end: taking the run directory's lease is the run's first call there."""
    done, took = launch(
        local_table, "s3://bucket/runs/r", silent_endpoint, deadline_free_env(silent_endpoint)
    )
    assert took < 60, took
    assert len(silent_endpoint.connections) == tries(Storage(), "s3fs")  # the lease's first listing
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr[-3000:]
    failed = "launch: training failed: LeaseError: "
    assert done.stderr.startswith(f"{failed}checkpoint.run_dir=s3://bucket/runs/r: cannot take its lease in ")
    assert done.stderr.strip().endswith(
        "(no answer in time: SVD_STORAGE_READ_TIMEOUT=5 s, SVD_STORAGE_CONNECT_TIMEOUT=3 s, "
        "SVD_STORAGE_MAX_ATTEMPTS=2; raise them for a slow store)"
    )
    assert "s3cr3t" not in done.stderr + done.stdout


@pytest.mark.slow
def test_a_table_on_a_silent_endpoint_fails_the_run_within_seconds_in_one_line(silent_endpoint, tmp_path):
    env = deadline_free_env(silent_endpoint) | RETRYING_DEADLINES
    done, took = launch("s3://bucket/clips.lance", str(tmp_path / "run"), silent_endpoint, env)
    assert took < 60, took
    assert len(silent_endpoint.connections) == tries(Storage.from_env(env), "s3fs")  # one `exists` call
    assert (done.returncode, done.stdout) == (2, "")  # refused before anything started
    assert done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith("launch: data.table=s3://bucket/clips.lance: cannot be read (")
    assert done.stderr.strip().endswith("SVD_STORAGE_MAX_ATTEMPTS=2; raise them for a slow store)")
    assert not (tmp_path / "run").exists()
