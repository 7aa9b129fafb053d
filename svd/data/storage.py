"""One place that turns a URI into the three views of storage the project needs.

    storage = Storage.from_env()
    fs, path = storage.fsspec("s3://bucket/raw/a.mp4")      # ranged reads of videos (s3fs, local, gcsfs …)
    pa_fs, path = storage.pyarrow("s3://bucket/meta.parquet")  # pyarrow datasets
    lance.dataset(uri, storage_options=storage.lance_options(uri))

Credentials and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so a job
config never holds a secret, and `Storage` never prints one: its repr and every error show URIs only.

Every remote call has a deadline (DESIGN decision 8): `connect_timeout`, `read_timeout` and `max_attempts`
are mapped onto each client (Lance/object_store, s3fs/botocore, pyarrow/AWS SDK), so an endpoint that
accepts connections and never answers fails a call in bounded time instead of hanging a job. Override
them with SVD_STORAGE_CONNECT_TIMEOUT, SVD_STORAGE_READ_TIMEOUT (seconds) and SVD_STORAGE_MAX_ATTEMPTS.
Worst cases, measured with pylance 14: Lance wraps each listing in its own outer retry loop (6 tries), so
opening a table on a dead endpoint takes up to about 6 · max_attempts · read_timeout plus ~4 s of backoff;
s3fs retries a failed call `max_attempts` times around botocore's own `max_attempts`.

Caveat (measured with pylance 14): Lance lets AWS_ENDPOINT_URL_S3 in the environment override the
`aws_endpoint` passed in `storage_options`, so a process reaches one S3 endpoint through Lance — the one
in its environment. `Storage.from_env()` keeps both the same.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlparse

import fsspec

TIMEOUT_VARIABLES = {
    "connect_timeout": "SVD_STORAGE_CONNECT_TIMEOUT",
    "read_timeout": "SVD_STORAGE_READ_TIMEOUT",
    "max_attempts": "SVD_STORAGE_MAX_ATTEMPTS",
}


@dataclass(frozen=True)
class Storage:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local S3 server
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0  # seconds to open a connection
    read_timeout: float = 30.0  # seconds a request may wait for its response (Lance: the whole request)
    max_attempts: int = 3  # tries per call, the first included

    def __post_init__(self) -> None:
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError(
                f"storage timeouts must be > 0 s: connect_timeout={self.connect_timeout}, "
                f"read_timeout={self.read_timeout}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"storage max_attempts={self.max_attempts} must be ≥ 1")

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> Storage:
        env = os.environ if env is None else env
        limits: dict[str, float | int] = {}
        for name, variable in TIMEOUT_VARIABLES.items():
            if env.get(variable):
                kind = int if name == "max_attempts" else float
                try:
                    limits[name] = kind(env[variable])
                except ValueError:
                    raise ValueError(f"{variable}={env[variable]!r} is not a {kind.__name__}") from None
        return Storage(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
            **limits,
        )

    def fsspec(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path within it). Plain paths are local files."""
        protocol = scheme(uri)
        if protocol == "s3":
            import s3fs

            fs = s3fs.S3FileSystem(
                key=self.access_key,
                secret=self.secret_key,
                token=self.session_token,
                endpoint_url=self.endpoint_url,
                client_kwargs={"region_name": self.region},
                config_kwargs={
                    "connect_timeout": self.connect_timeout,
                    "read_timeout": self.read_timeout,
                    "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
                },
            )
            fs.retries = self.max_attempts  # s3fs's own loop around botocore's (a class attribute, default 5)
            return fs, strip_scheme(uri)
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path

    def pyarrow(self, uri: str):
        """(pyarrow.fs.FileSystem, path within it)."""
        import pyarrow.fs as pafs

        if scheme(uri) == "s3":
            endpoint = urlparse(self.endpoint_url) if self.endpoint_url else None
            fs = pafs.S3FileSystem(
                access_key=self.access_key,
                secret_key=self.secret_key,
                session_token=self.session_token,
                region=self.region,
                endpoint_override=endpoint.netloc if endpoint else None,
                scheme=endpoint.scheme if endpoint else "https",
                connect_timeout=self.connect_timeout,
                request_timeout=self.read_timeout,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
            )
            return fs, strip_scheme(uri)
        return pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))

    def lance_options(self, uri: str) -> dict[str, str]:
        """`storage_options` for `lance.dataset` / `lance.write_dataset`."""
        if scheme(uri) != "s3":
            return {}
        options = {"aws_region": self.region}
        if self.access_key:
            options |= {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key or ""}
        if self.session_token:
            options["aws_session_token"] = self.session_token
        if self.endpoint_url:
            options["aws_endpoint"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                options["allow_http"] = "true"
        retry_budget = math.ceil(self.max_attempts * (self.connect_timeout + self.read_timeout))
        return options | {
            "connect_timeout": f"{round(self.connect_timeout * 1000)}ms",
            "timeout": f"{round(self.read_timeout * 1000)}ms",
            "client_max_retries": str(self.max_attempts - 1),
            "client_retry_timeout": str(retry_budget),  # seconds
        }

    def reader(self, uri: str, block_size: int = 4 << 20) -> str | BinaryIO:
        """Something PyAV, Pillow and Lance-free readers open: a local path as is, else a file object that
        reads `block_size` bytes per ranged request."""
        if scheme(uri) == "file":
            return uri.removeprefix("file://")
        fs, path = self.fsspec(uri)
        return fs.open(path, "rb", block_size=block_size)

    def local_copy(self, uri: str, cache_dir: str | os.PathLike) -> str:
        """A local path for `uri`: itself when local, else a copy (file or folder) under `cache_dir`, made
        once. Model weights and row indexes live in object storage next to the data; libraries and memory
        maps want local files.

        Safe for many processes on one node with a cold cache, and only one of them downloads: it holds a
        lock file beside the copy's folder while it downloads into a temporary name and renames it into
        place (atomic); the others wait for the lock and find the copy (the 8 ranks of a node would
        otherwise fetch it 8 times).
        """
        if scheme(uri) == "file":
            return strip_scheme(uri)
        folder = os.path.join(cache_dir, hashlib.sha256(uri.encode()).hexdigest()[:16])
        target = os.path.join(folder, uri.rstrip("/").rsplit("/", 1)[-1])
        if os.path.exists(target):
            return target
        os.makedirs(folder, exist_ok=True)
        with open(f"{folder}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
            if not os.path.exists(target):
                self._download(uri, target)
        return target

    def _download(self, uri: str, target: str) -> None:
        fs, path = self.fsspec(uri)
        tmp = f"{target}.partial-{uuid.uuid4().hex}"
        try:
            fs.get(path, tmp, recursive=fs.isdir(path))
            os.rename(tmp, target)  # a file replaces an equal copy; a folder refuses a non-empty one
        except OSError:
            if not os.path.exists(target):
                raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.remove(tmp)


def scheme(uri: str) -> str:
    """'s3', 'gs', 'file', … ('file' for plain paths)."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def canonical_uri(uri: str) -> str:
    """One spelling per object, so that identities hashed from URIs (clip ids, shards, the done-log) do
    not depend on how a user typed the input.

    Local files become absolute normalised paths without a scheme (`file:///x/./a.mp4`, `/x//a.mp4` and
    `x/a.mp4` run from `/` are all `/x/a.mp4`): plain absolute paths, the common spelling, keep the ids
    they always had. Object-store URIs get a lower-case scheme, and repeated slashes in the key collapse.
    A trailing slash is dropped.
    """
    protocol = scheme(uri)
    if protocol == "file":
        path = re.sub("/+", "/", strip_scheme(uri))  # POSIX keeps a leading '//' apart; we do not
        return os.path.abspath(os.path.expanduser(path)) if path else path
    bucket, _, key = strip_scheme(uri).partition("/")
    key = re.sub("/+", "/", key).strip("/")
    return f"{protocol}://{bucket}/{key}" if key else f"{protocol}://{bucket}"


def join(base: str, *parts: str) -> str:
    """Join URI segments with '/', whatever the scheme."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
