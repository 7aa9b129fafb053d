"""Object storage that fails: a server that stops mid-run and comes back, an endpoint that never answers."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from typing import Any

import lance
import pytest

from svd.curate.ledger import already_processed, log_uri
from svd.curate.pipeline import InputError, list_inputs
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.storage import Storage
from svd.data.table import TableUnreadableError

from .conftest import DEADLINES, curate_argv, curate_env, video


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


def silent_storage(endpoint: str) -> Storage:
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    return Storage.from_env(env | DEADLINES)


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


def test_s3fs_and_pyarrow_give_up_on_a_silent_endpoint_within_seconds(silent_endpoint):
    storage = silent_storage(silent_endpoint)
    fs, path = storage.fsspec("s3://bucket/raw/a.mp4")
    assert isinstance(finishes_within(30, lambda: fs.info(path)), OSError)
    pa_fs, pa_path = storage.pyarrow("s3://bucket/raw/a.mp4")
    raised = finishes_within(30, lambda: pa_fs.get_file_info(pa_path))
    assert isinstance(raised, OSError)
    assert "Timeout was reached" in str(raised)


@pytest.mark.slow
def test_a_table_on_a_silent_endpoint_is_unreadable_never_absent(silent_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_endpoint)  # Lance prefers it to storage_options
    storage = silent_storage(silent_endpoint)
    raised = finishes_within(60, lambda: already_processed("s3://bucket/clips.lance", storage))
    assert isinstance(raised, TableUnreadableError)
    assert str(raised).startswith("cannot read table s3://bucket/clips.lance: ")


@pytest.mark.slow
def test_the_loader_gives_up_on_a_silent_endpoint_within_seconds(silent_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_endpoint)
    uri = "s3://bucket/clips.lance"
    buckets = (Bucket(32, 48, 8, 2, fps=8),)
    config = LoaderConfig(table=uri, buckets=buckets, num_workers=0, cache_dir=str(tmp_path))
    storage = silent_storage(silent_endpoint)
    raised = finishes_within(60, lambda: ClipLoader(config, storage=storage, rank=0, world_size=1))
    assert isinstance(raised, OSError)  # through open_table, like any table it cannot read
    assert uri in str(raised)
