"""Writing clip tables: Arrow conversion, telling an absent table from an unreachable one, idempotent
commits."""

import lance
import pytest

from svd.data.local_s3 import free_port
from svd.data.storage import Storage
from svd.data.table import TableUnreadableError, merge_commit, open_dataset, to_arrow


def row(clip_id: str, **extra) -> dict:
    return {
        "clip_id": clip_id,
        "video_uri": f"/raw/{clip_id}.mp4",
        "start_s": 0.0,
        "end_s": 2.0,
        "fps": 24.0,
        "width": 64,
        "height": 48,
        "num_frames": 48,
    } | extra


def test_latents_survive_a_batch_that_starts_with_an_image():
    batch = [row("image", num_frames=1), row("video-a", latents=b"A"), row("video-b", latents=b"B")]
    table = to_arrow(batch)
    assert table.column("latents").to_pylist() == [None, b"A", b"B"]
    assert "latents" not in to_arrow(batch, optional=[]).column_names


def test_an_absent_table_is_none_and_an_unreachable_one_raises(tmp_path):
    assert open_dataset(str(tmp_path / "none.lance"), Storage()) is None
    dead = Storage(
        endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: connection refused
        access_key="k",
        secret_key="s",
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
    )
    with pytest.raises(TableUnreadableError, match=r"cannot read table s3://b/t\.lance"):
        open_dataset("s3://b/t.lance", dead)


def test_a_repeated_commit_adds_nothing(tmp_path):
    uri = str(tmp_path / "t.lance")
    merge_commit(uri, to_arrow([row("a"), row("b")]), Storage(), "clip_id")
    version = merge_commit(uri, to_arrow([row("b"), row("c")]), Storage(), "clip_id")
    table = lance.dataset(uri)
    assert sorted(table.to_table().column("clip_id").to_pylist()) == ["a", "b", "c"]
    assert table.version == version
