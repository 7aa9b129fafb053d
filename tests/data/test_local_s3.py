"""The local S3 server (moto) that `make demo` starts goes when its starter goes, however that ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from ..processes import alive

STARTER = """
import sys
from svd.data.local_s3 import LocalS3
s3 = LocalS3().__enter__()
print(s3._process.pid, flush=True)
sys.stdin.read()  # until killed
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_server_whose_starter_is_killed_stops_too(signum):
    """A demo stopped by SIGTERM (no handler: no __exit__) or SIGKILL left its moto server running."""
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        server = int(starter.stdout.readline())
        assert alive(server)
        starter.send_signal(signum)
        starter.wait(timeout=60)
        deadline = time.monotonic() + 60  # the kernel signals it at once; a loaded host takes a moment
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(server)
        if left:
            subprocess.run(["kill", "-9", str(server)], check=False)
        assert not left
    finally:
        starter.kill()
        starter.wait()
