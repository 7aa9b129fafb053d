"""Writing clip tables: rows (dicts) → a Lance table with the versioned clip schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lance
import pyarrow as pa

from svd.data.schema import OPTIONAL, clip_schema
from svd.data.storage import Storage


def to_arrow(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Rows in the clip schema; optional blob columns are included when the first row has them."""
    optional = tuple(name for name in OPTIONAL.names if rows and name in rows[0])
    return pa.Table.from_pylist(list(rows), schema=clip_schema(*optional))


def write_clip_table(
    uri: str, rows: Sequence[dict[str, Any]], storage: Storage, *, mode: str = "create"
) -> lance.LanceDataset:
    """Create (or `mode="append"` to) the clip table at `uri`; returns the dataset at the new version."""
    return lance.write_dataset(to_arrow(rows), uri, mode=mode, storage_options=storage.lance_options(uri))
