"""The same input spelled differently is the same input: one set of clips, with the ids it always had."""

from __future__ import annotations

import hashlib

import lance

from svd.curate.config import CurateConfig
from svd.curate.pipeline import list_inputs, run, shard_of
from svd.data.storage import canonical_uri

from .conftest import video


def test_one_folder_spelled_three_ways_is_curated_once(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    for v in range(3):
        (raw / f"v{v}.mp4").write_bytes(video(v))
    monkeypatch.chdir(tmp_path)
    output = str(tmp_path / "clips.lance")
    spellings = [str(raw), f"file://{raw}", f"{tmp_path}//raw/./", "raw/"]
    curated = [
        run(CurateConfig(input=s, output=output, workers=0, min_clip_s=1), progress=False).curated
        for s in spellings
    ]
    assert curated == [3, 0, 0, 0]
    rows = lance.dataset(output).to_table(columns=["clip_id", "video_uri"]).to_pylist()
    # a plain absolute path was always the canonical spelling: its clip ids are the ones it always had
    assert sorted((r["video_uri"], r["clip_id"]) for r in rows) == [
        (f"{raw}/v{v}.mp4", hashlib.sha1(f"{raw}/v{v}.mp4".encode()).hexdigest()[:16] + "-0000")
        for v in range(3)
    ]


def test_an_object_store_prefix_spelled_three_ways_lists_the_same_uris(moto_s3):
    bucket = moto_s3.new_bucket()
    fs, _ = moto_s3.storage.fsspec(f"s3://{bucket}")
    fs.pipe_file(f"{bucket}/raw/a.mp4", video(0))
    spellings = [f"s3://{bucket}/raw", f"s3://{bucket}//raw/", f"S3://{bucket}/raw//"]
    assert {tuple(list_inputs(s, moto_s3.storage)) for s in spellings} == {(f"s3://{bucket}/raw/a.mp4",)}


def test_canonical_uris():
    assert canonical_uri("S3://bucket//raw///a.mp4") == "s3://bucket/raw/a.mp4"
    assert canonical_uri("file:///x//y/./z/") == "/x/y/z"
    assert canonical_uri("//x/y") == "/x/y"
    assert shard_of(canonical_uri("file:///x//y/./z/"), 7) == shard_of("/x/y/z", 7)
