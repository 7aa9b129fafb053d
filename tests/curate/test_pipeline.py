"""The curation run end to end, on a real S3 server, against videos whose shots are known."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import lance
import pytest
from PIL import Image

from svd.curate import pipeline
from svd.curate.config import CurateConfig
from svd.curate.ledger import log_uri
from svd.curate.pipeline import list_inputs, run, shard_of
from svd.curate.provenance import CURATION_KEY, curation_record, sha256_of
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.synthetic import moving_square
from svd.data.video_io import encode_mp4
from svd.version import code_version

from .conftest import FPS, shots_video

ROOT = Path(__file__).resolve().parents[2]
LENGTHS = (72, 96, 84)  # pan 3 s | cut | zoom 4 s, minus the dissolve | dissolve 12 frames | square 3 s


def upload(storage, uri: str, data: bytes) -> None:
    fs, path = storage.fsspec(uri)
    fs.pipe_file(path, data)


@pytest.fixture(scope="module")
def raw(moto_s3):
    """3 videos of 3 shots with sidecar captions, an image, a garbage file and a 1-second video."""
    bucket = f"s3://{moto_s3.new_bucket()}"
    for v in range(3):
        frames, _ = shots_video(seed=v, lengths=LENGTHS, transitions=(("cut", 0), ("dissolve", 12)))
        upload(moto_s3.storage, f"{bucket}/raw/v{v}.mp4", encode_mp4(frames, FPS))
        upload(moto_s3.storage, f"{bucket}/raw/v{v}.txt", f"video {v}\nshots of textures\n".encode())
    png = io.BytesIO()
    Image.fromarray(moving_square(1, 120, 160)[0]).save(png, format="PNG")
    upload(moto_s3.storage, f"{bucket}/raw/still.png", png.getvalue())
    upload(moto_s3.storage, f"{bucket}/raw/broken.mp4", b"\x00garbage" * 200)
    upload(moto_s3.storage, f"{bucket}/raw/short.mp4", encode_mp4(moving_square(24, 36, 64), FPS))
    return bucket


@pytest.fixture(autouse=True)
def aws_env(moto_s3, monkeypatch):
    """Worker processes find the server through the environment, as on a cluster."""
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)


def table_rows(uri: str, storage, columns=None) -> list[dict]:
    return (
        lance.dataset(uri, storage_options=storage.lance_options(uri)).to_table(columns=columns).to_pylist()
    )


def test_raw_videos_become_scored_clips(raw, moto_s3, tiny_clip, aesthetic_head, tmp_path):
    output = f"{raw}/clips.lance"
    cfg = CurateConfig(
        input=f"{raw}/raw/",
        output=output,
        workers=2,
        commit_every=2,
        clip_model=tiny_clip,
        aesthetic_head=aesthetic_head[0],
        cache_dir=str(tmp_path),
    )
    summary = run(cfg, progress=False)
    assert summary.status == Counter({"ok": 4, "unreadable": 1, "too_short": 1})
    rows = table_rows(output, moto_s3.storage)
    videos = sorted({r["video_uri"] for r in rows})
    assert len(rows) == 3 * 3 + 1
    for uri in videos:
        clips = sorted((r for r in rows if r["video_uri"] == uri), key=lambda r: r["start_s"])
        if uri.endswith(".png"):
            assert [(c["num_frames"], c["camera_motion"]) for c in clips] == [(1, "static")]
            continue
        # shot boundaries: a cut at 3 s, a dissolve over frames 156–167 (6.5–7 s)
        starts, ends = [c["start_s"] for c in clips], [c["end_s"] for c in clips]
        assert starts[:2] == pytest.approx([0.0, 3.0], abs=1 / FPS)
        assert ends[0] == pytest.approx(3.0, abs=1 / FPS)
        assert 6.0 < ends[1] <= 6.5 + 1 / FPS
        assert 7.0 - 1 / FPS <= starts[2] < 7.6
        assert [c["camera_motion"] for c in clips] == ["pan_right", "zoom_in", "static"]
        assert clips[0]["captions"] == [f"video {uri[-5]}", "shots of textures"]
        assert all(c["text_area"] < 0.02 for c in clips)
        assert all(c["aesthetic_score"] is not None and c["clip_score"] is not None for c in clips)
    table = lance.dataset(output, storage_options=moto_s3.storage.lance_options(output))
    assert summary.tag in table.tags.list()
    curation = json.loads(table.schema.metadata[CURATION_KEY.encode()])  # a checkpoint's lineage reads it
    assert curation["models_sha256"] == {
        "clip_model": sha256_of(tiny_clip),
        "aesthetic_head": hashlib.sha256(Path(aesthetic_head[0]).read_bytes()).hexdigest(),
    }
    assert curation["config"]["clip_model"] == tiny_clip
    assert curation["config_sha256"] == curation_record(cfg, moto_s3.storage)["config_sha256"]
    assert curation["recipe"] is None
    assert curation["code_version"] == code_version()
    assert 0 <= time.time() - datetime.fromisoformat(curation["written_at"]).timestamp() < 600
    log = table_rows(log_uri(output), moto_s3.storage, ["video_uri", "status"])
    assert Counter(r["status"] for r in log) == summary.status


def test_a_rerun_skips_finished_videos_and_a_crash_loses_only_the_uncommitted(raw, moto_s3, monkeypatch):
    output = f"{raw}/crash.lance"
    cfg = CurateConfig(input=f"{raw}/raw/", output=output, workers=0, commit_every=2)
    real, calls = pipeline.curate_video, []

    def crash_on_the_fifth(uri, stages):
        calls.append(uri)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real(uri, stages)

    monkeypatch.setattr(pipeline, "curate_video", crash_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    monkeypatch.setattr(pipeline, "curate_video", real)
    logged = table_rows(log_uri(output), moto_s3.storage, ["video_uri"])
    assert len(logged) == 4  # two commits of two; the fifth video was lost with the crash
    summary = run(cfg, progress=False)
    assert summary.skipped_existing == 4
    assert summary.curated == 2
    rows = table_rows(output, moto_s3.storage, ["clip_id"])
    assert len(rows) == 10
    assert len({r["clip_id"] for r in rows}) == 10  # nothing curated twice
    assert run(cfg, progress=False).curated == 0


def test_shards_partition_the_input(raw, moto_s3):
    inputs = list_inputs(f"{raw}/raw/", moto_s3.storage)
    assert len(inputs) == 6
    parts = [[u for u in inputs if shard_of(u, 3) == i] for i in range(3)]
    assert sorted(itertools.chain(*parts)) == inputs
    output = f"{raw}/sharded.lance"
    for i in range(2):
        run(CurateConfig(input=f"{raw}/raw/", output=output, workers=0, shard=f"{i}/2"), progress=False)
    assert len(table_rows(output, moto_s3.storage, ["clip_id"])) == 10


def test_the_loader_trains_from_a_curated_table(raw, moto_s3, tmp_path):
    output = f"{raw}/for_training.lance"
    run(CurateConfig(input=f"{raw}/raw/", output=output, workers=0), progress=False)
    config = LoaderConfig(
        table=output,
        buckets=(Bucket(32, 48, 8, 2, fps=8),),
        num_workers=0,
        filter="num_frames > 1 AND camera_motion != 'static'",
        cache_dir=str(tmp_path),
    )
    loader = ClipLoader(config, storage=moto_s3.storage, rank=0, world_size=1)
    assert loader.sizes == (6,)  # the pans and zooms of the three videos
    batch = next(iter(loader))
    assert batch["frames"].shape == (2, 8, 3, 32, 48)
    assert set(batch["caption"]) <= {f"video {v}" for v in range(3)} | {"shots of textures"}


def test_latents_are_precomputed_for_the_loader(raw, moto_s3, tmp_path):
    output = f"{raw}/latents.lance"
    cfg = CurateConfig(
        input=f"{raw}/raw/v0.mp4",
        output=output,
        workers=0,
        latents=True,
        autoencoder="space_to_depth",
        latent_size=[32, 48],
        latent_frames=8,
        latent_fps=8.0,
    )
    run(cfg, progress=False)
    config = LoaderConfig(
        table=output, buckets=(Bucket(32, 48, 8, 2, fps=8),), num_workers=0, cache_dir=str(tmp_path)
    )
    batch = next(iter(ClipLoader(config, storage=moto_s3.storage, rank=0, world_size=1)))
    assert batch["latents"].shape == (2, 8, 12, 16, 24)  # space_to_depth: 3·2² channels at half size


def test_concurrent_shards_never_lose_a_commit(radosgw, tmp_path, monkeypatch):
    """Three processes append to one table on a real object store at the same time."""
    for key, value in radosgw.env.items():  # Lance takes the endpoint from the environment (storage.py)
        monkeypatch.setenv(key, value)
    bucket = f"s3://{radosgw.new_bucket()}"
    # Three videos per shard, so that every process commits three times while the others do.
    per_shard: Counter = Counter()
    for v in itertools.count():
        uri = f"{bucket}/raw/{v}.mp4"
        if per_shard[shard_of(uri, 3)] < 3:
            per_shard[shard_of(uri, 3)] += 1
            upload(radosgw.storage, uri, encode_mp4(moving_square(60, 36, 64, velocity=(0, v / 4)), FPS))
        if sum(per_shard.values()) == 9:
            break
    output = f"{bucket}/clips.lance"
    env = os.environ | radosgw.env
    argv = [
        sys.executable,
        str(ROOT / "jobs" / "curate.py"),
        f"input={bucket}/raw/",
        f"output={output}",
        "workers=0",
        "commit_every=1",
        f"cache_dir={tmp_path}",
    ]
    processes = [
        subprocess.Popen([*argv, f"shard={i}/3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(3)
    ]
    for p in processes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    rows = table_rows(output, radosgw.storage, ["clip_id", "video_uri"])
    assert len(rows) == 9
    assert len(table_rows(log_uri(output), radosgw.storage, ["video_uri"])) == 9
    assert len(lance.dataset(output, storage_options=radosgw.storage.lance_options(output)).tags.list()) == 3


def test_the_command_line_explains_and_refuses_bad_settings():
    script = str(ROOT / "jobs" / "curate.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0
    assert "shard=" in help_text.stdout
    assert "min_clip_s=2.0" in help_text.stdout
    bad = subprocess.run(
        [sys.executable, script, "input=a", "output=b", "min_clip=3"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "unknown key 'min_clip'; did you mean 'min_clip_s'?" in bad.stderr
