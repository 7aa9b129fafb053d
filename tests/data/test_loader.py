"""The clip loader against a real S3 server (moto; radosgw for the integration test)."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import lance
import numpy as np
import pytest
import torch
from PIL import Image

from svd.data.buckets import Bucket
from svd.data.exclusion import ExclusionError, read_exclusion
from svd.data.loader import ClipLoader, LoaderConfig, LoaderError, motion_bucket_id
from svd.data.schema import LATENTS_KEY
from svd.data.storage import Storage
from svd.data.synthetic import moving_square, synthetic_corpus
from svd.data.table import write_clip_table
from svd.data.video_io import encode_mp4

from ..processes import alive

VIDEO = Bucket(16, 24, frames=4, batch_size=2, fps=4)


@pytest.fixture(scope="module")
def corpus(moto_s3, tmp_path_factory):
    """15 one-second clips of 5 videos (3 s, 8 fps, 32×48) on the S3 server, and their table."""
    bucket = f"s3://{moto_s3.new_bucket()}"
    rows = synthetic_corpus(f"{bucket}/raw", moto_s3.storage, videos=5, seconds=3.0, clip_seconds=1.0)
    table = f"{bucket}/clips.lance"
    write_clip_table(table, rows, moto_s3.storage)
    return {"table": table, "rows": rows, "bucket": bucket, "cache": str(tmp_path_factory.mktemp("rows"))}


def loader(corpus, moto_s3, *, rank=0, world_size=1, state=None, **cfg) -> ClipLoader:
    config = LoaderConfig(
        table=cfg.pop("table", corpus["table"]),
        buckets=cfg.pop("buckets", (VIDEO,)),
        num_workers=cfg.pop("num_workers", 0),
        cache_dir=corpus["cache"],
        **cfg,
    )
    return ClipLoader(config, rank=rank, world_size=world_size, storage=moto_s3.storage, state=state)


def test_batches_are_real_clips_with_their_conditioning(corpus, moto_s3):
    batch = next(iter(loader(corpus, moto_s3)))
    assert batch["frames"].shape == (2, 4, 3, 16, 24)
    assert batch["frames"].dtype == torch.uint8
    assert batch["frames"].float().std() > 10  # real pixels, not a constant
    assert torch.equal(batch["first_frame"], batch["frames"][:, 0])
    assert batch["fps_id"].tolist() == [3.0, 3.0]  # sampled at 4 fps; the model is conditioned on fps − 1
    for i, row in enumerate(batch["row"].tolist()):
        expected = corpus["rows"][row]
        assert batch["clip_id"][i] == expected["clip_id"]
        assert batch["caption"][i] in expected["captions"]
        assert batch["motion_bucket_id"][i].item() == motion_bucket_id(expected["motion_score"], 1.0)


def rows_of_first_epoch(batches: list[dict], n: int) -> list[int]:
    return [
        row
        for b in batches
        for row, p in zip(b["row"].tolist(), b["position"].tolist(), strict=True)
        if p < n
    ]


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_resuming_on_another_world_size_sees_every_row_exactly_once(corpus, moto_s3, new_world_size):
    n = len(corpus["rows"])  # 15: not a multiple of any global batch here
    seen, k = [], 2
    first = [loader(corpus, moto_s3, rank=r, world_size=2) for r in range(2)]
    for rank_loader in first:
        seen += list(itertools.islice(iter(rank_loader), k))
    states = [rank_loader.state_dict() for rank_loader in first]
    assert states[0] == states[1]  # the state is global, not per rank
    assert states[0]["consumed"] == [k * 2 * 2]

    resumed = [
        loader(corpus, moto_s3, rank=r, world_size=new_world_size, state=states[0])
        for r in range(new_world_size)
    ]
    iterators = [iter(rank_loader) for rank_loader in resumed]
    while resumed[0].state.consumed[0] < n:
        seen += [next(it) for it in iterators]
    assert sorted(rows_of_first_epoch(seen, n)) == list(range(n))


def test_workers_deliver_the_same_batches_and_state_as_the_main_process(corpus, moto_s3):
    in_process, with_workers = loader(corpus, moto_s3), loader(corpus, moto_s3, num_workers=2)
    a = list(itertools.islice(iter(in_process), 3))
    b = list(itertools.islice(iter(with_workers), 3))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["row"], y["row"])
        assert torch.equal(x["frames"], y["frames"])
    # workers had prefetched further, but the state counts only what was delivered
    assert with_workers.state_dict() == in_process.state_dict()
    assert with_workers.state_dict()["consumed"] == [6]


@pytest.fixture(scope="module")
def damaged_table(corpus, moto_s3):
    """The good clips plus rows whose videos are truncated, garbage, or not there at all."""
    fs, _ = moto_s3.storage.fsspec(corpus["bucket"])
    good = corpus["rows"][0]
    fs_path = good["video_uri"].removeprefix("s3://")
    data = fs.cat_file(fs_path)
    bad = {"truncated": data[: len(data) // 3], "garbage": np.random.default_rng(0).bytes(len(data))}
    rows = list(corpus["rows"][:6])
    for name, payload in bad.items():
        uri = f"{corpus['bucket']}/bad/{name}.mp4"
        fs.pipe_file(uri.removeprefix("s3://"), payload)
        rows.append(good | {"clip_id": name, "video_uri": uri})
    rows.append(good | {"clip_id": "missing", "video_uri": f"{corpus['bucket']}/bad/gone.mp4"})
    table = f"{corpus['bucket']}/damaged.lance"
    write_clip_table(table, rows, moto_s3.storage)
    return table


def test_damaged_inputs_are_skipped_counted_and_replaced_deterministically(corpus, moto_s3, damaged_table):
    runs = []
    for _ in range(2):
        clip_loader = loader(corpus, moto_s3, table=damaged_table)
        batches = list(itertools.islice(iter(clip_loader), 9))  # 18 positions: every row at least once
        runs.append((batches, clip_loader.skipped))
    (batches, skipped), (again, skipped_again) = runs
    assert all(len(b["clip_id"]) == 2 for b in batches)  # every batch is full
    assert not {"truncated", "garbage", "missing"} & {c for b in batches for c in b["clip_id"]}
    assert skipped["corrupt"] >= 2
    assert skipped["missing"] >= 1
    assert skipped == skipped_again
    assert [b["clip_id"] for b in batches] == [b["clip_id"] for b in again]


@pytest.fixture(scope="module")
def mixed_table(moto_s3, corpus):
    """Landscape videos, portrait videos and images, with distinct motion scores."""
    bucket = corpus["bucket"]
    landscape = synthetic_corpus(f"{bucket}/land", moto_s3.storage, videos=3, size=(32, 48), clip_seconds=1.0)
    portrait = synthetic_corpus(
        f"{bucket}/port", moto_s3.storage, videos=2, size=(48, 32), clip_seconds=1.0, seed=1
    )
    portrait = [r | {"clip_id": "p" + r["clip_id"]} for r in portrait]
    fs, _ = moto_s3.storage.fsspec(bucket)
    images = []
    for i in range(6):
        png = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(png, format="PNG")
        uri = f"{bucket}/img/{i}.png"
        fs.pipe_file(uri.removeprefix("s3://"), png.getvalue())
        images.append(
            landscape[0]
            | {
                "clip_id": f"img{i}",
                "video_uri": uri,
                "start_s": 0.0,
                "end_s": 0.0,
                "num_frames": 1,
                "fps": 0.0,
                "width": 20,
                "height": 20,
            }
        )
    rows = landscape + portrait + images
    table = f"{bucket}/mixed.lance"
    write_clip_table(table, rows, moto_s3.storage)
    return table, rows


MIXED_BUCKETS = (
    Bucket(16, 24, frames=4, batch_size=2, fps=4),
    Bucket(24, 16, frames=3, batch_size=3, fps=4),
    Bucket(8, 8, frames=1, batch_size=4),
)


def test_a_batch_never_mixes_buckets_and_all_ranks_agree_on_the_bucket(corpus, moto_s3, mixed_table):
    table, rows = mixed_table
    ranks = [
        iter(loader(corpus, moto_s3, table=table, buckets=MIXED_BUCKETS, rank=r, world_size=2))
        for r in range(2)
    ]
    seen_buckets = set()
    for _ in range(12):
        batches = [next(it) for it in ranks]
        assert batches[0]["bucket"] == batches[1]["bucket"]
        b = MIXED_BUCKETS[batches[0]["bucket"]]
        seen_buckets.add(batches[0]["bucket"])
        for batch in batches:
            assert batch["frames"].shape == (b.batch_size, b.frames, 3, b.height, b.width)
            for row in batch["row"].tolist():
                kind = (
                    "image"
                    if rows[row]["num_frames"] == 1
                    else ("portrait" if rows[row]["height"] > rows[row]["width"] else "landscape")
                )
                assert kind == (
                    "image" if b.frames == 1 else "portrait" if b.height > b.width else "landscape"
                )
    assert seen_buckets == {0, 1, 2}


def test_the_filter_is_applied_before_sampling(corpus, moto_s3, mixed_table):
    table, rows = mixed_table
    threshold = float(np.median([r["motion_score"] for r in rows[:9]]))
    clip_loader = loader(
        corpus, moto_s3, table=table, filter=f"motion_score > {threshold} AND num_frames > 1"
    )
    seen = {row for batch in itertools.islice(iter(clip_loader), 6) for row in batch["row"].tolist()}
    assert seen
    assert all(rows[r]["motion_score"] > threshold and rows[r]["num_frames"] > 1 for r in seen)


def test_the_table_version_is_pinned_in_the_state(corpus, moto_s3):
    table = f"{corpus['bucket']}/growing.lance"
    write_clip_table(table, corpus["rows"][:4], moto_s3.storage)
    first = loader(corpus, moto_s3, table=table)
    next(iter(first))
    state = first.state_dict()
    write_clip_table(table, corpus["rows"][4:], moto_s3.storage, mode="append")
    resumed = loader(corpus, moto_s3, table=table, state=state)
    assert resumed.table_version == state["table_version"] == 1
    assert resumed.sizes == (4,)
    assert loader(corpus, moto_s3, table=table).sizes == (
        len(corpus["rows"]),
    )  # a fresh run takes the latest
    with pytest.raises(ValueError, match="table version 1"):
        loader(corpus, moto_s3, table=table).load_state_dict(state)


def test_precomputed_latents_are_served_instead_of_frames(corpus, moto_s3, latents_table):
    batch = next(iter(loader(corpus, moto_s3, table=latents_table)))
    assert "frames" not in batch
    assert batch["latents"].shape == (2, 4, 4, 2, 3)
    assert batch["fps_id"].tolist() == [3.0, 3.0]
    for i, row in enumerate(batch["row"].tolist()):
        assert (batch["latents"][i] == row).all()


def test_clips_stored_as_blobs_are_decoded_from_the_table(corpus, moto_s3):
    source = corpus["rows"][1]  # the second second of video 0
    own_file = encode_mp4(moving_square(8, 32, 48, color=(0, 255, 0)), fps=8)  # a green clip, not the source
    rows = [source | {"clip_bytes": own_file, "video_uri": f"{corpus['bucket']}/not/there.mp4"}]
    table = f"{corpus['bucket']}/blobs.lance"
    write_clip_table(table, rows * 2, moto_s3.storage)
    batch = next(iter(loader(corpus, moto_s3, table=table)))
    assert batch["frames"].shape == (2, 4, 3, 16, 24)
    green = batch["frames"][:, :, 1].float().amax(dim=(2, 3))
    assert (green > 200).all()  # the pixels came from the blob, not from the (missing) source video


def test_no_row_in_any_bucket_is_a_clear_error(corpus, moto_s3):
    with pytest.raises(ValueError, match="passes filter 'motion_score > 1000'"):
        loader(corpus, moto_s3, filter="motion_score > 1000")


def test_a_state_for_other_buckets_is_refused(corpus, moto_s3):
    with pytest.raises(ValueError, match="2 buckets"):
        loader(corpus, moto_s3, state={"consumed": [0, 0], "seed": 0, "table_version": 1})


def test_streaming_from_radosgw(radosgw, tmp_path):
    bucket = f"s3://{radosgw.new_bucket()}"
    rows = synthetic_corpus(f"{bucket}/raw", radosgw.storage, videos=2, clip_seconds=1.0)
    write_clip_table(f"{bucket}/clips.lance", rows, radosgw.storage)
    config = LoaderConfig(
        table=f"{bucket}/clips.lance", buckets=(VIDEO,), num_workers=2, cache_dir=str(tmp_path)
    )
    batches = list(itertools.islice(iter(ClipLoader(config, storage=radosgw.storage)), 3))
    assert [b["frames"].shape for b in batches] == [(2, 4, 3, 16, 24)] * 3
    assert Counter(r for b in batches for r in b["row"].tolist()) == Counter(range(6))


def test_a_state_saved_with_another_seed_bucket_shapes_or_filter_is_refused_naming_what_differs(
    corpus, moto_s3
):
    first = loader(corpus, moto_s3)
    next(iter(first))
    state = first.state_dict()
    with pytest.raises(ValueError, match=r"^loader state does not match: seed 0 ≠ data.seed=1$"):
        loader(corpus, moto_s3, state=state, seed=1)
    longer = Bucket(16, 24, frames=3, batch_size=2, fps=4)
    with pytest.raises(
        ValueError, match=r"bucket shapes .*\[16.0, 24.0, 4.0, 4.0\].*\[16.0, 24.0, 3.0, 4.0\]"
    ):
        loader(corpus, moto_s3, state=state, buckets=(longer,))
    with pytest.raises(ValueError, match=re.escape("filter None ≠ data.filter='motion_score >= 0'")):
        loader(corpus, moto_s3, state=state, filter="motion_score >= 0")
    # the batch size is not part of a bucket's rows: a resumed run may change it
    resumed = loader(corpus, moto_s3, state=state, buckets=(dataclasses.replace(VIDEO, batch_size=3),))
    assert next(iter(resumed))["position"].tolist() == [2, 3, 4]


def test_an_undecodable_clip_is_replaced_by_one_that_no_rank_reads_in_the_same_step(
    corpus, moto_s3, damaged_table
):
    n = 9  # 6 good clips and 3 damaged ones
    ranks = [iter(loader(corpus, moto_s3, table=damaged_table, rank=r, world_size=2)) for r in range(2)]
    replaced = 0
    for _ in range(6):  # 24 positions: every damaged clip is met at least twice
        batches = [next(it) for it in ranks]
        positions = [p for b in batches for p in b["position"].tolist()]
        rows = [r for b in batches for r in b["row"].tolist()]
        replaced += sum(sum(b["skipped"].values()) for b in batches)
        if positions[0] // n == positions[-1] // n:  # a step within one epoch reads each clip once
            assert len(set(rows)) == len(rows), (positions, rows)
    assert replaced >= 6


def test_caption_weights_fall_back_to_the_captions_a_clip_has(corpus, moto_s3):
    table = f"{corpus['bucket']}/one_caption.lance"
    rows = [r | {"captions": [f"only {i}"]} for i, r in enumerate(corpus["rows"][:4])]
    write_clip_table(table, rows, moto_s3.storage)
    batch = next(iter(loader(corpus, moto_s3, table=table, caption_weights=(0.0, 1.0))))
    assert batch["caption"] == [f"only {r}" for r in batch["row"].tolist()]
    second = next(iter(loader(corpus, moto_s3, caption_weights=(0.0, 1.0))))
    assert all(c.startswith("video ") for c in second["caption"])  # the weight slots still apply


def with_latents(rows: list[dict]) -> list[dict]:
    """The rows with (4, 4, 2, 3) latents: 4 frames of a 16×24 bucket through an 8× autoencoder."""
    out = []
    for i, row in enumerate(rows):
        buffer = io.BytesIO()
        np.save(buffer, np.full((4, 4, 2, 3), i, np.float16))
        out.append(row | {"latents": buffer.getvalue()})
    return out


@pytest.fixture(scope="module")
def latents_table(corpus, moto_s3):
    table = f"{corpus['bucket']}/latents.lance"
    write_clip_table(table, with_latents(corpus["rows"][:3]), moto_s3.storage)
    return table


def test_latents_encoded_for_another_bucket_shape_or_rate_are_refused_at_start(
    corpus, moto_s3, latents_table
):
    three_frames = Bucket(16, 24, frames=3, batch_size=2, fps=4)
    with pytest.raises(ValueError, match=r"bucket 0 \(3 frames .* latents of shape \(4, 4, 2, 3\)"):
        loader(corpus, moto_s3, table=latents_table, buckets=(three_frames,))
    with pytest.raises(ValueError, match=r"latents of shape"):
        loader(corpus, moto_s3, table=latents_table, buckets=(Bucket(16, 32, 4, 2, fps=4),))

    table = f"{corpus['bucket']}/latents_at_8fps.lance"
    write_clip_table(table, with_latents(corpus["rows"][:3]), moto_s3.storage)
    spec = {"frames": 4, "fps": 8.0, "height": 16, "width": 24}  # what curation's latent_* were
    options = moto_s3.storage.lance_options(table)
    lance.dataset(table, storage_options=options).update_schema_metadata(
        {LATENTS_KEY.decode(): json.dumps(spec)}
    )
    with pytest.raises(ValueError, match=r"at 4 fps\) does not match .*: 4 frames of 16×24 at 8 fps$"):
        loader(corpus, moto_s3, table=table)  # the fps conditioning would say 3, the latents move at 8
    batch = next(iter(loader(corpus, moto_s3, table=table, buckets=(dataclasses.replace(VIDEO, fps=8),))))
    assert batch["fps_id"].tolist() == [7.0, 7.0]


def test_a_failure_in_a_worker_is_one_line_naming_the_table_and_clip(corpus, moto_s3):
    table = f"{corpus['bucket']}/bad_scheme.lance"
    rows = [r | {"video_uri": "nosuch://videos/v.mp4"} for r in corpus["rows"][:2]]
    write_clip_table(table, rows, moto_s3.storage)
    with pytest.raises(LoaderError) as e:
        next(iter(loader(corpus, moto_s3, table=table, num_workers=1)))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{table} (version 1), bucket 0, row ")
    assert "nosuch://videos/v.mp4" in message
    assert "video_0000_00" in message


@pytest.mark.slow
def test_stopping_early_with_workers_shuts_them_down_without_a_signal(corpus, moto_s3):
    """Workers exiting with prefetched batches in flight used to die of SIGABRT (in 3 of 6 early stops with
    batches this large); the main process then raised "killed by signal: Aborted" wherever it was, which
    pytest turns into a failure (pyproject.toml)."""
    large = Bucket(192, 288, frames=4, batch_size=4, fps=4)  # large tensors: long fd sharing, wide window
    clip_loader = loader(corpus, moto_s3, buckets=(large,), num_workers=2)
    for _ in range(4):
        assert len(list(itertools.islice(iter(clip_loader), 2))) == 2


def _worker_pids() -> list[int]:
    """This process's DataLoader workers: its spawned children (not multiprocessing's resource tracker)."""
    import multiprocessing

    return sorted(p.pid for p in multiprocessing.active_children())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
def test_workers_ignore_stop_signals_so_the_rank_decides_when_to_stop(corpus, moto_s3, signum):
    """Slurm and Kubernetes signal every process of a step; a worker that died of it made the next batch
    raise "worker exited unexpectedly" before the rank could save the step under way."""
    others = set(_worker_pids())  # children that earlier tests of this process have not reaped yet
    batches = iter(loader(corpus, moto_s3, num_workers=2, batch_timeout_s=60))  # a dead worker: 60 s, not 600
    next(batches)
    workers = sorted(set(_worker_pids()) - others)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signum)
    time.sleep(1.0)  # a worker that does not ignore it is dead by now
    assert len(list(itertools.islice(batches, 6))) == 6
    assert sorted(set(_worker_pids()) - others) == workers


ORPHAN_SCRIPT = """
import json, multiprocessing, os, signal, sys, threading, time
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.storage import Storage

config = LoaderConfig(**json.loads(sys.argv[1]), buckets=(Bucket(16, 24, frames=4, batch_size=2, fps=4),))
loader = ClipLoader(config, rank=0, world_size=1, storage=Storage.from_env())

def die_while_the_workers_start():
    time.sleep(0.3)  # the workers exist and still import torch
    print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=die_while_the_workers_start).start()
next(iter(loader))
"""


def test_workers_of_a_rank_killed_while_they_start_leave_instead_of_running_on(corpus, moto_s3, s3_env):
    """They were left polling their queue forever (reparented before torch's watchdog noted their parent),
    holding the job's output open: a launcher reading it never finished."""
    settings = {"table": corpus["table"], "num_workers": 2, "cache_dir": corpus["cache"]}
    done = subprocess.run(
        [sys.executable, "-c", ORPHAN_SCRIPT, json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    workers = [pid for pid in json.loads(done.stdout.splitlines()[-1]) if alive(pid)]
    deadline = time.monotonic() + 60  # they finish importing torch, then see their parent is gone
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


FAILING_RANK_SCRIPT = """
import json, multiprocessing, sys
from svd.data.buckets import Bucket
from svd.data.loader import ClipLoader, LoaderConfig
from svd.data.storage import Storage


def rank(settings: str) -> None:
    config = LoaderConfig(**json.loads(settings), buckets=(Bucket(16, 24, frames=4, batch_size=2, fps=4),))
    batches = iter(ClipLoader(config, rank=0, world_size=1, storage=Storage.from_env()))
    next(batches)
    raise RuntimeError("the rank fails with its batches in flight")


if __name__ == "__main__":
    if sys.argv[2] == "script":
        rank(sys.argv[1])
    process = multiprocessing.get_context("spawn").Process(target=rank, args=(sys.argv[1],))
    process.start()
    process.join()
    sys.exit(process.exitcode)
"""


@pytest.mark.parametrize("started_as", ["script", "process"])
def test_a_rank_that_fails_with_workers_running_exits(corpus, moto_s3, s3_env, tmp_path, started_as):
    """Its workers ignore SIGTERM, which is how multiprocessing ends them at exit: the rank waited forever.
    A rank is a script (Slurm, one local rank) or a process that multiprocessing started (several local
    ranks, torch's elastic agent), which ends without atexit hooks: it waited forever in both."""
    settings = {"table": corpus["table"], "num_workers": 2, "cache_dir": corpus["cache"]}
    script = tmp_path / "failing_rank.py"  # a file: a spawned process imports its target from it
    script.write_text(FAILING_RANK_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(settings), started_as],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "RuntimeError: the rank fails with its batches in flight"


class NeverAnswers:
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def __enter__(self) -> NeverAnswers:
        return self

    def __exit__(self, *exc) -> None:
        self.server.close()


@pytest.fixture
def deadline():
    """Fails a test that is still running after 120 s instead of letting it hang."""

    def expire(*_):
        raise TimeoutError("still waiting after 120 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_a_batch_from_an_endpoint_that_never_answers_fails_after_the_batch_timeout(
    corpus, tmp_path, deadline
):
    with NeverAnswers() as server:
        storage = Storage(endpoint_url=server.endpoint, access_key="k", secret_key="s")
        table = str(tmp_path / "clips.lance")  # a local table of clips in the silent object store
        write_clip_table(table, [r | {"video_uri": "s3://silent/v.mp4"} for r in corpus["rows"][:2]], storage)
        config = LoaderConfig(
            table=table, buckets=(VIDEO,), num_workers=1, batch_timeout_s=15, cache_dir=str(tmp_path)
        )
        with pytest.raises(LoaderError, match=r"timed out after 15 seconds \(data.batch_timeout_s=15"):
            next(iter(ClipLoader(config, storage=storage, rank=0, world_size=1)))


def test_an_excluded_clip_is_replaced_like_an_undecodable_one_and_no_other_position_reads_another_row(
    corpus, moto_s3
):
    rows = corpus["rows"]
    takedown = f"{corpus['bucket']}/takedown.txt"
    fs, path = moto_s3.storage.fsspec(takedown)
    fs.pipe_file(path, f"# a takedown request\n{rows[3]['clip_id']}\n{rows[6]['video_uri']}\n".encode())
    excluded = {
        r["clip_id"]
        for r in rows
        if r["clip_id"] == rows[3]["clip_id"] or r["video_uri"] == rows[6]["video_uri"]
    }
    assert len(excluded) == 4  # one clip, and the three clips of one video

    plain = iter(loader(corpus, moto_s3))
    taken_down = loader(corpus, moto_s3, exclude=takedown, num_workers=2)  # the list reaches the workers
    batches = iter(taken_down)
    replaced = []
    for _ in range(10):  # 20 positions: more than an epoch of 15 clips
        before, after = next(plain), next(batches)
        assert before["position"].tolist() == after["position"].tolist()
        for position, clip, row, new_clip, new_row in zip(
            before["position"].tolist(),
            before["clip_id"],
            before["row"].tolist(),
            after["clip_id"],
            after["row"].tolist(),
            strict=True,
        ):
            assert new_clip not in excluded
            if clip in excluded:
                replaced.append(position)
            else:
                assert new_row == row, position
    assert len(replaced) >= 4
    assert [(b, p, reason) for b, p, _, reason in taken_down.take_replaced()] == [
        (0, p, "excluded") for p in replaced
    ]
    assert taken_down.skipped["excluded"] >= len(replaced)
    assert taken_down.take_replaced() == []


def test_takedown_lists_are_tables_or_files_and_bad_ones_are_named_in_one_line(corpus, moto_s3, tmp_path):
    listed = f"{corpus['bucket']}/takedown.lance"
    write_clip_table(listed, corpus["rows"][:2], moto_s3.storage)
    exclusion = read_exclusion(listed, moto_s3.storage)
    assert exclusion.names == {r["clip_id"] for r in corpus["rows"][:2]} | {corpus["rows"][0]["video_uri"]}
    assert exclusion.excludes("other", corpus["rows"][0]["video_uri"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ExclusionError, match="lists no clip_id or video_uri"):
        read_exclusion(str(empty), moto_s3.storage)
    with pytest.raises(ExclusionError, match=r"data.exclude=.*missing.txt: cannot read it"):
        read_exclusion(str(tmp_path / "missing.txt"), moto_s3.storage)
