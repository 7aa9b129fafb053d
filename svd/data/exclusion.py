"""Takedown lists (`data.exclude`): clips a run must no longer read, by clip_id or by video URI.

A list is a Lance table with a `clip_id` and/or `video_uri` column, or a text file with one clip_id or video
URI per line (blank lines and lines starting with `#` are ignored). A video URI removes every clip cut from
that video. The loader replaces an excluded position exactly as it replaces an undecodable one (DESIGN
decision 6), so no other position reads another row; the list's digest goes into the run's lineage, which
is how `jobs/provenance.py exclude-check=` later proves that no step after it read an excluded clip.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import lance

from svd.data.storage import Storage
from svd.errors import one_line

COLUMNS = ("clip_id", "video_uri")


class ExclusionError(ValueError):
    """A takedown list that cannot be read or holds nothing to exclude; the message names it."""


@dataclass(frozen=True)
class Exclusion:
    uri: str
    names: frozenset[str]  # clip_ids and video URIs, in one set: a clip is out when either is in it
    digest: str  # sha256 of the sorted names: what the lineage records and exclude-check compares

    def excludes(self, clip_id: str, video_uri: str) -> bool:
        return clip_id in self.names or video_uri in self.names


def read_exclusion(uri: str, storage: Storage) -> Exclusion:
    """The list at `uri`: a Lance table (a `.lance` folder) or a text file of names."""
    try:
        names = (
            _table_names(uri, storage) if uri.rstrip("/").endswith(".lance") else _file_names(uri, storage)
        )
    except (OSError, ValueError) as e:
        raise ExclusionError(f"data.exclude={uri}: cannot read it: {one_line(e)}") from None
    if not names:
        raise ExclusionError(f"data.exclude={uri} lists no clip_id or video_uri")
    digest = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
    return Exclusion(uri, frozenset(names), digest)


def _table_names(uri: str, storage: Storage) -> set[str]:
    table = lance.dataset(uri, storage_options=storage.lance_options(uri))
    columns = [c for c in COLUMNS if c in table.schema.names]
    if not columns:
        raise ValueError(f"it has neither of the columns {list(COLUMNS)}")
    names: set[str] = set()
    for batch in table.to_batches(columns=columns):
        for column in columns:
            names.update(v for v in batch.column(column).to_pylist() if v)
    return names


def _file_names(uri: str, storage: Storage) -> set[str]:
    fs, path = storage.fsspec(uri)
    text = fs.cat_file(path).decode()
    return {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
