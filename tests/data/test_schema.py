import lance
import pyarrow as pa
import pytest

from svd.data import schema
from svd.data.schema import SchemaError, clip_schema, validate
from svd.data.table import write_clip_table


def row(**changes):
    base = {
        "clip_id": "a",
        "video_uri": "s3://b/a.mp4",
        "start_s": 0.0,
        "end_s": 2.0,
        "fps": 24.0,
        "width": 64,
        "height": 48,
        "num_frames": 48,
        "captions": ["x"],
        "motion_score": None,
        "aesthetic_score": None,
        "clip_score": None,
        "text_area": None,
        "camera_motion": None,
        "source": "s",
        "split": "train",
    }
    return base | changes


def test_a_written_table_reads_back_valid_with_its_version(tmp_path, moto_s3):
    table = write_clip_table(
        str(tmp_path / "t.lance"), [row(), row(clip_id="b", latents=b"\x00")], moto_s3.storage
    )
    assert validate(table.schema) == schema.SCHEMA_VERSION
    assert table.count_rows() == 2


def test_newer_schema_is_refused_with_its_version():
    newer = clip_schema().with_metadata({schema.VERSION_KEY: str(schema.SCHEMA_VERSION + 1).encode()})
    with pytest.raises(SchemaError, match="schema version 2, newer"):
        validate(newer)


def test_missing_column_is_named():
    broken = clip_schema().remove(clip_schema().get_field_index("fps"))
    with pytest.raises(SchemaError, match="missing column 'fps'"):
        validate(broken)


def test_wrong_type_is_named():
    s = clip_schema()
    broken = s.set(s.get_field_index("width"), pa.field("width", pa.string()))
    with pytest.raises(SchemaError, match="column 'width' has type string, expected int32"):
        validate(broken)


def test_a_table_not_written_as_a_clip_table_is_refused(tmp_path):
    plain = lance.write_dataset(pa.table({"x": [1]}), str(tmp_path / "p.lance"))
    with pytest.raises(SchemaError, match="not written as a clip table"):
        validate(plain.schema, where="p.lance")


def test_unknown_optional_column_is_named():
    with pytest.raises(SchemaError, match="thumbnails"):
        clip_schema("thumbnails")
