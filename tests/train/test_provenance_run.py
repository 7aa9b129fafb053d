"""Provenance of a real run, end to end, in one run sequence (each launch costs the suite its time): a run on
2 ranks, resumed on 1 with a takedown list, then a second stage started from it (`stage.init_from`); one
video of the table is corrupt. A test-only hook (`SVD_SERVED_LOG`) records every sample each rank trained
on, and the answers recomputed from the checkpoints must equal it exactly."""

from __future__ import annotations

import collections
import json
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from svd.config import compose
from svd.data.synthetic import synthetic_corpus
from svd.data.table import write_clip_table
from svd.launch.local import launch_local
from svd.train.provenance import checkpoint_clips, checkpoint_replay, clip_reads

from ..settings import production_settings

ROOT = Path(__file__).resolve().parents[2]
TAKEDOWN_AFTER = 4  # the first launch trains steps 1–4; the takedown applies from step 5


JOB = runpy.run_path(str(ROOT / "jobs" / "provenance.py"))


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def job(capsys) -> Callable[..., Done]:
    """`jobs/provenance.py` with these arguments, in this process (a subprocess imports torch: ~10 s)."""

    def run(*args: str) -> Done:
        capsys.readouterr()
        status = JOB["main"](list(args))
        out, err = capsys.readouterr()
        return Done(status, out, err)

    return run


def served(folder: Path) -> list[dict]:
    return [
        json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def runs(moto_s3, tmp_path_factory) -> dict:
    """The run sequence: A on 2 ranks (steps 1–4), A resumed on 1 rank with a takedown (steps 5–8), then on 3
    ranks with another global batch and no list named (steps 9–10: the takedown stays in force), B from
    A's last checkpoint (steps 1–2); what each launch served, by launch."""
    monkeypatch = pytest.MonkeyPatch()
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"s3://{moto_s3.new_bucket()}"
    rows = synthetic_corpus(f"{bucket}/raw", moto_s3.storage, videos=6, seconds=3.0, clip_seconds=1.5)
    rows[0]["split"] = "val"
    broken = f"{bucket}/raw/broken.mp4"
    fs, path = moto_s3.storage.fsspec(broken)
    fs.pipe_file(path, b"not a video at all" * 100)
    rows += [rows[1] | {"clip_id": f"broken_{i:03d}", "video_uri": broken} for i in range(2)]
    table = f"{bucket}/clips.lance"
    write_clip_table(table, rows, moto_s3.storage)
    takedown = f"{bucket}/takedown.txt"
    fs, path = moto_s3.storage.fsspec(takedown)
    excluded_video = rows[8]["video_uri"]  # both clips of video 4
    fs.pipe_file(path, f"# takedown request 1\nvideo_0002_000\n{excluded_video}\n".encode())

    log = tmp_path_factory.mktemp("served")
    a, b = f"{bucket}/runs/a", f"{bucket}/runs/b"
    common = ("train.global_batch=4", "checkpoint.every=2", "checkpoint.keep=10")
    launches = [
        ("a1", a, ("gpus_per_node=2", "train.steps=4")),
        ("a2", a, ("gpus_per_node=1", "train.steps=8", f"data.exclude={takedown}")),
        ("a3", a, ("gpus_per_node=3", "train.steps=10", "train.global_batch=3")),
        ("b", b, ("gpus_per_node=1", "train.steps=2", f"stage.init_from={a}")),
    ]
    for name, run, extra in launches:
        monkeypatch.setenv("SVD_SERVED_LOG", str(log / name))
        launch_local(compose(["stage=video_pretrain", *production_settings(table, run, *common, *extra)]))
    monkeypatch.undo()
    return {
        "a": a,
        "b": b,
        "takedown": takedown,
        "excluded": {"video_0002_000", "video_0004_000", "video_0004_001"},
        "served": {name: served(log / name) for name, _, _ in launches},
        "env": moto_s3.env,
    }


def counts(samples: list[dict]) -> dict[str, tuple[int, int, int]]:
    """(times, first step, last step) per clip."""
    by_clip = collections.defaultdict(list)
    for sample in samples:
        by_clip[sample["clip_id"]].append(sample["step"])
    return {clip: (len(steps), min(steps), max(steps)) for clip, steps in by_clip.items()}


@pytest.mark.slow
def test_provenance_of_every_checkpoint_equals_what_the_ranks_were_served(runs, monkeypatch, moto_s3):
    for key, value in runs["env"].items():
        monkeypatch.setenv(key, value)
    storage = moto_s3.storage
    a_served = runs["served"]["a1"] + runs["served"]["a2"] + runs["served"]["a3"]
    assert {s["rank"] for s in runs["served"]["a1"]} == {0, 1}
    assert {s["rank"] for s in runs["served"]["a3"]} == {0, 1, 2}

    for step in (2, 4, 6, 8, 10):
        table = pa.Table.from_batches(list(checkpoint_clips(runs["a"], step, storage)))
        got = {r["clip_id"]: (r["times_seen"], r["first_step"], r["last_step"]) for r in table.to_pylist()}
        assert got == counts([s for s in a_served if s["step"] <= step]), step

    # every read of every clip: the multiset of (step, rank, micro-batch, position)
    names = frozenset(s["clip_id"] for s in a_served) | {"broken_000", "broken_001"} | runs["excluded"]
    answer = clip_reads(runs["a"], 10, storage, clip_ids=names, video_uris=frozenset())
    got = sorted(
        zip(
            *(answer.reads.column(c).to_pylist() for c in ("step", "rank", "micro", "position", "clip_id")),
            strict=True,
        )
    )
    assert got == sorted((s["step"], s["rank"], s["micro"], s["position"], s["clip_id"]) for s in a_served)

    lineage = checkpoint_replay(runs["a"], 10, storage).lineage
    assert [(s["step"], s["world_size"], s["accumulation"]) for s in lineage["segments"]] == [
        (0, 2, 2),
        (4, 1, 4),
        (8, 3, 1),
    ]
    # one entry: the third launch named no list, and the one in force stayed (the same digest)
    assert [(e["step"], e["uri"], e["names"]) for e in lineage["exclusions"]] == [
        (TAKEDOWN_AFTER, runs["takedown"], 2)
    ]
    assert lineage["segments"][0]["code"]["git"]
    assert "stage:" in lineage["segments"][1]["config"]


@pytest.mark.slow
def test_the_takedown_removes_the_listed_clips_and_no_other_position_reads_another_row(
    runs, monkeypatch, moto_s3, job
):
    for key, value in runs["env"].items():
        monkeypatch.setenv(key, value)
    storage = moto_s3.storage
    replay = checkpoint_replay(runs["a"], 10, storage)
    reasons = collections.Counter(reason for *_, reason in replay.lineage["replaced"])
    assert reasons["corrupt"] > 0  # the broken video's clips, before and after the takedown
    assert reasons["excluded"] > 0  # the listed clips' positions after it
    before = [s for s in runs["served"]["a1"] if s["clip_id"] in runs["excluded"]]
    assert before  # the listed clips were trained on before the takedown
    # not after it, in this run nor in the stage started from it (which named no list: it stays in force)
    later = runs["served"]["a2"] + runs["served"]["a3"] + runs["served"]["b"]
    assert not [s for s in later if s["clip_id"] in runs["excluded"]]
    a_served = runs["served"]["a1"] + runs["served"]["a2"] + runs["served"]["a3"]
    assert not [s for s in a_served if s["clip_id"].startswith("broken")]

    # every position that was not replaced read the row the order gives it, takedown or not
    replaced = {position for _, position, _, _ in replay.lineage["replaced"]}
    ordinary = [s for s in a_served if s["position"] not in replaced]
    positions = np.array([s["position"] for s in ordinary])
    rows = replay.loader.index.rows(0, replay.indices(0, positions))
    assert rows.tolist() == [s["row"] for s in ordinary]
    assert len(ordinary) + len(replaced) == 8 * 4 + 2 * 3

    done = job(f"run={runs['a']}", f"exclude-check={runs['takedown']}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("exclude-check passed:")
    assert f"in force in {runs['a']} for steps 5–10" in done.stdout
    assert "0 reads of them in those steps" in done.stdout

    other = f"{runs['takedown']}.other"
    fs, path = moto_s3.storage.fsspec(other)
    fs.pipe_file(path, b"video_0001_000\n")
    done = job(f"run={runs['a']}", f"exclude-check={other}")
    assert done.returncode == 1
    assert "was never in force" in done.stdout


@pytest.mark.slow
def test_a_stage_started_from_another_reports_both_stages_clips(runs, monkeypatch, moto_s3, job):
    for key, value in runs["env"].items():
        monkeypatch.setenv(key, value)
    storage = moto_s3.storage
    table = pa.Table.from_batches(list(checkpoint_clips(runs["b"], 2, storage)))
    by_run = collections.defaultdict(dict)
    for row in table.to_pylist():
        by_run[(row["run"], row["checkpoint"])][row["clip_id"]] = (
            row["times_seen"],
            row["first_step"],
            row["last_step"],
        )
    assert set(by_run) == {(runs["b"], 2), (runs["a"], 10)}
    b_lineage = checkpoint_replay(runs["b"], 2, storage).lineage
    assert b_lineage["init_from"] == {"uri": runs["a"], "folder": f"{runs['a']}/checkpoints/step-00000010"}
    assert [(e["step"], e["uri"]) for e in b_lineage["exclusions"]] == [(0, runs["takedown"])]
    assert by_run[(runs["b"], 2)] == counts(runs["served"]["b"])
    assert by_run[(runs["a"], 10)] == counts(
        runs["served"]["a1"] + runs["served"]["a2"] + runs["served"]["a3"]
    )

    clip = runs["served"]["a1"][0]["clip_id"]
    done = job(f"run={runs['b']}", f"clip={clip}", "--csv")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith('"run","step","rank"')
    expected = [s for name in ("a1", "a2", "a3", "b") for s in runs["served"][name] if s["clip_id"] == clip]
    assert len(lines) - 1 == len(expected)
    assert f"checkpoints of {runs['a']} that trained on it: [" in done.stderr
    assert f"checkpoints of {runs['b']} that trained on it: [2]" in done.stderr

    out = job(f"run={runs['b']}", "checkpoint=3")
    assert out.returncode == 1
    assert "no committed checkpoint at step 3 (committed: [2])" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_job_explains_itself_and_refuses_bad_arguments_in_one_line(job):
    assert job("--help").stdout.startswith("Data provenance of a run")
    for args, message in [
        (["checkpoint=2"], "run= is required"),
        (["run=x", "clip=a", "video=b"], "ask one question at a time: clip, video"),
        (["run=x"], "give checkpoint=N, clip=ID, video=URI or exclude-check=LIST"),
        (["run=x", "checkpoint=2", "out=a.txt"], "out=a.txt: name a .lance, .arrow, .csv file"),
        (["run=x", "checkpont=2"], "checkpont"),
    ]:
        done = job(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1
        assert message in done.stderr, done.stderr
