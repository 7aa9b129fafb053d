"""Faulty networks on 127.0.0.1: an S3 endpoint that goes down and comes back, and one that never answers.

`Gate` is a TCP relay in front of a real S3 server: stopping it refuses new connections and cuts open ones,
which is what a client sees when the server process stops; starting it again on the same port is the
server coming back, with its objects (moto forgets them on a restart; radosgw takes ~15 s to restart).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from svd.data.local_s3 import free_port
from svd.data.synthetic import moving_square
from svd.data.video_io import encode_mp4

ROOT = Path(__file__).resolve().parents[2]
# Small deadlines, so that each fault costs seconds: Lance, s3fs and pyarrow all take them from here.
DEADLINES = {
    "SVD_STORAGE_CONNECT_TIMEOUT": "0.5",
    "SVD_STORAGE_READ_TIMEOUT": "0.5",
    "SVD_STORAGE_MAX_ATTEMPTS": "1",
}


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
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port again at once
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """The server is gone: new connections are refused, open ones are reset."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
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
                if from_client and trigger is not None and trigger[0] in data:
                    self.on_request = None
                    trigger[1]()
                    return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def gate(moto_s3) -> Iterator[Gate]:
    g = Gate(moto_s3.env["AWS_ENDPOINT_URL_S3"])
    g.start()
    yield g
    g.stop()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """Accepts TCP connections and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for s in held:
        s.close()
