"""Faulty networks on 127.0.0.1: an S3 endpoint that goes down and comes back, and one that never answers.

`Gate` is a TCP relay in front of a real S3 server: stopping it refuses new connections and cuts open ones,
which is what a client sees when the server process stops; starting it again on the same port is the
server coming back, with its objects (moto forgets them on a restart; radosgw takes ~15 s to restart).
Silencing it is a server that hangs: connections stay open, new ones are accepted, nothing is read or
answered any more. `silent_endpoint` is such a server from the start (a black hole).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from svd.data.local_s3 import free_port
from svd.data.storage import LANCE_LIST_TRIES, S3FS_CALL_TRIES, Storage
from svd.data.synthetic import moving_square
from svd.data.video_io import encode_mp4

ROOT = Path(__file__).resolve().parents[2]
# Small deadlines, so that each fault costs seconds: Lance, s3fs and pyarrow all take them from here.
DEADLINES = {
    "SVD_STORAGE_CONNECT_TIMEOUT": "0.5",
    "SVD_STORAGE_READ_TIMEOUT": "0.5",
    "SVD_STORAGE_MAX_ATTEMPTS": "1",
}
# Deadlines with a retry, for the tests that count how the clients compose them.
RETRYING_DEADLINES = {
    "SVD_STORAGE_CONNECT_TIMEOUT": "1",
    "SVD_STORAGE_READ_TIMEOUT": "1",
    "SVD_STORAGE_MAX_ATTEMPTS": "2",
}


def tries(storage: Storage, client: str) -> int:
    """The requests one call of `client` makes before it gives up on an endpoint that accepts connections
    and never answers, each waiting `read_timeout` (svd/data/storage.py says why)."""
    return {
        "s3fs": S3FS_CALL_TRIES * storage.max_attempts,  # s3fs's loop around botocore's
        "lance": LANCE_LIST_TRIES,  # Lance's loop around a listing; object_store does not retry a timeout
        "pyarrow": storage.max_attempts,
    }[client]


def give_up_within_s(storage: Storage, client: str) -> float:
    """An upper bound of how long that takes: each try's overhead (a connection, backoff: botocore's and
    the AWS SDK's first retry waits up to 1 s, random) is well under 1.5 s on an idle machine."""
    return tries(storage, client) * (storage.read_timeout + 1.5)


def curate_argv(*settings: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "curate.py"), "workers=0", "min_clip_s=1", *settings]


def curate_env(endpoint_env: dict[str, str] | None = None) -> dict[str, str]:
    return os.environ | DEADLINES | (endpoint_env or {}) | {"PYTHONPATH": str(ROOT)}


def video(v: int) -> bytes:
    """A 2.5-second video of a square moving at speed v + 1: one clip (min_clip_s=1), distinct per v."""
    return encode_mp4(moving_square(60, 36, 64, velocity=(0.0, 1.0 + v)), 24)


class Gate:
    def __init__(self, upstream: str):
        url = urlparse(upstream)
        self.upstream = (url.hostname, url.port)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.on_request: tuple[bytes, Callable[[], None]] | None = None  # (bytes seen, action), fires once
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._silent = False
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port again at once
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def silence(self) -> None:
        """The server hangs: from now on nothing is read or answered, and connections stay open."""
        self._silent = True

    def stop(self) -> None:
        """The server is gone: new connections are refused, open ones are reset."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
            self._silent = False
        if listener is not None:
            listener.close()
        for s in connections:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            if self._silent:
                with self._lock:
                    self._open.add(client)  # held open, never read
                continue
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                trigger = self.on_request
                fired = from_client and trigger is not None and trigger[0] in data
                if fired:
                    self.on_request = None
                    trigger[1]()
                if self._silent:
                    return  # hung: both sockets stay open (until `stop`), nothing more is read or sent
                if fired:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def gate(moto_s3) -> Iterator[Gate]:
    g = Gate(moto_s3.env["AWS_ENDPOINT_URL_S3"])
    g.start()
    yield g
    g.stop()


class SilentEndpoint(str):
    """The URL of a server that accepts TCP connections and never sends a byte (a black hole); it counts
    the connections (a client opens one per try: it drops a connection that timed out) and notes when the
    first came."""

    def __new__(cls, url: str) -> SilentEndpoint:
        endpoint = super().__new__(cls, url)
        endpoint.connections = []  # accepted sockets, held open
        endpoint.first_connection_at = None  # time.monotonic()
        return endpoint


@pytest.fixture
def silent_endpoint() -> Iterator[SilentEndpoint]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(64)
    endpoint = SilentEndpoint(f"http://127.0.0.1:{listener.getsockname()[1]}")

    def accept() -> None:
        while True:
            try:
                connection = listener.accept()[0]
            except OSError:
                return
            endpoint.first_connection_at = endpoint.first_connection_at or time.monotonic()
            endpoint.connections.append(connection)

    threading.Thread(target=accept, daemon=True).start()
    yield endpoint
    listener.close()
    for s in endpoint.connections:
        s.close()
