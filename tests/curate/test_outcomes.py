"""What a curation run promises about outcomes: only a final outcome marks a video done, a transient
failure fails the run and is redone by the next, and whatever can be checked before the first video is,
with one line and no credential."""

from __future__ import annotations

import json
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pytest

from svd.curate.ledger import log_uri
from svd.data.local_s3 import free_port
from svd.data.synthetic import moving_square
from svd.data.video_io import write_mp4

ROOT = Path(__file__).resolve().parents[2]
SECRET = "curate-test-secret"


@pytest.fixture(scope="module")
def main():
    """jobs/curate.py's main, in this process (a subprocess per call would import torch each time)."""
    previous = signal.getsignal(signal.SIGTERM)
    yield runpy.run_path(str(ROOT / "jobs" / "curate.py"), run_name="curate")["main"]
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def curate(main, capsys):
    """curate(*settings) → (exit status, stdout, stderr)."""

    def call(*settings: str) -> tuple[int, str, str]:
        code = main(list(settings))
        out, err = capsys.readouterr()
        assert SECRET not in out + err
        return code, out, err

    return call


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "curate-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "SVD_STORAGE_CONNECT_TIMEOUT": "0.5",
        "SVD_STORAGE_READ_TIMEOUT": "1",
        "SVD_STORAGE_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(key, value)


def videos(folder: Path, count: int) -> Path:
    """`count` 2.5-second videos of a square moving at different speeds: one clip each."""
    folder.mkdir(parents=True, exist_ok=True)
    for v in range(count):
        write_mp4(moving_square(60, 36, 64, velocity=(0.0, 1.0 + v)), folder / f"v{v}.mp4", 24)
    return folder


def settings(raw: Path, output: Path | str, *more: str) -> list[str]:
    return [f"input={raw}", f"output={output}", "workers=0", "min_clip_s=1", *more]


def log_status(output: Path | str) -> dict[str, str]:
    rows = lance.dataset(log_uri(str(output))).to_table(columns=["video_uri", "status"]).to_pylist()
    return {Path(r["video_uri"]).name: r["status"] for r in rows}


def test_a_malformed_sidecar_fails_the_run_and_the_video_is_redone_once_it_is_fixed(curate, tmp_path):
    raw = videos(tmp_path / "raw", 2)
    (raw / "v1.json").write_text('{"captions": ["a square", }')
    output = tmp_path / "clips.lance"
    code, out, err = curate(*settings(raw, output))
    assert code == 1
    assert "caption sidecar" in err
    assert f"{raw}/v1.json" in err
    assert log_status(output) == {"v0.mp4": "ok", "v1.mp4": "error"}
    (raw / "v1.json").write_text(json.dumps({"captions": ["a square"]}))
    code, out, err = curate(*settings(raw, output))
    assert code == 0, err
    assert "1 already in the table, 1 curated → 1 clips" in out
    assert log_status(output) == {"v0.mp4": "ok", "v1.mp4": "ok"}
    rows = lance.dataset(str(output)).to_table(columns=["video_uri", "captions"]).to_pylist()
    assert sorted((Path(r["video_uri"]).name, r["captions"]) for r in rows) == [
        ("v0.mp4", []),
        ("v1.mp4", ["a square"]),
    ]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("max_clip_s=-1", "max_clip_s=-1"),
        ("max_video_s=0.5", "max_video_s=0.5"),
        ("workers=two", "workers"),
        ("min_clip=3", "min_clip"),
    ],
)
def test_a_setting_that_would_fail_every_video_is_refused_in_one_line(curate, tmp_path, setting, named):
    code, _, err = curate(*settings(videos(tmp_path / "raw", 1), tmp_path / "clips.lance"), setting)
    assert code == 2
    assert named in err
    assert err.count("\n") == 1
    assert not (tmp_path / "clips.lance").exists()


def test_an_input_that_does_not_exist_is_an_error_not_an_empty_run(curate, tmp_path, moto_s3, monkeypatch):
    code, out, err = curate(*settings(tmp_path / "nowhere", tmp_path / "clips.lance"))
    assert (code, out) == (1, "")
    assert f"input={tmp_path / 'nowhere'}: no such file or folder" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.env["AWS_ENDPOINT_URL_S3"])
    bucket = moto_s3.new_bucket()
    code, out, err = curate(*settings(f"s3://{bucket}/raw-typo/", tmp_path / "clips.lance"))
    assert (code, out) == (1, "")
    assert f"input=s3://{bucket}/raw-typo/: no such file or folder" in err
    assert err.count("\n") == 1


def test_an_unwritable_output_is_found_before_any_video_is_curated(curate, tmp_path):
    (tmp_path / "a-file").write_text("")
    code, out, err = curate(*settings(videos(tmp_path / "raw", 1), tmp_path / "a-file" / "clips.lance"))
    assert (code, out) == (1, "")
    assert f"{tmp_path}/a-file/clips.lance" in err
    assert "Not a directory" in err
    assert err.count("\n") == 1


def test_a_refused_endpoint_is_one_line_before_any_video(curate, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    code, out, err = curate(*settings(videos(tmp_path / "raw", 1), "s3://bucket/clips.lance"))
    assert (code, out) == (1, "")
    assert err.startswith("curate: cannot read table s3://bucket/clips.lance: ")
    assert err.count("\n") == 1


def test_a_table_with_another_schema_is_refused_before_any_video(curate, tmp_path):
    output = tmp_path / "clips.lance"
    lance.write_dataset(pa.table({"clip_id": [1, 2]}), str(output))
    code, out, err = curate(*settings(videos(tmp_path / "raw", 1), output))
    assert (code, out) == (1, "")
    assert f"{output} exists with another schema: column 'clip_id' is int64, not string" in err
    assert lance.dataset(str(output)).version == 1


def test_a_tag_in_use_is_refused_before_the_run_and_tags_never_collide(curate, tmp_path):
    raw, output = videos(tmp_path / "raw", 1), tmp_path / "clips.lance"
    assert curate(*settings(raw, output, "tag=first"))[0] == 0
    write_mp4(moving_square(60, 36, 64), raw / "new.mp4", 24)
    version = lance.dataset(str(output)).version
    code, out, err = curate(*settings(raw, output, "tag=first"))
    assert (code, out) == (1, "")
    assert "tag='first' already names version" in err
    assert lance.dataset(str(output)).version == version
    for _ in range(2):  # default tags, one second apart at most
        write_mp4(moving_square(60, 36, 64), raw / f"more{_}.mp4", 24)
        assert curate(*settings(raw, output))[0] == 0
    assert len(lance.dataset(str(output)).tags.list()) == 3


@pytest.mark.slow
def test_a_model_that_does_not_load_stops_the_run_once_before_the_pool_starts(tmp_path):
    raw = videos(tmp_path / "raw", 1)
    argv = [sys.executable, str(ROOT / "jobs" / "curate.py"), *settings(raw, tmp_path / "clips.lance")]
    argv += ["workers=2", f"clip_model={tmp_path}/no-such-model", f"cache_dir={tmp_path}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"clip_model={tmp_path}/no-such-model" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
