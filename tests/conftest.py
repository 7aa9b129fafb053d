"""Real services for the tests, started once per session on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from svd.data.local_s3 import LocalS3, create_bucket
from svd.data.storage import Storage

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ObjectStore:
    storage: Storage
    env: dict[str, str]

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        create_bucket(self.storage, name)
        return name


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[ObjectStore]:
    """moto's S3 server: starts in ~1 s; for correctness tests."""
    with LocalS3() as server:
        yield ObjectStore(server.storage(), server.env())


@pytest.fixture(scope="session")
def radosgw() -> ObjectStore:
    """Ceph's radosgw via infra/local/radosgw.sh: a real object store (conditional writes, fast ranged reads).
    Skipped on a machine that cannot install Ceph, except in CI, where that is a failure."""
    script = ROOT / "infra" / "local" / "radosgw.sh"
    done = subprocess.run([str(script), "start"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = f"radosgw unavailable: {done.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    env = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    for key in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        os.environ[key] = env[key]  # read by the AWS SDKs from the environment only
    return ObjectStore(Storage.from_env(env), env)


@pytest.fixture(scope="session")
def avi_bytes() -> bytes:
    """2 s of a moving square, MPEG-4 Part 2 in AVI (a RIFF container, like WebP): written by PyAV."""
    import io

    import av

    from svd.data.synthetic import moving_square

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in moving_square(48, 48, 64, velocity=(0.0, 2.0)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@pytest.fixture
def s3_bucket(moto_s3: ObjectStore) -> str:
    """A fresh bucket on the moto server, as an s3:// prefix."""
    return f"s3://{moto_s3.new_bucket()}"
