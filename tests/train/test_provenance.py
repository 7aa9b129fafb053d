"""Provenance recomputed from a checkpoint's lineage equals what the loader's own sampler serves on every
rank, where a run spans epochs and world sizes (a synthetic run, no training: see bench/provenance.py); a
lineage that disagrees with its checkpoint is reported, not answered."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from svd.data.buckets import Bucket
from svd.data.exclusion import read_exclusion
from svd.data.loader import ClipLoader, ClipSampler, LoaderState, bucket_seed
from svd.data.order import stream_indices
from svd.data.storage import Storage
from svd.train.checkpoint import Checkpointer
from svd.train.provenance import ProvenanceError, checkpoint_replay, clip_reads, exclude_check

ROOT = Path(__file__).resolve().parents[2]
bench = runpy.run_path(str(ROOT / "bench" / "provenance.py"))

# (steps, world size, micro-batch, accumulation): global batch 48 on 2, 1 and 3 ranks, then 3 ranks of 16
SEGMENTS = [(50, 2, 8, 3), (40, 1, 16, 3), (45, 3, 4, 4), (10, 3, 16, 1)]
ROWS = 3_000
ENV = os.environ | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("provenance")
    table, run = str(folder / "clips.lance"), str(folder / "run")
    bench["write_table"](table, ROWS)
    data = bench["synthetic_run"](table, run, SEGMENTS, replaced=60, seed=3)
    return {"table": table, "run": run, "data": data}


def served_by_the_sampler(synthetic: dict) -> tuple[list[tuple[int, int, int, int]], ClipLoader]:
    """(step, rank, position, row) of every sample, as each rank's ClipSampler and the loader's order give
    them, with the recorded replacements applied."""
    data = synthetic["data"]
    loader = ClipLoader(
        bench["loader_config"](
            bench["run_config"](synthetic["table"], synthetic["run"], 1, 1, 1, 3), validation=False
        ),
        rank=0,
        world_size=1,
        storage=Storage(),
        state=data,
        shared_index=f"{synthetic['run']}/row_index",
    )
    n = loader.sizes[0]
    instead = {p: by for _, p, by, _ in data["lineage"]["replaced"]}
    consumed, step, served = (0,), 0, []
    for steps, world, micro_batch, accumulation in SEGMENTS:
        state = LoaderState(consumed, 3, data["table_version"])
        bucket = Bucket(256, 384, 14, micro_batch, fps=8)
        for rank in range(world):
            requests = iter(ClipSampler((n,), (bucket,), rank, world, state))
            for j in range(steps * accumulation):
                for p in next(requests).positions.tolist():
                    read = instead.get(p, p)
                    index = int(stream_indices(np.array([read]), n, bucket_seed(3, 0))[0])
                    served.append(
                        (
                            step + 1 + j // accumulation,
                            rank,
                            p,
                            int(loader.index.rows(0, np.array([index]))[0]),
                        )
                    )
        consumed = (consumed[0] + steps * world * micro_batch * accumulation,)
        step += steps
    return served, loader


def test_every_clips_count_and_first_and_last_step_equal_what_the_ranks_were_served(synthetic):
    served, _ = served_by_the_sampler(synthetic)
    expected: dict[str, list[int]] = {}
    for step, _, _, row in served:
        times_first_last = expected.setdefault(f"clip-{row}", [0, step, step])
        times_first_last[0] += 1
        times_first_last[1] = min(times_first_last[1], step)
        times_first_last[2] = max(times_first_last[2], step)

    replay = checkpoint_replay(synthetic["run"], None, Storage())
    table = pa.Table.from_batches(list(replay.clips()))
    got = {
        row["clip_id"]: [row["times_seen"], row["first_step"], row["last_step"]] for row in table.to_pylist()
    }
    assert len(served) == sum(s * 48 for s, *_ in SEGMENTS)
    assert 2 < len(served) / replay.loader.sizes[0] < 3  # the stream crossed two epoch boundaries
    assert got == expected
    assert set(table.column("checkpoint").to_pylist()) == {sum(s for s, *_ in SEGMENTS)}


def test_reads_of_a_clip_name_every_step_rank_and_position_that_read_it(synthetic):
    served, _ = served_by_the_sampler(synthetic)
    replaced = synthetic["data"]["lineage"]["replaced"]
    # a clip that lost a read to a replacement, one read in place of another, and an ordinary one
    lost = f"clip-{served[[p for _, _, p, _ in served].index(replaced[0][1])][3]}"
    instead = {p: by for _, p, by, _ in replaced}
    rows = {p: row for _, _, p, row in served}
    gained = next(f"clip-{rows[p]}" for p in instead)
    ordinary = f"clip-{served[5][3]}"
    for clip in (lost, gained, ordinary):
        answer = clip_reads(
            synthetic["run"], None, Storage(), clip_ids=frozenset([clip]), video_uris=frozenset()
        )
        got = sorted(
            zip(*(answer.reads.column(c).to_pylist() for c in ("step", "rank", "position")), strict=True)
        )
        expected = sorted((s, r, p) for s, r, p, row in served if f"clip-{row}" == clip)
        assert got == expected, clip
        assert answer.checkpoints == {synthetic["run"]: [sum(s for s, *_ in SEGMENTS)]}


def test_the_scheduled_steps_are_the_samplers_steps_for_one_bucket_and_for_several():
    bucket = Bucket(16, 16, 4, 3)
    for sizes in [(100, 0), (100, 37)]:
        state = LoaderState((5, 0), seed=1, table_version=1)
        iterated = ClipSampler(sizes, (bucket, bucket), 0, 2, state)
        requests = iter(iterated)
        expected = [next(requests) for _ in range(40)]
        scheduled = ClipSampler(sizes, (bucket, bucket), 0, 2, state)
        buckets, starts = scheduled.schedule(40)
        assert buckets.tolist() == [r.bucket for r in expected]
        assert starts.tolist() == [r.step[0] for r in expected]
        assert scheduled.state == expected[-1].state


def resave(run: str, data: dict, tmp_path: Path) -> str:
    """A copy of the synthetic run whose checkpoint holds `data` instead."""
    copy = str(tmp_path / "tampered")
    shutil.copytree(run, copy)
    shutil.rmtree(f"{copy}/checkpoints")
    step = sum(s for s, *_ in SEGMENTS)
    with Checkpointer(copy, Storage(), async_save=False) as checkpointer:
        checkpointer.save(step, {"data": data, "train": {"step": step}})
    return copy


@pytest.mark.parametrize(
    ("tamper", "reported"),
    [
        (lambda d: d["lineage"].update(seed=4), "lineage vs loader state: seed 4 ≠ 3"),
        (
            lambda d: d["lineage"]["segments"][1].update(world_size=2),
            "the replay of the steps before it reaches",
        ),
        (
            lambda d: d["lineage"]["segments"][2].update(
                config=d["lineage"]["segments"][2]["config"].replace("seed: 3", "seed: 4")
            ),
            "the config recorded at step 90 says train.seed: 4 there, 3 trained",
        ),
        (lambda d: d["lineage"]["replaced"].append([0, 10**9, 1, "corrupt"]), "was never consumed"),
        (lambda d: d["lineage"]["segments"].pop(0), "its lineage begins after step 50"),
    ],
    ids=["seed", "world_size", "config", "replaced", "begins_late"],
)
def test_a_lineage_that_disagrees_with_its_checkpoint_is_reported(synthetic, tmp_path, tamper, reported):
    data = json.loads(json.dumps(synthetic["data"]))
    tamper(data)
    run = resave(synthetic["run"], data, tmp_path)
    with pytest.raises(ProvenanceError, match=reported):
        checkpoint_replay(run, None, Storage())


def test_an_edited_config_yaml_or_a_recreated_table_is_reported_by_the_job(synthetic, tmp_path, capsys):
    run = resave(synthetic["run"], synthetic["data"], tmp_path)
    job = runpy.run_path(str(ROOT / "jobs" / "provenance.py"))["main"]  # in process: no second torch import
    config = Path(run, "config.yaml")
    original = config.read_text()
    config.write_text(original.replace("seed: 3", "seed: 5"))
    assert job([f"run={run}", "checkpoint=145"]) == 1
    out, err = capsys.readouterr()
    assert "config.yaml says train.seed: 5 there, 3 trained" in err
    assert out == ""
    config.write_text(original)

    # the table re-created at its URI: the same version number, other rows
    table = synthetic["table"]
    kept = lance.dataset(table).to_table()
    moved = tmp_path / "original.lance"
    shutil.move(table, moved)
    try:
        lance.write_dataset(kept.slice(1), table)
        assert job([f"run={run}", "checkpoint=145"]) == 1
        assert "holds other rows than when the state was saved" in capsys.readouterr().err
    finally:
        shutil.rmtree(table)
        shutil.move(moved, table)


def test_the_benchmark_runs_tiny(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "provenance.py"),
            "--rows",
            "3000",
            "--steps",
            "60",
            "--global-batch",
            "96",
            "--replaced",
            "5",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5,760 reads" in done.stdout
    assert "peak RSS" in done.stdout


def test_exclude_check_fails_when_a_listed_clip_was_read_while_the_list_was_in_force(synthetic, tmp_path):
    served, _ = served_by_the_sampler(synthetic)
    late = next(f"clip-{row}" for step, _, _, row in served if step > 120)
    listed = tmp_path / "takedown.txt"
    listed.write_text(f"{late}\n")
    exclusion = read_exclusion(str(listed), Storage())
    data = json.loads(json.dumps(synthetic["data"]))
    # a lineage that says the list was in force from step 120, but no position was replaced for it
    entry = {"step": 120, "uri": str(listed), "digest": exclusion.digest, "names": 1, "time": "t"}
    data["lineage"]["exclusions"] = [entry]
    run = resave(synthetic["run"], data, tmp_path)
    check = exclude_check(run, None, exclusion, Storage())
    reads_after = sum(1 for step, _, _, row in served if f"clip-{row}" == late and step > 120)
    assert not check.passed
    assert f"{reads_after} reads of them in those steps" in check.lines[1]
    assert check.lines[2].startswith("read: step ")

    other = tmp_path / "other.txt"
    other.write_text("clip-0\n")
    never = exclude_check(run, None, read_exclusion(str(other), Storage()), Storage())
    assert not never.passed
    assert "was never in force" in never.lines[0]
