"""The arena's records, all in its folder: who may vote, what each rater was shown, and every vote.

    raters.json     {name: {"token_sha256": …, "created": …}}: tokens themselves are never stored
    shown.lance     one row per pair shown to a rater (which model was on the left, when)
    votes.lance     one row per answer: rater, pair, question, choice, time, page load time, the models

Rows are appended (a Lance commit per call) before the caller answers the browser, so a vote that was
acknowledged is on storage; a restarted server reads both tables back and resumes the schedule.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from svd.config import ConfigError
from svd.data.storage import Storage, join, write_whole

RATERS_FILE = "raters.json"
RATER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

SHOWN_SCHEMA = pa.schema(
    [
        ("rater", pa.string()),
        ("pair", pa.string()),
        ("left", pa.string()),  # "a" or "b": which model of the pair was on the left
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)
VOTES_SCHEMA = pa.schema(
    [
        ("vote", pa.string()),  # one submission (its answers share it)
        ("rater", pa.string()),
        ("pair", pa.string()),
        ("question", pa.string()),
        ("choice", pa.string()),  # a | b | equal (the models of the pair)
        ("side", pa.string()),  # left | right | equal (what the rater clicked)
        ("model_a", pa.string()),
        ("model_b", pa.string()),
        ("condition", pa.int64()),
        ("motion_bucket_id", pa.int64()),
        ("seed", pa.int64()),
        ("time", pa.timestamp("us", tz="UTC")),  # when it was written
        ("shown_time", pa.timestamp("us", tz="UTC")),  # when the pair was given to the rater
        ("load_ms", pa.float64()),  # the browser's time from asking for the pair to both videos loaded
    ]
)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Raters:
    """Rater names and their token digests; re-read when an unknown token arrives, so that `add-rater`
    works while the server runs."""

    def __init__(self, arena_dir: str, storage: Storage):
        self.uri = join(arena_dir, RATERS_FILE)
        self.storage = storage
        self._by_digest: dict[str, str] = {}

    def add(self, name: str) -> str:
        """A new rater; returns their token (shown once: only its digest is kept)."""
        if not RATER_NAME.fullmatch(name):
            raise ConfigError(f"rater name {name!r}: 1–64 letters, digits and _.- only")
        raters = self._read()
        if name in raters:
            raise ConfigError(f"rater {name!r} exists already in {self.uri}")
        token = secrets.token_urlsafe(24)
        raters[name] = {"token_sha256": token_digest(token), "created": _now().isoformat()}
        fs, path = self.storage.fsspec(self.uri)
        write_whole(fs, path, json.dumps(raters, indent=2).encode())
        return token

    def rater(self, token: str) -> str | None:
        """The rater whose token this is, or None."""
        digest = token_digest(token)
        if digest not in self._by_digest:
            self._by_digest = {r["token_sha256"]: name for name, r in self._read().items()}
        for known, name in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return name
        return None

    def _read(self) -> dict[str, Any]:
        fs, path = self.storage.fsspec(self.uri)
        return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


class Table:
    """An append-only Lance table that may not exist yet."""

    def __init__(self, uri: str, schema: pa.Schema, storage: Storage):
        self.uri, self.schema, self.storage = uri, schema, storage
        self._lock = threading.Lock()

    def rows(self) -> list[dict[str, Any]]:
        dataset = self._dataset()
        return [] if dataset is None else dataset.to_table().to_pylist()

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Returns once the rows are committed."""
        import lance

        table = pa.Table.from_pylist(rows, schema=self.schema)
        with self._lock:
            mode = "create" if self._dataset() is None else "append"
            lance.write_dataset(
                table, self.uri, mode=mode, storage_options=self.storage.lance_options(self.uri)
            )

    def compact(self) -> None:
        """One fragment for the many that one-row appends leave (a server start reads the whole table)."""
        dataset = self._dataset()
        if dataset is not None and len(dataset.get_fragments()) > 1:
            with self._lock:
                dataset.optimize.compact_files()

    def _dataset(self):
        import lance

        try:
            return lance.dataset(self.uri, storage_options=self.storage.lance_options(self.uri))
        except (ValueError, FileNotFoundError):  # Lance's "not found" for a table never written
            return None


def shown_table(arena_dir: str, storage: Storage) -> Table:
    return Table(join(arena_dir, "shown.lance"), SHOWN_SCHEMA, storage)


def votes_table(arena_dir: str, storage: Storage) -> Table:
    return Table(join(arena_dir, "votes.lance"), VOTES_SCHEMA, storage)


def _now() -> datetime:
    return datetime.now(UTC)
