"""The clip table: one row per clip (or image), the contract between curation and training.

The schema is versioned in the table's metadata (`svd.schema_version`). A reader accepts its own version
and older ones that it knows how to read; a newer table, a missing column or a column of the wrong type
fails with one line that names it, before any training starts.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
VERSION_KEY = b"svd.schema_version"
BLOB = {"lance-encoding:blob": "true"}  # stored out of line: a scan never reads them by accident
# JSON {"frames", "fps", "height", "width"}: how the `latents` column was encoded (curation's latent_*),
# so that the loader can refuse buckets that do not match it.
LATENTS_KEY = b"svd.latents"

CAMERA_MOTIONS = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "other")

REQUIRED = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_uri", pa.string(), nullable=False),  # any URI: s3://…, file://…, gs://…
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("fps", pa.float32(), nullable=False),  # of the source video
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),  # 1 for an image
        pa.field("captions", pa.list_(pa.string())),  # several per clip; training samples one
        pa.field("motion_score", pa.float32()),  # null until curation has scored the clip
        pa.field("aesthetic_score", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("text_area", pa.float32()),  # fraction of the frame covered by text
        pa.field("camera_motion", pa.string()),  # one of CAMERA_MOTIONS
        pa.field("source", pa.string()),  # dataset or crawl the video came from
        pa.field("split", pa.string()),  # train / val / test
    ]
)

OPTIONAL = pa.schema(
    [
        # The clip as its own encoded file, covering [start_s, end_s) of the source on a timeline from 0.
        pa.field("clip_bytes", pa.large_binary(), metadata=BLOB),
        pa.field("latents", pa.large_binary(), metadata=BLOB),  # .npy bytes of (T, C, h, w) VAE latents
    ]
)


class SchemaError(ValueError):
    """The table is not a clip table this version of svd can read."""


def clip_schema(*optional: str) -> pa.Schema:
    """The schema to write, with the named optional blob columns."""
    unknown = set(optional) - set(OPTIONAL.names)
    if unknown:
        raise SchemaError(f"unknown optional column(s) {sorted(unknown)}; choose from {OPTIONAL.names}")
    fields = list(REQUIRED) + [OPTIONAL.field(name) for name in optional]
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})


def _base_type(t: pa.DataType) -> pa.DataType:
    """Lance reads blob columns back as its own extension type; they were written as large_binary."""
    if isinstance(t, pa.ExtensionType) and "blob" in t.extension_name:
        return pa.large_binary()
    return t


def validate(schema: pa.Schema, where: str = "table") -> int:
    """Check a table's schema; returns its version. Raises SchemaError naming the first problem."""
    raw = (schema.metadata or {}).get(VERSION_KEY)
    if raw is None:
        raise SchemaError(
            f"{where} has no {VERSION_KEY.decode()} metadata: it was not written as a clip table"
        )
    try:
        version = int(raw)
    except ValueError:
        raise SchemaError(f"{where} has an unreadable {VERSION_KEY.decode()}={raw!r}") from None
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has schema version {version}, newer than this svd reads ({SCHEMA_VERSION})"
        )
    for expected in list(REQUIRED) + [f for f in OPTIONAL if f.name in schema.names]:
        if expected.name not in schema.names:
            raise SchemaError(f"{where} is missing column {expected.name!r} ({expected.type})")
        actual = _base_type(schema.field(expected.name).type)
        if actual != expected.type:
            raise SchemaError(f"{where} column {expected.name!r} has type {actual}, expected {expected.type}")
    return version
