"""A real S3 API server on 127.0.0.1 for the demo and quick tests: moto in server mode, no root needed.

    with LocalS3() as s3:                    # starts `moto_server`, waits until it answers
        s3.create_bucket("svd")
        storage = s3.storage()               # a Storage pointing at it
        os.environ.update(s3.env())          # or the AWS_* variables, for subprocesses

moto keeps objects in memory and its ranged reads slow down with object size: use it for correctness,
never for benchmarks (those run on Ceph's radosgw, `infra/local/radosgw.sh`).

    python -m svd.data.local_s3 --port 9000  # run one in the foreground and print its AWS_* variables
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from svd.data.storage import Storage
from svd.lifetime import die_with_parent

ACCESS_KEY, SECRET_KEY, REGION = "svd-local", "svd-local-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> LocalS3:
        server = shutil.which("moto_server") or shutil.which("moto_server", path=str(sys.prefix) + "/bin")
        if server is None:
            raise RuntimeError("moto_server not found: install the local extra, `pip install 'svd[local]'`")
        self._process = subprocess.Popen(
            [server, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # a demo killed by SIGTERM or SIGKILL leaves no server behind
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with code {self._process.returncode} (port {self.port} taken?)"
                )
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint} within 30 s")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
        }

    def storage(self) -> Storage:
        return Storage.from_env(self.env())

    def create_bucket(self, name: str) -> None:
        create_bucket(self.storage(), name)


def create_bucket(storage: Storage, name: str) -> None:
    """A bucket, made with a plain CreateBucket call (s3fs's `mkdir` sends a location constraint that local
    servers reject). Creating a bucket one already owns succeeds."""
    fs, _ = storage.fsspec(f"s3://{name}")
    fs.call_s3("create_bucket", Bucket=name)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a local S3 server (moto) until interrupted.")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default="svd", help="bucket to create (default: %(default)s)")
    args = parser.parse_args()
    with LocalS3(args.port) as s3:
        s3.create_bucket(args.bucket)
        for key, value in s3.env().items():
            print(f"export {key}={value}")
        print(f"# bucket s3://{args.bucket} ready; Ctrl-C stops the server", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
