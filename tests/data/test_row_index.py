"""The row index: which rows a filter keeps, cached by table content, built by one process for the others."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from svd.data import buckets as bucketing
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig, ensure_row_index
from svd.data.row_index import FilterError, RowIndex
from svd.data.schema import clip_schema
from svd.data.storage import Storage
from svd.data.synthetic import clip_table_batches, synthetic_corpus
from svd.data.table import write_clip_table

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("row_index_worker.py")

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


def write_table(uri: str, rows: int, **write_args) -> lance.LanceDataset:
    """A clip table of `rows` generated rows (their video is never opened here)."""
    batches = clip_table_batches(rows, "/no/such/video.mp4", chunk=min(rows, 1000))
    return lance.write_dataset(pa.RecordBatchReader.from_batches(clip_schema(), batches), uri, **write_args)


def test_the_row_index_holds_exactly_the_rows_that_pass_the_filter_into_each_bucket(tmp_path):
    """Against a plain reading of the table: two buckets, three fragments, deleted rows (offsets count only
    the rows that remain) and unscored clips (a NULL comparison keeps no row)."""
    uri = str(tmp_path / "clips.lance")
    write_table(uri, 3000, max_rows_per_file=1000)
    table = lance.dataset(uri)
    table.delete("clip_id LIKE '%7'")
    table.update({"motion_score": "NULL"}, where="clip_id LIKE '%3'")
    wide = Bucket(16, 24, frames=4, batch_size=2, fps=4)
    square = Bucket(16, 16, frames=24, batch_size=2, fps=4)
    cfg = LoaderConfig(
        table=uri, buckets=(wide, square), filter="motion_score > 0.3", num_workers=0, cache_dir=str(tmp_path)
    )
    index = RowIndex(ensure_row_index(cfg, Storage()))

    rows = lance.dataset(uri).to_table().to_pydict()
    duration = np.subtract(rows["end_s"], rows["start_s"])
    columns = {name: np.asarray(rows[name]) for name in ("width", "height", "num_frames", "fps")}
    assigned = bucketing.assign(cfg.buckets, **columns, duration=duration)
    kept = np.array([score is not None and score > 0.3 for score in rows["motion_score"]])
    assert index.offsets.dtype == np.uint32
    for b in range(2):
        expected = np.nonzero(kept & (assigned == b))[0]
        assert len(expected) > 100
        assert np.array_equal(index.rows(b, np.arange(index.size(b))), expected)


@pytest.mark.slow
def test_rank_0_builds_the_row_index_once_per_run_and_the_others_wait_past_the_collective_timeout(
    moto_s3, tmp_path
):
    """Three ranks on two nodes; the build takes 2.5× the collective timeout. One build for the run (not one
    per node), one download on the other node, the same offsets everywhere, and a line saying so; a build
    that fails is raised on every rank."""
    table = str(tmp_path / "clips.lance")
    write_table(table, 2000)
    shared = f"s3://{moto_s3.new_bucket()}/runs/r1/row_index"
    out = tmp_path / "out"
    out.mkdir()
    environment = os.environ | moto_s3.env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(WORKER), table, shared, str(out), "25"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    assert (out / "builds").read_text().split() == ["0"]
    assert len((out / "downloads").read_text().split()) == 1  # ranks 1 and 2 share node b's copy
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(3)]
    assert ranks[0]["index"].startswith(str(out / "cache-a"))
    assert ranks[1]["index"] == ranks[2]["index"]
    assert ranks[1]["index"].startswith(str(out / "cache-b"))
    offsets = [RowIndex(Path(rank["index"])).offsets for rank in ranks]
    assert all(np.array_equal(o, offsets[0]) for o in offsets)
    assert all(rank["sizes"] == ranks[0]["sizes"] for rank in ranks)
    assert f"{ranks[0]['sizes'][0]:,} of 2,000 rows kept in 1 bucket(s)" in (out / "rank0.out").read_text()

    # a build that fails on rank 0 fails every rank at once, naming it, instead of leaving them waiting
    assert ranks[0]["failure"].startswith(f"FileNotFoundError: cannot open clip table {table}-missing")
    for rank in ranks[1:]:
        assert rank["failure"].startswith(
            f"LoaderError: rank 0 could not build the row index of {table}-missing: FileNotFoundError: "
        )


def test_rank_0_publishes_the_index_its_node_kept_from_an_earlier_run(local_table, moto_s3, tmp_path):
    """A new run on the same node finds the index in its cache; the other nodes still need it published."""
    cfg = config(local_table, str(tmp_path / "node-a"))
    cached = ensure_row_index(cfg, Storage())  # an earlier run, without a shared folder
    shared = f"s3://{moto_s3.new_bucket()}/runs/r2/row_index"
    assert ensure_row_index(cfg, moto_s3.storage, shared=shared) == cached

    node_b = dataclasses.replace(cfg, cache_dir=str(tmp_path / "node-b"))
    loader = ClipLoader(node_b, storage=moto_s3.storage, build_index=False, shared_index=shared)
    assert loader.index.path.read_bytes() == cached.read_bytes()
    assert str(loader.index.path).startswith(str(tmp_path / "node-b"))
