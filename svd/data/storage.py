"""One place that turns a URI into the three views of storage the project needs.

    storage = Storage.from_env()
    fs, path = storage.fsspec("s3://bucket/raw/a.mp4")      # ranged reads of videos (s3fs, local, gcsfs …)
    pa_fs, path = storage.pyarrow("s3://bucket/meta.parquet")  # pyarrow datasets
    lance.dataset(uri, storage_options=storage.lance_options(uri))

Credentials and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so a job
config never holds a secret, and `Storage` never prints one: its repr and every error show URIs only.

Every remote call has a deadline (DESIGN decision 8), set here for every client (s3fs/botocore,
Lance/object_store, pyarrow/AWS SDK): `connect_timeout` to open a connection, `read_timeout` for the
store's answer, `max_attempts` tries per request. Override them with SVD_STORAGE_CONNECT_TIMEOUT,
SVD_STORAGE_READ_TIMEOUT (seconds) and SVD_STORAGE_MAX_ATTEMPTS. The defaults fail a call to an endpoint
that accepts connections and never answers in well under a minute (measured in tests/faults against such an
endpoint: s3fs ~22 s, Lance ~33 s, pyarrow ~11 s):
- s3fs: botocore tries a request `max_attempts` times (standard mode: timeouts, resets, 5xx, throttling);
  s3fs's own loop runs a call twice, the only retry of an answer that breaks off mid-body (botocore does
  not retry those), so a call that times out is tried 2 · max_attempts times. aiohttp's read timeout
  starts only once a request's body is sent, so two waits get their own bound: the body is
  sent without `Expect: 100-continue` (aiohttp waits for the "100 Continue" without any deadline, where
  botocore's own client gives up waiting after 1 s and sends the body anyway), and a body the store stops
  reading fails after `read_timeout` (TCP_USER_TIMEOUT on the connection, Linux).
- Lance: object_store's `timeout` bounds a whole request (body included). Lance retries every listing 6
  times itself (pylance 14), and opening a table lists its versions, so object_store only retries
  requests that failed fast (within `read_timeout`): a table on a silent endpoint fails in ~6 ·
  read_timeout instead of 6 · max_attempts · read_timeout.
- pyarrow: `request_timeout` (curl's low-speed limit: no byte for that long) and `max_attempts`; curl
  waits 1 s for "100 Continue" and then sends the body.
An error that ran out of time says which settings to raise: `timeout_hint`.

Caveat (measured with pylance 14): Lance lets AWS_ENDPOINT_URL_S3 in the environment override the
`aws_endpoint` passed in `storage_options`, so a process reaches one S3 endpoint through Lance — the one
in its environment. `Storage.from_env()` keeps both the same.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import math
import os
import re
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import urlparse

import fsspec

TIMEOUT_VARIABLES = {
    "connect_timeout": "SVD_STORAGE_CONNECT_TIMEOUT",
    "read_timeout": "SVD_STORAGE_READ_TIMEOUT",
    "max_attempts": "SVD_STORAGE_MAX_ATTEMPTS",
}
S3FS_CALL_TRIES = 2  # s3fs's own loop around botocore's (s3fs's default: 5)
LANCE_LIST_TRIES = 6  # Lance's own loop around each listing (pylance 14: 5 retries, not configurable)


@dataclass(frozen=True)
class Storage:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local S3 server
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout: float = 3.0  # seconds to open a connection
    read_timeout: float = 5.0  # seconds a request may wait for the store (Lance: the whole request)
    max_attempts: int = 2  # tries per request, the first included

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
                    # botocore's "max_attempts" would count the retries only
                    "retries": {"total_max_attempts": self.max_attempts, "mode": "standard"},
                    "http_session_cls": _http_session_without_expect(),
                    "connector_args": {"socket_factory": self._socket_factory()},
                },
            )
            fs.retries = S3FS_CALL_TRIES  # a class attribute: set on the instance
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
        """`storage_options` for `lance.dataset` / `lance.write_dataset`.

        Lance's object store takes AWS_ENDPOINT_URL_S3 from the environment over the endpoint given here
        (object_store gives the variable the highest precedence), so where the two differ Lance would read or
        write the table on the other store, silently. That is refused in one line instead."""
        if scheme(uri) != "s3":
            return {}
        ambient = os.environ.get("AWS_ENDPOINT_URL_S3")
        if ambient and self.endpoint_url and ambient.rstrip("/") != self.endpoint_url.rstrip("/"):
            raise ValueError(
                f"{uri}: its store is {self.endpoint_url}, but AWS_ENDPOINT_URL_S3={ambient} in this process"
                "'s environment, which Lance would use instead: unset it or point it at the same store"
            )
        options = {"aws_region": self.region}
        if self.access_key:
            options |= {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key or ""}
        if self.session_token:
            options["aws_session_token"] = self.session_token
        if self.endpoint_url:
            options["aws_endpoint"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                options["allow_http"] = "true"
        return options | {
            "connect_timeout": f"{round(self.connect_timeout * 1000)}ms",
            "timeout": f"{round(self.read_timeout * 1000)}ms",
            "client_max_retries": str(self.max_attempts - 1),
            # object_store tries no more once this many seconds passed since a request's first try: a
            # request that timed out is not tried again (Lance's own loop retries listings), one that
            # failed fast is, up to `max_attempts` tries.
            "client_retry_timeout": str(math.ceil(self.read_timeout)),
        }

    def timeout_hint(self, error: BaseException) -> str:
        """For a message about `error`: when it ran out of time, the settings that would give the store
        longer (a slow store is worth waiting for; a dead one should fail the job, which the defaults do);
        else ""."""
        if not _timed_out(error, min(self.connect_timeout, self.read_timeout)):
            return ""
        return (
            f" (no answer in time: SVD_STORAGE_READ_TIMEOUT={self.read_timeout:g} s, "
            f"SVD_STORAGE_CONNECT_TIMEOUT={self.connect_timeout:g} s, "
            f"SVD_STORAGE_MAX_ATTEMPTS={self.max_attempts}; raise them for a slow store)"
        )

    def _socket_factory(self) -> functools.partial:
        """aiohttp's socket factory, with `read_timeout` as the TCP user timeout. A partial of a module
        function, not a closure, so that equal settings give equal arguments: fsspec's instance cache then
        hands out one S3FileSystem (and one connection pool) for them."""
        return functools.partial(_socket_with_user_timeout, round(self.read_timeout * 1000))

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


def write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the file whole or not at all: an object store's PUT replaces an object in one go; a local
    file is written beside its place and renamed into it."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def _socket_with_user_timeout(user_timeout_ms: int, addr_info: tuple[Any, ...]) -> socket.socket:
    """A client socket whose connection fails once data it sent stays unacknowledged for `user_timeout_ms`,
    a store that stopped reading included (zero-window probes count too): aiohttp has no write timeout."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    if hasattr(socket, "TCP_USER_TIMEOUT") and family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout_ms)
    return sock


@functools.cache
def _http_session_without_expect() -> type:
    """aiobotocore's aiohttp session, sending request bodies without `Expect: 100-continue` (see the module
    docstring). One class for the process, so that fsspec's instance cache still recognises the settings."""
    from aiobotocore.httpsession import AIOHTTPSession

    class AIOHTTPSessionWithoutExpect(AIOHTTPSession):
        async def send(self, request):
            if "Expect" in request.headers:
                del request.headers["Expect"]  # not signed by SigV4 (botocore leaves it out)
            return await super().send(request)

    return AIOHTTPSessionWithoutExpect


_OBJECT_STORE_ELAPSED = re.compile(r" in (\d+(?:\.\d+)?)(ms|s)(?:, after [^-]*)? - HTTP error")


def _timed_out(error: BaseException, shortest_timeout_s: float) -> bool:
    """Whether `error`, or an error it was raised from, is a client giving up waiting: Python's and
    botocore's timeout types, an OS-level ETIMEDOUT, curl's wording (pyarrow), or an object_store request
    (Lance) that failed after at least the shortest of our timeouts (its message does not say why)."""
    from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, TimeoutError | ConnectTimeoutError | ReadTimeoutError):
            return True
        if isinstance(error, OSError) and error.errno == errno.ETIMEDOUT:
            return True
        text = str(error).lower()
        if "timed out" in text or "timeout was reached" in text:
            return True
        elapsed = _OBJECT_STORE_ELAPSED.search(str(error))
        if elapsed and float(elapsed[1]) / (1000 if elapsed[2] == "ms" else 1) >= shortest_timeout_s:
            return True
        error = error.__cause__ or error.__context__
    return False


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
