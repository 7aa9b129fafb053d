"""bench/loader.py cleans up after itself: it stops the radosgw it started, and only that one."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from svd.data.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "infra" / "local" / "radosgw.sh")
# What the benchmark exports for its loaders; restored after the test, so later tests reach their own S3.
EXPORTED = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
EXPORTED += ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_loader", ROOT / "bench" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def own_gateway(monkeypatch) -> tuple[str, str]:
    """Settings for a radosgw of the test's own (not the suite's); returns its state folder and endpoint.
    Fresh ports each time: radosgw.sh stop does not wait for the daemons to release theirs."""
    port, state = free_port(), tempfile.mkdtemp(prefix="rgw-")  # short: Ceph's sockets live in it
    monkeypatch.setenv("SVD_RGW_DIR", state)
    monkeypatch.setenv("SVD_RGW_PORT", str(port))
    monkeypatch.setenv("SVD_RGW_MON_PORT", str(free_port()))
    return state, f"http://127.0.0.1:{port}"


def daemons(state: str) -> list[str]:
    """The Ceph processes still running from the gateway whose state folder is `state`."""
    found = subprocess.run(["pgrep", "-f", "--", f"-c {state}/ceph.conf"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.mark.slow
def test_the_loader_benchmark_stops_the_radosgw_it_started_and_only_that_one(monkeypatch):
    if shutil.which("radosgw") is None and os.environ.get("CI") != "true":
        pytest.skip("Ceph is not installed")
    for key in EXPORTED:  # recorded (delenv of an absent key is not), so what the benchmark exports is undone
        monkeypatch.setenv(key, os.environ.get(key, ""))
    bench = load_bench()

    state, endpoint = own_gateway(monkeypatch)
    with bench.radosgw_storage() as storage:
        assert storage.endpoint_url == endpoint
        assert bench.answering(endpoint)
    assert not bench.answering(endpoint)
    assert not os.path.exists(state)
    assert daemons(state) == []  # the monitor and OSD too

    state, endpoint = own_gateway(monkeypatch)
    started = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, check=False)
    try:
        assert started.returncode == 0, started.stderr
        with bench.radosgw_storage():
            pass
        assert bench.answering(endpoint)
    finally:
        subprocess.run([SCRIPT, "stop"], capture_output=True, check=False)
    assert daemons(state) == []
