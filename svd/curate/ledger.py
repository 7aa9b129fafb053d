"""What a curation run has finished, and its commits: the clip table and the video log beside it.

The log (`<table>.videos.lance`) has one record per video: "ok" (it produced clips), a final rejection
(a reason intrinsic to the input, e.g. "unreadable", "too_short"), or "error" — a transient failure
(storage, model loading, settings) that the next run retries (DESIGN decision 7). Only a final record,
or clips in the table, mark a video done.

Commits are idempotent: clips merge into the table on `clip_id` (its primary key) and records into the log
on `video_uri`, so two runs of one shard at once, or a rerun after a crash between the two commits, never
add a row twice. The cost: each commit joins its keys against the table's key column.
"""

from __future__ import annotations

import time
import uuid

import lance
import pyarrow as pa

from svd.curate.probe import REJECTIONS
from svd.data.schema import OPTIONAL, REQUIRED
from svd.data.storage import Storage, canonical_uri, scheme
from svd.data.table import create_if_absent, merge_commit, open_dataset, to_arrow, with_primary_key

TRANSIENT = "error"
FINAL = ("ok", "no_clips", *REJECTIONS)

VIDEO_LOG = with_primary_key(
    pa.schema(
        [
            pa.field("video_uri", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),  # one of FINAL, or TRANSIENT
            pa.field("clips", pa.int32()),
            pa.field("duration_s", pa.float64()),
            pa.field("fps", pa.float32()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("codec", pa.string()),
            pa.field("seconds", pa.float32()),  # processing time
            pa.field("detail", pa.string()),
        ]
    ),
    "video_uri",
)


class OutputError(Exception):
    """The output table cannot take this run's commits; the message is one line naming it."""


def log_uri(table_uri: str) -> str:
    return table_uri.rstrip("/").removesuffix(".lance") + ".videos.lance"


def already_processed(table_uri: str, storage: Storage) -> set[str]:
    """Canonical URIs of the videos with clips in the table or a final record in its log: a rerun skips
    them. A table that cannot be read raises TableUnreadableError: it is never taken for "not written yet"."""
    done: set[str] = set()
    clips = open_dataset(table_uri, storage)
    if clips is not None:
        done |= _unique_uris(clips, None)
    log = open_dataset(log_uri(table_uri), storage)
    if log is not None:
        done |= _unique_uris(log, f"status IN ({', '.join(repr(s) for s in FINAL)})")
    return done


def _unique_uris(table: lance.LanceDataset, where: str | None) -> set[str]:
    uris = table.to_table(columns=["video_uri"], filter=where).column("video_uri").unique().to_pylist()
    return {canonical_uri(u) for u in uris}  # records of older runs may spell inputs differently


def check_output(table_uri: str, storage: Storage, *, latents: bool, tag: str | None) -> None:
    """Before any video is touched: the table and its log are readable (or absent), have schemas this run
    can write into, the tag is free, and the place is writable; then both exist (empty if new).
    Raises OutputError, TableUnreadableError or TableWriteError."""
    clips = open_dataset(table_uri, storage)
    if clips is not None:
        expected = list(REQUIRED) + ([OPTIONAL.field("latents")] if latents else [])
        _check_schema(table_uri, clips.schema, expected)
        if tag and tag in clips.tags.list():
            raise OutputError(
                f"tag={tag!r} already names version {clips.tags.list()[tag]['version']} "
                f"of {table_uri}: choose another"
            )
    log = open_dataset(log_uri(table_uri), storage)
    if log is not None:
        _check_schema(log_uri(table_uri), log.schema, list(VIDEO_LOG))
    _check_writable(table_uri, storage)
    # now, not at the first commit: runs that race to create them can then lose nothing (create_if_absent)
    create_if_absent(table_uri, to_arrow([], ["latents"] if latents else []).schema, storage)
    create_if_absent(log_uri(table_uri), VIDEO_LOG, storage)


def _check_schema(uri: str, schema: pa.Schema, expected: list[pa.Field]) -> None:
    for field in expected:
        if field.name not in schema.names:
            raise OutputError(f"{uri} exists with another schema: no column {field.name!r} ({field.type})")
        actual = schema.field(field.name).type
        if isinstance(actual, pa.ExtensionType):  # Lance reads blob columns back as an extension type
            actual = actual.storage_type
        if actual != field.type:
            raise OutputError(
                f"{uri} exists with another schema: column {field.name!r} is {actual}, not {field.type}"
            )


def _check_writable(table_uri: str, storage: Storage) -> None:
    """Writes and deletes a small object beside the table."""
    parent, _, name = canonical_uri(table_uri).rpartition("/")
    probe = f"{parent}/.{name}.write-check-{uuid.uuid4().hex[:12]}"
    fs, path = storage.fsspec(probe)
    try:
        if scheme(table_uri) == "file":
            fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, b"")
        fs.rm(path)
    except Exception as e:  # any failure here means the run could not commit: say so before curating
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise OutputError(f"output={table_uri} is not writable: {type(e).__name__}: {detail}") from None


def commit(table_uri: str, clips: pa.Table | None, records: pa.Table | None, storage: Storage) -> int | None:
    """Clips first, then their videos' records: a crash between the two leaves the videos done (they have
    clips) rather than curated twice. Returns the clip table's new version (None if no clips)."""
    version = None
    if clips is not None and clips.num_rows:
        version = merge_commit(table_uri, clips, storage, "clip_id")
    if records is not None and records.num_rows:
        replace = f"target.status = '{TRANSIENT}'"  # a final record supersedes an earlier transient one
        merge_commit(log_uri(table_uri), records, storage, "video_uri", replace=replace)
    return version


def default_tag(shard: str) -> str:
    """Unique per run: two runs started in the same second must not collide."""
    index, shards = shard.split("/")
    return f"curate-{time.strftime('%Y%m%d-%H%M%S')}-shard{index}of{shards}-{uuid.uuid4().hex[:6]}"


def tag_version(table_uri: str, storage: Storage, tag: str, version: int) -> None:
    table = open_dataset(table_uri, storage)
    if table is None:
        raise OutputError(f"{table_uri} vanished before version {version} could be tagged {tag!r}")
    table.tags.create(tag, version)
