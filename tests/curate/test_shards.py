"""One curation as N shards, without a cluster: what each task curates, the report the submitter prints
whichever cluster ran them, and a site that does not exist refused before anything is submitted. The shards on
a real Ray and a real Slurm: tests/launch/test_ray_launcher.py and tests/launch/test_slurm_launcher.py."""

from __future__ import annotations

from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import pytest

from svd.curate.config import CurateConfig
from svd.curate.pipeline import RunSummary
from svd.curate.shards import ShardResults, report_shards, run_shards, shard_configs

ROOT = Path(__file__).resolve().parents[2]


def test_each_task_curates_its_own_shard_in_its_own_process():
    cfg = CurateConfig(input="s3://b/raw/", output="s3://b/clips.lance", launcher="ray", shards=3, workers=4)

    tasks = shard_configs(cfg)

    assert [(t.shard, t.shards, t.launcher) for t in tasks] == [(f"{i}/3", 1, "local") for i in range(3)]
    assert {(t.input, t.output, t.workers) for t in tasks} == {("s3://b/raw/", "s3://b/clips.lance", 4)}
    for task in tasks:
        task.validate()  # what a task runs is a valid local curation


def test_the_report_sums_the_finished_shards_and_names_each_failed_one_in_one_line(capsys):
    finished = RunSummary(
        videos_in_shard=5, skipped_existing=1, curated=4, clips=7, status=Counter(ok=3, error=1)
    )
    failed = "InputError: input=s3://b/raw/: no such file or folder, or nothing in it"

    status = report_shards(ShardResults({0: finished}, {1: failed}), 2)

    assert status == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "shard 0/2: 5 inputs, 1 already in the table, 4 curated → 7 clips",
        "1 of 2 shards: 5 inputs, 1 already in the table, 4 curated → 7 clips",
        "  ok: 3",
        "  error: 1",
    ]
    assert err.splitlines() == [
        f"curate: shard 1/2 failed: {failed}",
        "curate: 1 videos failed for a reason a rerun may not meet again; rerun the same command to retry "
        "them",
        "curate: 1 of 2 shards failed; rerun the same command",
    ]


def test_shards_that_all_finished_cleanly_exit_0(capsys):
    done = RunSummary(videos_in_shard=2, skipped_existing=2)

    assert report_shards(ShardResults({0: done, 1: done}, {}), 2) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1]
        == "2 of 2 shards: 4 inputs, 4 already in the table, 0 curated → 0 clips"
    )


@pytest.mark.skipif(find_spec("submitit") is None, reason="submitit is not installed (the slurm extra)")
def test_curation_on_an_unknown_cluster_is_refused_before_anything_is_submitted(capsys):
    cfg = CurateConfig(
        input="s3://b/raw/", output="s3://b/clips.lance", launcher="slurm", shards=2, cluster="nope"
    )

    assert run_shards(cfg) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"curate: cluster='nope': no {ROOT / 'jobs' / 'conf' / 'cluster' / 'nope.yaml'}"
    ]
