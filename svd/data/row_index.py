"""The row index: offsets of the clip-table rows that pass the loader's filter, grouped by bucket.

Built once per run (rank 0) and per (table content, filter, buckets) by a scan of a few columns with the
filter pushed down to Lance, written atomically to one Arrow file, memory-mapped by every process (152M rows
are 0.6 GB of uint32 offsets: mapped once per node, not copied per worker). The cache key is the table's
*content*, not its URI and version number: a table deleted and re-created at the same URI starts again at
version 1 with other rows, and an index keyed on the version would serve stale offsets (rows missing, or
`take` of offsets past the end of the new table).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from svd.data import buckets as bucketing
from svd.data import schema
from svd.data.buckets import Bucket
from svd.errors import one_line

FORMAT = 3  # 3: offsets are uint32 when the table has fewer than 2³² rows
_META_KEY = b"svd.row_index"
_INDEX_COLUMNS = {
    "width": "width",
    "height": "height",
    "num_frames": "num_frames",
    "fps": "fps",
    "duration": "end_s - start_s",
}
# Bytes a scan may read ahead. Lance's default let a 10M-row build peak at 435 MiB on radosgw; 64 MiB peaks at
# 215 MiB in the same time (bench/row_index.py), and the peak no longer grows with the store's bandwidth.
SCAN_BUFFER_BYTES = 64 << 20
PROGRESS_EVERY_S = 10.0  # a progress line this often while a build runs (152M rows take minutes on S3)


class FilterError(ValueError):
    """`data.filter` is not one SQL boolean expression over the clip table."""


class RowIndex:
    """Offsets of the rows that pass the filter, grouped by bucket, in a memory-mapped Arrow file."""

    def __init__(self, path: Path):
        self.path = path
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        meta = json.loads(reader.schema.metadata[_META_KEY])
        if meta["format"] != FORMAT:
            raise ValueError(f"{path}: row index format {meta['format']}, expected {FORMAT}")
        self.starts: list[int] = meta["starts"]
        self.offsets = reader.read_all().column("offset").to_numpy()  # zero-copy view of the mapping

    def size(self, bucket: int) -> int:
        return self.starts[bucket + 1] - self.starts[bucket]

    def rows(self, bucket: int, indices: np.ndarray) -> np.ndarray:
        """Table offsets of the given indices within a bucket."""
        return self.offsets[self.starts[bucket] + indices].astype(np.int64)


def content_id(table: lance.LanceDataset) -> str:
    """A digest of the rows a table version holds: its fragments' data and deletion files.

    Lance names data files with random UUIDs and never rewrites them, so a re-created or rewritten table
    has other names; versions that only change metadata, tags or config share the digest (and the index).
    """
    digest = hashlib.sha256()
    for fragment in table.get_fragments():
        meta = fragment.metadata
        deletion = meta.deletion_file
        deleted = None if deletion is None else meta.to_json()["deletion_file"]
        files = [f.path for f in meta.files]
        digest.update(json.dumps([meta.id, meta.physical_rows, files, deleted], sort_keys=True).encode())
    return digest.hexdigest()[:32]


def index_path(
    cache_dir: str | os.PathLike, uri: str, content: str, filter: str | None, buckets: tuple[Bucket, ...]
) -> Path:
    """Where the index of this table content (`content_id`), filter and bucket shapes lives."""
    shapes = [(b.height, b.width, b.frames, b.fps) for b in buckets]
    spec = json.dumps([uri, content, filter, shapes, schema.SCHEMA_VERSION, FORMAT])
    return Path(cache_dir) / f"{hashlib.sha256(spec.encode()).hexdigest()[:24]}.arrow"


def check_filter(table: lance.LanceDataset, filter: str, where: str) -> str:
    """The filter as the expression to evaluate, once it is known to be one SQL boolean expression.

    Lance parses `SELECT 1 FROM t WHERE <filter>` and ignores whatever follows the first complete
    expression: `a = 'x'; b < 0` or `a = 'x') OR (b < 0` silently keep the rows of `a = 'x'`. So: no `;`,
    comment or unbalanced parenthesis outside string literals; then the filter goes inside parentheses, where
    trailing tokens are a parse error, and its type must be boolean.
    """
    problem = _lexical_problem(filter)
    if problem is None:
        expression = f"({filter})"
        try:
            kind = table.scanner(columns={"keep": expression}, limit=0).projected_schema.field("keep").type
        except (ValueError, OSError) as e:  # Lance reports parse and schema errors as ValueError
            problem = one_line(e)
        else:
            if kind == pa.bool_():
                return expression
            problem = f"it is of type {kind}, not boolean"
    raise FilterError(f"data.filter={filter!r} is not one SQL boolean expression on {where}: {problem}")


def _lexical_problem(filter: str) -> str | None:
    """What makes `filter` more (or less) than one expression, looking only outside string literals."""
    depth, i, quote = 0, 0, None
    while i < len(filter):
        c = filter[i]
        if quote:
            if c == quote and filter[i + 1 : i + 2] == quote:
                i += 1  # a doubled quote inside a literal
            elif c == quote:
                quote = None
        elif c in "'\"`":
            quote = c
        elif c == ";":
            return "';' ends the statement: give one expression"
        elif filter[i : i + 2] in ("--", "/*"):
            return "comments are not allowed"
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return f"unbalanced ')' at character {i}"
        i += 1
    if quote:
        return f"unterminated {quote} literal"
    if depth:
        return "unbalanced '('"
    if not filter.strip():
        return "it is empty"
    return None


def build(
    table: lance.LanceDataset,
    expression: str | None,
    buckets: tuple[Bucket, ...],
    path: Path,
    progress: Callable[[str], None] | None = None,
) -> RowIndex:
    """Scan the columns that decide membership and write the index atomically (concurrent builders write
    identical files; the rename is atomic). `expression` comes from `check_filter`.

    The filter goes to Lance (`filter=`, with the offsets from `_rowoffset`), which evaluates it on its own
    threads, uses scalar indexes where the table has them and returns only the kept rows; the bucket columns
    are projected, never whole rows, and the read-ahead is bounded (`SCAN_BUFFER_BYTES`). Offsets are uint32
    below 2³² rows: half the memory, file and copies. `progress` gets a line every `PROGRESS_EVERY_S`
    seconds and one at the end.
    """
    started = time.monotonic()
    total = table.count_rows()
    dtype = np.uint32 if total < 2**32 else np.uint64
    columns = dict(_INDEX_COLUMNS) | {"offset": "_rowoffset"}
    scanner = table.scanner(
        columns=columns,
        filter=expression,
        scan_in_order=True,
        batch_size=1 << 16,
        io_buffer_size=SCAN_BUFFER_BYTES,
    )
    per_bucket: list[list[np.ndarray]] = [[] for _ in buckets]
    reported = started
    for batch in scanner.to_batches():
        if not batch.num_rows:
            continue
        cols = {name: batch.column(name).to_numpy(zero_copy_only=False) for name in _INDEX_COLUMNS}
        assigned = bucketing.assign(buckets, **cols)
        offsets = batch.column("offset").to_numpy()
        for b in range(len(buckets)):
            per_bucket[b].append(offsets[assigned == b].astype(dtype))
        if progress and time.monotonic() - reported >= PROGRESS_EVERY_S:
            reported = time.monotonic()
            scanned = int(offsets[-1]) + 1  # offsets come in table order
            progress(
                f"row index of {table.uri}: {scanned:,} of {total:,} rows scanned "
                f"({100 * scanned / max(total, 1):.0f}%) in {reported - started:.0f} s"
            )
    groups = [np.concatenate(g) if g else np.zeros(0, dtype) for g in per_bucket]
    per_bucket.clear()  # the pieces: only the groups stay alive while the file is written
    starts = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).tolist()
    meta = {"format": FORMAT, "starts": starts, "filter": expression, "table_version": table.version}
    index = pa.table({"offset": np.concatenate(groups)})
    del groups
    index = index.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, index.schema) as writer:
        writer.write_table(index)
    os.replace(tmp, path)
    if progress:
        progress(
            f"row index of {table.uri}: {starts[-1]:,} of {total:,} rows kept in {len(buckets)} bucket(s), "
            f"built in {time.monotonic() - started:.1f} s"
        )
    return RowIndex(path)
