"""Runs that overlap, on a real object store (radosgw: moto's conditional writes are weaker)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import lance
import pytest

from svd.curate.ledger import log_uri

from .conftest import ROOT, curate_argv, curate_env, video

COMMIT_AT = """
import sys, time
import pyarrow as pa
from svd.data.storage import Storage
from svd.data.table import merge_commit, to_arrow
start, uri, who = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [dict(clip_id=f"{who}-{i}", video_uri=f"/v{who}", start_s=0.0, end_s=1.0, fps=24.0, width=64,
             height=48, num_frames=24) for i in range(5)]
time.sleep(max(0.0, start - time.time()))
merge_commit(uri, to_arrow(rows), Storage.from_env(), "clip_id")
"""


def at_once(argvs: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen(a, env=env, **pipes) for a in argvs]
    results = []
    for p, argv in zip(processes, argvs, strict=True):
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_runs_of_one_shard_at_once_commit_every_clip_once(radosgw):
    bucket = f"s3://{radosgw.new_bucket()}"
    fs, _ = radosgw.storage.fsspec(bucket)
    for v in range(4):
        fs.pipe_file(f"{bucket[5:]}/raw/v{v}.mp4", video(v))
    output = f"{bucket}/clips.lance"
    argv = curate_argv(f"input={bucket}/raw/", f"output={output}", "commit_every=1")
    for done in at_once([argv, argv], curate_env(radosgw.env)):
        assert done.returncode == 0, done.stderr[-2000:]
    options = radosgw.storage.lance_options(output)
    table = lance.dataset(output, storage_options=options)
    clip_ids = table.to_table(columns=["clip_id"]).column("clip_id").to_pylist()
    assert len(clip_ids) == len(set(clip_ids)) == 4
    log = lance.dataset(log_uri(output), storage_options=radosgw.storage.lance_options(log_uri(output)))
    assert Counter(log.to_table(columns=["video_uri"]).column("video_uri").to_pylist()) == Counter(
        {f"{bucket}/raw/v{v}.mp4": 1 for v in range(4)}
    )
    assert len(table.tags.list()) == 2  # one per run, distinct although started in the same second


@pytest.mark.slow
def test_runs_that_race_to_create_the_table_lose_no_rows(radosgw):
    """Lance turns a losing `create` into an overwrite; the first commit of each run must not."""
    uri = f"s3://{radosgw.new_bucket()}/clips.lance"
    start = time.time() + 3  # after every interpreter has started
    argvs = [[sys.executable, "-c", COMMIT_AT, str(start), uri, str(who)] for who in range(3)]
    for done in at_once(argvs, curate_env(radosgw.env) | {"PYTHONPATH": str(ROOT)}):
        assert done.returncode == 0, done.stderr[-2000:]
    table = lance.dataset(uri, storage_options=radosgw.storage.lance_options(uri))
    assert sorted(table.to_table(columns=["clip_id"]).column("clip_id").to_pylist()) == sorted(
        f"{who}-{i}" for who in range(3) for i in range(5)
    )
