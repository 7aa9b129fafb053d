"""The row index: which rows a filter keeps, cached by table content, built by one process for the others."""

from __future__ import annotations

import pytest

from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, ensure_row_index
from svd.data.row_index import FilterError
from svd.data.storage import Storage
from svd.data.synthetic import synthetic_corpus
from svd.data.table import write_clip_table

VIDEO = Bucket(16, 24, frames=4, batch_size=2, fps=4)


@pytest.fixture(scope="module")
def local_table(tmp_path_factory):
    """6 one-second clips of 2 local videos, all camera_motion 'static', motion_score > 0."""
    folder = tmp_path_factory.mktemp("clips")
    (folder / "raw").mkdir()
    rows = synthetic_corpus(str(folder / "raw"), Storage(), videos=2, seconds=3.0, clip_seconds=1.0)
    write_clip_table(str(folder / "clips.lance"), rows, Storage())
    return str(folder / "clips.lance")


def config(table: str, cache: str, **fields) -> LoaderConfig:
    return LoaderConfig(table=table, buckets=(VIDEO,), num_workers=0, cache_dir=cache, **fields)


@pytest.mark.parametrize(
    "bad",
    [
        "camera_motion = 'static'; motion_score < 0",  # Lance kept the 6 rows of the first half
        "camera_motion = 'static') OR (motion_score < 0",
        "camera_motion = 'static' motion_score < 0",
        "camera_motion = 'static' -- AND motion_score < 0",
        "motion_score < 0, camera_motion = 'static'",
        "(motion_score < 0",
        "motion_score",
        "no_such_column > 1",
        "  ",
    ],
)
def test_a_filter_that_is_not_one_boolean_expression_is_refused_in_one_line(local_table, tmp_path, bad):
    with pytest.raises(FilterError, match=r"^data\.filter=") as e:
        ClipLoader(config(local_table, str(tmp_path), filter=bad), storage=Storage())
    assert "\n" not in str(e.value)
    assert local_table in str(e.value)


def test_semicolons_and_parentheses_inside_string_literals_are_part_of_the_filter(local_table, tmp_path):
    kept = ClipLoader(
        config(local_table, str(tmp_path), filter="camera_motion = 'a;b)' OR motion_score > 0"),
        storage=Storage(),
    )
    assert kept.sizes == (6,)
    with pytest.raises(ValueError, match=r"^no row .* passes filter"):  # parsed whole: keeps no row
        ClipLoader(
            config(local_table, str(tmp_path), filter="camera_motion = 'it''s; (' OR motion_score < 0"),
            storage=Storage(),
        )


def test_a_table_recreated_at_the_same_uri_gets_a_fresh_row_index(moto_s3, s3_bucket, tmp_path):
    rows = synthetic_corpus(f"{s3_bucket}/raw", moto_s3.storage, videos=6, seconds=3.0, clip_seconds=1.0)
    table = f"{s3_bucket}/clips.lance"
    cfg = config(table, str(tmp_path))
    write_clip_table(table, rows[:6], moto_s3.storage)
    assert ClipLoader(cfg, storage=moto_s3.storage).sizes == (6,)

    fs, path = moto_s3.storage.fsspec(table)
    fs.rm(path, recursive=True)
    write_clip_table(table, rows, moto_s3.storage)  # version 1 again, 18 rows
    again = ClipLoader(cfg, storage=moto_s3.storage)
    assert (again.table_version, again.sizes) == (1, (18,))
    seen = {row for batch in zip(range(9), iter(again), strict=False) for row in batch[1]["row"].tolist()}
    assert seen == set(range(18))


def test_ranks_open_the_row_index_that_one_process_built(local_table, tmp_path):
    cfg = config(local_table, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="rank 0 builds it"):
        ClipLoader(cfg, storage=Storage(), build_index=False)
    path = ensure_row_index(cfg, Storage())
    built = path.stat().st_mtime_ns
    assert ensure_row_index(cfg, Storage()) == path  # a second call finds it
    ranks = [ClipLoader(cfg, storage=Storage(), rank=r, world_size=2, build_index=False) for r in range(2)]
    assert all(rank.index.path == path and rank.sizes == (6,) for rank in ranks)
    assert path.stat().st_mtime_ns == built
