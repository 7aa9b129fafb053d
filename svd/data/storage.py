"""One place that turns a URI into the three views of storage the project needs.

    storage = Storage.from_env()
    fs, path = storage.fsspec("s3://bucket/raw/a.mp4")      # ranged reads of videos (s3fs, local, gcsfs …)
    pa_fs, path = storage.pyarrow("s3://bucket/meta.parquet")  # pyarrow datasets
    lance.dataset(uri, storage_options=storage.lance_options(uri))

Credentials and endpoint come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), so a job
config never holds a secret, and `Storage` never prints one: its repr and every error show URIs only.

Caveat (measured with pylance 14): Lance lets AWS_ENDPOINT_URL_S3 in the environment override the
`aws_endpoint` passed in `storage_options`, so a process reaches one S3 endpoint through Lance — the one
in its environment. `Storage.from_env()` keeps both the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlparse

import fsspec


@dataclass(frozen=True)
class Storage:
    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for a local S3 server
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> Storage:
        env = os.environ if env is None else env
        return Storage(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN"),
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
            )
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
        return options

    def reader(self, uri: str, block_size: int = 4 << 20) -> str | BinaryIO:
        """Something PyAV, Pillow and Lance-free readers open: a local path as is, else a file object that
        reads `block_size` bytes per ranged request."""
        if scheme(uri) == "file":
            return uri.removeprefix("file://")
        fs, path = self.fsspec(uri)
        return fs.open(path, "rb", block_size=block_size)

    def local_copy(self, uri: str, cache_dir: str | os.PathLike) -> str:
        """A local path for `uri`: itself when local, else a copy (file or folder) under `cache_dir`, made
        once. Model weights live in object storage next to the data; libraries want local files."""
        if scheme(uri) == "file":
            return strip_scheme(uri)
        import hashlib

        target = os.path.join(
            cache_dir, hashlib.sha256(uri.encode()).hexdigest()[:16], uri.rstrip("/").rsplit("/", 1)[-1]
        )
        if not os.path.exists(target):
            fs, path = self.fsspec(uri)
            tmp = f"{target}.partial"
            fs.get(path, tmp, recursive=fs.isdir(path))
            os.replace(tmp, target)
        return target


def scheme(uri: str) -> str:
    """'s3', 'gs', 'file', … ('file' for plain paths)."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def join(base: str, *parts: str) -> str:
    """Join URI segments with '/', whatever the scheme."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
