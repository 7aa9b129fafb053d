"""The evaluation job end to end on a trained tiny run (checkpoints in the object store): protocols,
shards that a rerun finishes, results independent of the number of processes, and its command line."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import lance
import numpy as np
import pytest
import torch

from svd.config import ConfigError, compose
from svd.data.local_s3 import free_port
from svd.eval.job import EvaluateSettings, Evaluation
from svd.eval.lpips import SKIPPED as LPIPS_SKIPPED
from svd.eval.protocol import load_protocol
from svd.eval.watch import EvalGauges, watch
from svd.launch.local import launch_local

from ..settings import production_settings
from .test_features import TinyI3D

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["samples=4", "shard_size=2", "frames=4", "fps=4", "sampler_steps=2"]


def evaluation(run: str, name: str, overrides: list[str], moto_s3, **kwargs) -> Evaluation:
    return Evaluation(EvaluateSettings(run=run), load_protocol(name, overrides), moto_s3.storage, **kwargs)


def flat(values: dict) -> dict[str, float]:
    """Nested metric values as one level (`motion_by_bucket.16`), for pytest.approx."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            out[key] = value
    return out


def test_motion_adherence_samples_every_condition_at_every_bucket_and_reports_spearman_and_clip(
    trained_run, moto_s3, s3_env, tiny_clip
):
    overrides = [*SMALL, "motion_buckets=[16,255]", f"clip={tiny_clip}"]  # a tiny random CLIP
    job = evaluation(trained_run, "motion_adherence", overrides, moto_s3)
    job.out = f"{trained_run}/eval/with-clip"  # the compare test's folder has the protocol's defaults
    assert job.step() == 2
    metrics = job.evaluate(2, progress=False)
    rho = metrics["values"]["spearman_rho"]
    assert -1.0 <= rho <= 1.0
    assert set(metrics["values"]["motion_by_bucket"]) == {"16", "255"}
    assert metrics["samples"] == 8  # 4 conditions × 2 buckets
    folder = job.folder(2)
    table = lance.dataset(f"{folder}/samples.lance", storage_options=moto_s3.storage.lance_options(folder))
    rows = table.to_table().to_pylist()
    assert sorted((r["condition"], r["motion_bucket_id"]) for r in rows) == [
        (c, b) for c in range(4) for b in (16, 255)
    ]
    assert len({r["seed"] for r in rows}) == 8  # each sample its own noise
    # frames to each sample's caption (a text-to-video run: no conditioning image)
    assert all(-1 <= r["clip_text"] <= 1 and "clip_image" not in r for r in rows)
    assert metrics["values"]["clip_text_similarity"] == pytest.approx(np.mean([r["clip_text"] for r in rows]))
    assert metrics["skipped"] == []
    fs, path = moto_s3.storage.fsspec(folder)
    assert json.loads(fs.cat_file(f"{path}/metrics.json"))["values"] == metrics["values"]
    assert all(fs.exists(f"{path}/{r['video']}") for r in rows)
    report = fs.cat_file(f"{path}/report.md").decode()
    assert "spearman_rho" in report
    for picture in ("contact_sheet.png", "spearman_rho_by_step.png"):
        assert f"]({picture})" in report
        assert fs.cat_file(f"{path}/{picture}")[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_processes_a_killed_process_and_a_rerun_give_the_single_process_result(
    trained_run, moto_s3, s3_env, monkeypatch
):
    import os
    import signal
    import time

    overrides = [*SMALL, "samples=6", "motion_buckets=[0,255]", "seed=3"]
    single = evaluation(trained_run, "motion_adherence", overrides, moto_s3)
    single.out = f"{trained_run}/eval/single"
    expected = single.evaluate(2, progress=False)["values"]

    split = [
        evaluation(trained_run, "motion_adherence", overrides, moto_s3, rank=r, world_size=2) for r in (0, 1)
    ]
    for job in split:
        job.out = f"{trained_run}/eval/split"
    assert split[0].evaluate(2, progress=False) is None  # rank 1's shard is not written yet
    merged = split[1].evaluate(2, progress=False)["values"]
    assert flat(merged) == pytest.approx(flat(expected), rel=1e-6)

    # The command killed (SIGKILL: nothing of it runs after) once it wrote its first shard of three; the
    # rerun samples only the shards it had not written.
    killed = f"{trained_run}/eval/killed"
    fs, shards = moto_s3.storage.fsspec(f"{killed}/step-00000002/shards")
    args = [f"run={trained_run}", "eval=motion_adherence", *(f"eval.{o}" for o in overrides), f"out={killed}"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args],
        cwd=ROOT,
        env=os.environ | moto_s3.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def written() -> set[str]:
        fs.invalidate_cache(shards)
        return {n.rsplit("/", 1)[-1] for n in fs.ls(shards, detail=False)} if fs.exists(shards) else set()

    try:
        deadline = time.monotonic() + 300
        while not written():
            assert process.poll() is None, "the evaluation ended before it was killed"
            assert time.monotonic() < deadline, "no shard written in 300 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    kept = written()
    assert 1 <= len(kept) < 3
    assert not fs.exists(f"{shards.rsplit('/', 1)[0]}/metrics.json")
    sampled = []
    original = Evaluation._evaluate_shard
    monkeypatch.setattr(
        Evaluation,
        "_evaluate_shard",
        lambda self, step, shard, *a: sampled.append(shard.index) or original(self, step, shard, *a),
    )
    rerun = evaluation(trained_run, "motion_adherence", overrides, moto_s3)
    rerun.out = killed
    assert flat(rerun.evaluate(2, progress=False)["values"]) == pytest.approx(flat(expected), rel=1e-6)
    assert sorted(f"shard-{i:05d}.npz" for i in sampled) == sorted(
        {f"shard-{i:05d}.npz" for i in range(3)} - kept
    )


def test_a_merge_whose_samples_commit_another_merge_won_finishes_with_the_same_table(
    trained_run, moto_s3, s3_env, monkeypatch, tmp_path
):
    """The last two ranks can both find every shard written and merge at once. Their samples.lance commits
    then race, and the loser's fails as Lance fails it (on local disk, or a store with conditional writes:
    "Dataset already exists", seen with two threads merging): the loser finishes, since the winner wrote
    the same rows, which it checks rather than assumes."""
    import lance

    job = evaluation(trained_run, "motion_adherence", [*SMALL, "motion_buckets=[0,255]"], moto_s3)
    job.out = str(tmp_path / "raced")
    with monkeypatch.context() as patch:
        patch.setattr(Evaluation, "merge", lambda self, step, every: None)
        job.evaluate(2, progress=False)  # every shard written, nothing merged
    every = job.plan(2)[0]
    first = job.merge(2, every)
    write = lance.write_dataset
    uri = f"{job.folder(2)}/samples.lance"

    def lost_the_commit(*args, **kwargs):
        raise OSError(f"Dataset already exists: {uri}")

    monkeypatch.setattr(lance, "write_dataset", lost_the_commit)
    assert job.merge(2, every)["values"] == first["values"]
    assert lance.dataset(uri).count_rows() == 8  # 4 conditions × 2 buckets, once

    write(lance.dataset(uri).to_table().slice(0, 3), uri, mode="overwrite")  # not what this merge writes
    with pytest.raises(OSError, match="Dataset already exists"):
        job.merge(2, every)


def test_results_of_other_settings_in_the_folder_are_refused_not_mixed(trained_run, moto_s3, s3_env):
    first = evaluation(trained_run, "motion_adherence", [*SMALL, "motion_buckets=[0,9]"], moto_s3)
    first.out = f"{trained_run}/eval/changed"
    first.evaluate(2, progress=False)
    changed = [*SMALL, "motion_buckets=[0,9]", "samples=6"]
    again = evaluation(trained_run, "motion_adherence", changed, moto_s3)
    again.out = first.out
    expected = r"step-00000002 holds results of other settings \(eval.samples=4 there, 6 now\): give another"
    with pytest.raises(ConfigError, match=expected):
        again.evaluate(2, progress=False)


def test_a_protocol_that_does_not_fit_the_stage_or_lacks_its_network_is_refused_in_one_line(
    trained_run, moto_s3, s3_env
):
    expected = r"eval=i2v_holdout evaluates image_to_video models; .* trained text_to_video"
    with pytest.raises(ConfigError, match=expected):
        evaluation(trained_run, "i2v_holdout", SMALL, moto_s3)
    with pytest.raises(ConfigError, match=r"FVD needs eval\.feature_network"):
        evaluation(trained_run, "i2v_holdout", [*SMALL, "tasks=[]"], moto_s3)
    with pytest.raises(ConfigError, match=r"eval.motion_buckets: motion_adherence needs at least 2"):
        load_protocol("motion_adherence", ["motion_buckets=[5]"])
    with pytest.raises(ConfigError, match=r"eval=.i2v_hold. is not a protocol.*did you mean 'i2v_holdout'"):
        load_protocol("i2v_hold")


def evaluate_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_line_plans_evaluates_and_names_what_is_wrong(trained_run, moto_s3, s3_env):
    import os

    env = os.environ | moto_s3.env
    assert "Protocols:" in evaluate_command("--help", env=env).stdout
    common = [f"run={trained_run}", "eval=motion_adherence", *(f"eval.{o}" for o in SMALL)]
    planned = evaluate_command(*common, "out=s3://nowhere-yet/x", "--dry-run", env=env)
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.strip() == (
        f"motion_adherence of {trained_run} at step 2: 4 conditions in 2 shards; 2 to sample on rank 0 of 1; "
        "results in s3://nowhere-yet/x/step-00000002"
    )
    done = evaluate_command(*common, f"out={trained_run}/eval/cli", env=env)
    assert done.returncode == 0, done.stderr
    skipped, result = done.stdout.strip().splitlines()
    assert (
        skipped
        == "CLIP similarity skipped: no eval.clip=<local folder of a CLIP model in the Hugging Face layout>"
    )
    assert result.startswith("motion_adherence at step 2: spearman_rho ")
    for args, code, message in [
        (["eval=motion_adherence"], 2, "evaluate: run=<run directory> is required (see --help)"),
        ([f"run={trained_run}", "eval=nope"], 2, "evaluate: eval='nope' is not a protocol;"),
        ([f"run={trained_run}/missing", "eval=motion_adherence"], 1, "evaluate: run="),
        ([*common, "checkpoint=7"], 1, "evaluate: checkpoint=7: not a saved step of"),
    ]:
        failed = evaluate_command(*args, env=env)
        assert failed.returncode == code, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
        assert failed.stderr.startswith(message), failed.stderr


def scraped_watch(job: Evaluation) -> tuple[list[int], list[str], list[str]]:
    """`watch(job)` with its endpoint on a free port: (the steps it merged, the lines it said, the page its
    endpoint served right after each step's gauges were set)."""
    port, served = free_port(), []
    observe = EvalGauges.observe

    def observed_and_scraped(self, metrics):
        observe(self, metrics)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            served.append(page.read().decode())

    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EvalGauges, "observe", observed_and_scraped)
        merged = watch(job, poll_s=0.5, metrics_port=port, say=lines.append)
    return merged, lines, served


@pytest.mark.slow
def test_watch_evaluates_each_checkpoint_as_training_saves_it_and_serves_each_metric(
    train_table, moto_s3, s3_env, launched, production
):
    """Training (6 steps, a checkpoint every 2) and the watch side by side, as a second job would run it."""
    import os

    env = os.environ | moto_s3.env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = launched(production(train_table, "eval-watched", "train.steps=6", "checkpoint.every=2"), env)
    run.wait_for(r"step 1/6 ")
    job = evaluation(
        f"{train_table['bucket']}/runs/eval-watched", "motion_adherence", [*SMALL, "samples=2"], moto_s3
    )
    merged, lines, served = scraped_watch(job)
    assert run.finish() == 0, run.output()
    assert merged == [2, 4, 6], lines
    assert lines[-1] == "watch: the run's last step 6 is evaluated"
    assert [line.split(":")[0] for line in lines[:3]] == [f"motion_adherence at step {s}" for s in (2, 4, 6)]
    for step, page in zip((2, 4, 6), served, strict=True):  # job and stage: the run's
        labels = (
            f'job="video_pretrain",metric="spearman_rho",protocol="motion_adherence",stage="video_pretrain",'
            f'step="{step}"'
        )
        assert f"svd_eval_metric{{{labels}}}" in page


@pytest.mark.slow
def test_interpolation_is_measured_on_the_generated_frames_between_the_given_ones(
    train_table, moto_s3, s3_env, tiny_lpips
):
    run_dir = f"{train_table['bucket']}/runs/eval-interpolated"
    settings = production_settings(
        train_table["table"], run_dir, "stage=interpolation", "data.frames=5", "train.steps=2"
    )
    launch_local(compose([*settings, "train.global_batch=2", "checkpoint.every=2"]))
    job = evaluation(
        run_dir, "interpolation_holdout", ["samples=2", "shard_size=2", "sampler_steps=2"], moto_s3
    )
    metrics = job.evaluate(2, progress=False)
    values = metrics["values"]
    assert 0 < values["psnr"] < 100  # generated frames, not the given ones (identical frames: infinite)
    assert -1 <= values["ssim"] < 1
    assert "lpips" not in values
    assert LPIPS_SKIPPED in metrics["skipped"]
    folder, sha256 = tiny_lpips  # a random AlexNet; its 16-px frames are too small for AlexNet: 32 px here
    small = ["samples=2", "shard_size=2", "sampler_steps=2", f"lpips={folder}", f"lpips_sha256={sha256}"]
    refused = evaluation(run_dir, "interpolation_holdout", small, moto_s3)
    refused.out = f"{run_dir}/eval/lpips-refused"
    with pytest.raises(ConfigError, match=r"eval.lpips: LPIPS's AlexNet needs frames of at least 31 px"):
        refused.evaluate(2, progress=False)
    job = evaluation(run_dir, "interpolation_holdout", [*small, "height=32", "width=32"], moto_s3)
    job.out = f"{run_dir}/eval/with-lpips"
    metrics = job.evaluate(2, progress=False)
    assert metrics["values"]["lpips"] > 0  # generated frames, not the given ones (identical frames: 0)
    assert LPIPS_SKIPPED not in metrics["skipped"]
    fs, path = moto_s3.storage.fsspec(job.folder(2))
    assert json.loads(fs.cat_file(f"{path}/metrics.json"))["values"]["lpips"] == metrics["values"]["lpips"]


def test_compare_prints_and_plots_each_runs_evaluations_of_a_protocol(trained_run, moto_s3, s3_env, tmp_path):
    import os

    expected = evaluation(trained_run, "motion_adherence", [*SMALL, "motion_buckets=[16,255]"], moto_s3)
    rho = expected.evaluate(2, progress=False)["values"]["spearman_rho"]
    env = os.environ | moto_s3.env
    plot = tmp_path / "compare.png"
    missing = f"{trained_run}-never-evaluated"
    done = evaluate_command(
        f"compare={trained_run},{missing}", "eval=motion_adherence", f"out={plot}", env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["run", "step", "spearman_rho"]  # the scalar metrics
    assert lines[1].split() == [trained_run, "2", f"{rho:.4g}"]
    assert lines[2].split()[0] == missing
    assert "(no evaluation of this protocol)" in lines[2]
    assert lines[-1] == f"plot: {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero_shot_prompts_take_turns_and_the_reference_table_gives_the_reference_videos(
    trained_run, train_table, moto_s3, s3_env, tmp_path
):
    network = tmp_path / "i3d.pt"
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="torch.jit.script"):
        torch.jit.script(TinyI3D()).save(str(network))
    prompts = tmp_path / "classes.txt"
    prompts.write_text("ApplyEyeMakeup\n\nBaby Crawling\nYoYo\n")  # blank lines are not prompts
    overrides = [
        *SMALL,
        f"prompts={prompts}",
        f"references={train_table['table']}",
        f"feature_network={network}",
        f"feature_sha256={hashlib.sha256(network.read_bytes()).hexdigest()}",
        "bootstrap_draws=10",
    ]
    job = evaluation(trained_run, "ucf101_zero_shot", overrides, moto_s3)
    metrics = job.evaluate(2, progress=False)
    assert metrics["values"]["fvd"] >= 0
    folder = job.folder(2)
    rows = lance.dataset(f"{folder}/samples.lance", storage_options=moto_s3.storage.lance_options(folder))
    captions = [r["caption"] for r in sorted(rows.to_table().to_pylist(), key=lambda r: r["condition"])]
    assert captions == ["ApplyEyeMakeup", "Baby Crawling", "YoYo", "ApplyEyeMakeup"]


def test_the_process_share_comes_from_torchs_or_slurms_variables():
    from svd.eval.job import rank_and_world

    assert rank_and_world({}) == (0, 1, 0)
    assert rank_and_world({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"}
    assert rank_and_world(slurm) == (5, 16, 5)
    assert rank_and_world(slurm | {"RANK": "0", "WORLD_SIZE": "2"}) == (0, 2, 0)  # a launcher's own first


def test_launcher_settings_are_checked_before_anything_runs_and_a_dry_run_says_where_it_would(capsys):
    from svd.launch.evaluation import check_settings, evaluate_elsewhere

    for settings, message in [
        (EvaluateSettings(launcher="k8s"), "launcher='k8s': expected one of local, slurm, ray"),
        (EvaluateSettings(launcher="slurm", nodes=0), "nodes=0 must be ≥ 1"),
        (
            EvaluateSettings(launcher="ray", cpus_per_rank=-1),
            "cpus_per_rank=-1 must be ≥ 0 (0: the cluster's)",
        ),
        (
            EvaluateSettings(ranks_per_node=2),
            "launcher=local runs this process only (nodes × ranks_per_node = 2)",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_settings(settings)
    protocol = load_protocol("motion_adherence")
    settings = EvaluateSettings(run="s3://b/runs/r", launcher="slurm", nodes=2, ranks_per_node=4)
    assert evaluate_elsewhere(settings, protocol, dry_run=True) == 0
    assert capsys.readouterr().out == (
        "motion_adherence: checkpoint latest of s3://b/runs/r in 8 processes (2 × 4) as a Slurm job on "
        "cluster default, 8 CPUs and one GPU each\n"
    )
    settings = EvaluateSettings(run="r", launcher="ray", watch=True, cluster="local_slurm", cpus_per_rank=2)
    assert evaluate_elsewhere(settings, protocol, dry_run=True) == 0
    assert capsys.readouterr().out == (
        "motion_adherence: watch each checkpoint of r in 1 processes (1 × 1) as Ray tasks on cluster "
        "local_slurm, 2 CPUs each\n"
    )
    assert evaluate_elsewhere(EvaluateSettings(launcher="ray", cluster="nope"), protocol, dry_run=True) == 2
    assert capsys.readouterr().err.startswith("evaluate: cluster='nope': no ")


@pytest.mark.slow
def test_fvd_of_an_image_to_video_run_conditions_on_the_held_out_clips_with_an_interval_and_a_curve(
    train_table, moto_s3, s3_env, tmp_path, tiny_clip
):
    run_dir = f"{train_table['bucket']}/runs/eval-i2v"
    settings = production_settings(
        train_table["table"], run_dir, "stage=i2v_finetune", "data.frames=4", "train.steps=2"
    )
    launch_local(compose([*settings, "train.global_batch=2", "checkpoint.every=2"]))
    network = tmp_path / "i3d.pt"
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="torch.jit.script"):  # the format I3D ships in
        torch.jit.script(TinyI3D()).save(str(network))
    digest = hashlib.sha256(network.read_bytes()).hexdigest()
    overrides = [
        *SMALL,
        f"feature_network={network}",
        f"feature_sha256={digest}",
        "counts=[2,4]",
        "bootstrap_draws=20",
        f"clip={tiny_clip}",  # a tiny random CLIP
    ]
    job = evaluation(run_dir, "i2v_holdout", overrides, moto_s3)  # the protocol's own stage
    metrics = job.evaluate(2, progress=False)
    values = metrics["values"]
    low, high = values["fvd_interval_95"]
    assert values["fvd"] >= 0
    assert low < high
    assert [n for n, _ in values["fvd_by_count"]] == [2, 4]
    assert values["fvd_by_count"][-1][1] == pytest.approx(values["fvd"])  # all 4 samples
    assert metrics["feature_network"] == {"uri": str(network), "sha256": digest}
    folder = job.folder(2)
    fs, path = moto_s3.storage.fsspec(folder)
    assert "](fvd_by_count.png)" in fs.cat_file(f"{path}/report.md").decode()
    rows = lance.dataset(f"{folder}/samples.lance", storage_options=moto_s3.storage.lance_options(folder))
    held_out = {r["clip_id"] for r in train_table["rows"] if r["split"] == "val"}
    samples = rows.to_table().to_pylist()
    assert {r["clip_id"] for r in samples} == held_out  # 2 clips, each conditions twice
    assert all(-1 <= r["clip_image"] <= 1 for r in samples)  # frames to the conditioning first frame
    assert -1 <= values["clip_image_similarity"] <= 1


def test_the_launchers_report_names_each_merged_result_and_each_failed_process(capsys):
    from svd.eval.share import ShareResult
    from svd.launch.evaluation import report

    metrics = {"protocol": "motion_adherence", "step": 4, "samples": 8, "values": {"spearman_rho": 0.25}}
    merged = ShareResult(0, steps=[4], merged=[metrics], folders={4: "s3://b/runs/r/eval/m/step-00000004"})
    assert report({0: merged, 1: ShareResult(1, steps=[4])}, 2) == 0
    assert capsys.readouterr().out == (
        "motion_adherence at step 4: spearman_rho 0.25 (8 samples) → s3://b/runs/r/eval/m/step-00000004\n"
    )
    assert report({0: merged, 1: "RunError: run=s3://b/runs/r: no config.yaml"}, 2) == 1
    assert capsys.readouterr().err.splitlines() == [
        "evaluate: rank 1 of 2 failed: RunError: run=s3://b/runs/r: no config.yaml",
        "evaluate: 1 of 2 processes failed; rerun the same command",
    ]


def test_a_watch_serves_the_gauges_of_steps_another_process_merged(trained_run, moto_s3, s3_env):
    """A watch's process that merged nothing (another rank did, or an earlier watch) still serves every
    evaluated step: a pod's PodMonitor scrapes one endpoint of the pod."""

    overrides = [*SMALL, "motion_buckets=[0,255]"]
    first = evaluation(trained_run, "motion_adherence", overrides, moto_s3)
    first.out = f"{trained_run}/eval/merged-elsewhere"
    rho = first.evaluate(2, progress=False)["values"]["spearman_rho"]

    later = evaluation(trained_run, "motion_adherence", overrides, moto_s3)
    later.out = first.out
    merged, lines, served = scraped_watch(later)
    assert merged == []  # nothing left to merge
    assert lines == ["watch: the run's last step 2 is evaluated"]
    labels = 'job="video_pretrain",metric="spearman_rho",protocol="motion_adherence",stage="video_pretrain"'
    (page,) = served
    assert f'svd_eval_metric{{{labels},step="2"}} {rho}' in page


def test_an_unknown_held_out_choice_is_named_before_the_run_is_read(moto_s3):
    with pytest.raises(ConfigError, match=r"held_out='clips': choose one of \['run', 'table'\]"):
        Evaluation(
            EvaluateSettings(run="s3://no-such-bucket/run", held_out="clips"),
            load_protocol("motion_adherence"),
            moto_s3.storage,
        )
