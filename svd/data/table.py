"""Clip tables on storage: opening one (telling "absent" from "unreachable"), rows → Arrow in the versioned
clip schema, and idempotent commits keyed on a primary key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lance
import pyarrow as pa

from svd.data.schema import OPTIONAL, clip_schema
from svd.data.storage import Storage

# Lance's marker for a table's key: with it, a merge-insert that races another one inserting the same key
# is detected at commit time and retried (measured with pylance 14 on radosgw: 3 concurrent inserts of the
# same 10 keys → 10 rows; without it, 30).
PRIMARY_KEY = {"lance-schema:unenforced-primary-key": "true"}


class TableUnreadableError(OSError):
    """A table whose existence could not be decided (storage unreachable, denied, corrupt): never "absent"."""


class TableWriteError(OSError):
    """A commit that failed (storage unreachable, denied, a conflict that retries did not resolve)."""


def with_primary_key(schema: pa.Schema, key: str) -> pa.Schema:
    index = schema.get_field_index(key)
    return schema.set(index, schema.field(key).with_metadata(PRIMARY_KEY))


def to_arrow(rows: Sequence[dict[str, Any]], optional: Sequence[str] | None = None) -> pa.Table:
    """Rows in the clip schema (clip_id as the primary key). The optional blob columns are `optional`, or
    by default those that any row has: a batch that starts with an image (no latents) keeps the latents
    of the videos after it."""
    if optional is None:
        optional = [name for name in OPTIONAL.names if any(name in row for row in rows)]
    return pa.Table.from_pylist(list(rows), schema=with_primary_key(clip_schema(*optional), "clip_id"))


def open_dataset(uri: str, storage: Storage, version: int | str | None = None) -> lance.LanceDataset | None:
    """The table at `uri`, or None when storage answered that there is none. Any other failure (endpoint
    down or silent, credentials, bucket missing) raises TableUnreadableError with one line: treating it as
    "not written yet" would let a later write create a second copy of everything."""
    try:
        return lance.dataset(uri, version=version, storage_options=storage.lance_options(uri))
    except (ValueError, OSError) as e:
        message = str(e)
        if message.startswith("Dataset at path") and "was not found" in message:
            return None
        problem = message.splitlines()[0][:300] + storage.timeout_hint(e)
        raise TableUnreadableError(f"cannot read table {uri}: {problem}") from None


def create_if_absent(uri: str, schema: pa.Schema, storage: Storage) -> None:
    """An empty table with `schema` at `uri`, unless one exists. Runs that may race call it before their
    first commit, long before: Lance turns a `create` that loses a race into an overwrite at the next
    version (measured with pylance 14 on radosgw: 3 concurrent creates → the table held one creator's
    rows). Empty over empty loses nothing; if ours did land on rows, their version is restored."""
    if open_dataset(uri, storage) is not None:
        return
    options = storage.lance_options(uri)
    try:
        created = lance.write_dataset(schema.empty_table(), uri, mode="create", storage_options=options)
    except (ValueError, OSError) as e:
        if open_dataset(uri, storage) is None:
            raise TableWriteError(f"cannot create {uri}: {str(e).splitlines()[0][:300]}") from None
        return  # another run created it first
    if created.version > 1:
        previous = lance.dataset(uri, version=created.version - 1, storage_options=options)
        if previous.count_rows():
            previous.restore()


def merge_commit(
    uri: str, table: pa.Table, storage: Storage, key: str, *, replace: str | None = None, attempts: int = 5
) -> int:
    """Adds the rows of `table` whose `key` the table at `uri` does not hold yet (creating the table if
    needed); returns the new version. Idempotent, also against concurrent commits of the same rows when the
    key is the table's primary key. `replace`: an SQL condition on `target.` columns under which a row with
    the same key is replaced instead (e.g. a transient error record by a final one)."""
    create_if_absent(uri, table.schema, storage)
    for _ in range(attempts):
        dataset = open_dataset(uri, storage)
        if dataset is None:
            raise TableWriteError(f"{uri} vanished while committing to it")
        merge = dataset.merge_insert(key)
        if replace is not None:
            merge = merge.when_matched_update_all(replace)
        try:
            merge.when_not_matched_insert_all().execute(table)
            return dataset.version
        except (ValueError, OSError) as e:
            error = e
            if "ncompatible transaction" not in str(e):
                break  # Lance retries conflicts between merges itself, not one with a concurrent create
    raise TableWriteError(f"cannot commit to {uri}: {str(error).splitlines()[0][:300]}") from None


def write_clip_table(
    uri: str, rows: Sequence[dict[str, Any]], storage: Storage, *, mode: str = "create"
) -> lance.LanceDataset:
    """Create (or `mode="append"` to) the clip table at `uri`; returns the dataset at the new version."""
    return lance.write_dataset(to_arrow(rows), uri, mode=mode, storage_options=storage.lance_options(uri))
