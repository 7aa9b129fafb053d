"""The run configuration: composition of the stage groups, and one-line errors before anything starts."""

from __future__ import annotations

import copy
import re
import runpy
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import pytest

from svd.config import ConfigError, RunConfig, compose, from_yaml, options, setting, to_yaml, validate
from svd.curate.config import CurateConfig

ROOT = Path(__file__).resolve().parents[1]
launch = runpy.run_path(str(ROOT / "jobs" / "launch.py"), run_name="launch")["main"]
TABLE = "data.table=s3://bucket/clips.lance"


def test_every_stage_of_the_paper_is_an_option_with_its_hyper_parameters():
    assert options("stage") == [
        "camera_lora",
        "i2v_finetune",
        "image_pretrain",
        "interpolation",
        "multiview",
        "video_finetune_hq",
        "video_pretrain",
        "video_pretrain_hr",
    ]
    video = compose(["stage=video_pretrain", TABLE])
    assert (video.data.height, video.data.width, video.data.frames) == (256, 384, 14)
    assert (video.train.lr, video.train.global_batch, video.steps) == (1e-4, 1536, 150_000)
    assert (video.diffusion.p_mean, video.diffusion.cond_dropout) == (-1.2, 0.15)
    hq = compose(["stage=video_finetune_hq", TABLE])
    assert (hq.data.height, hq.data.width, hq.diffusion.p_mean, hq.diffusion.p_std) == (576, 1024, 0.5, 1.4)
    i2v = compose(["stage=i2v_finetune", TABLE])
    assert (i2v.diffusion.p_mean, i2v.diffusion.p_std, i2v.diffusion.cond_aug_mean) == (0.7, 1.6, -3.0)
    lora = compose(["stage=camera_lora", TABLE])
    assert (lora.stage.trainable, lora.stage.lora_rank) == ("lora", 16)
    assert compose(["stage=interpolation", TABLE]).data.frames == 5
    assert compose(["stage=multiview", TABLE]).model.micro_conditioning == "sv3d"


def test_overrides_apply_after_the_groups_and_survive_a_yaml_round_trip():
    cfg = compose(
        ["stage=video_pretrain_hr", "model=tiny", TABLE, "train.lr=3e-5", "nodes=2", "gpus_per_node=2"]
    )
    assert cfg.train.lr == 3e-5
    assert cfg.model.preset == "tiny"
    assert cfg.data.height == 16
    assert cfg.job_name == "video_pretrain_hr"
    assert cfg.checkpoint.run_dir == "outputs/runs/video_pretrain_hr"
    assert cfg.grad_accumulation == 1  # global batch 4 = 4 ranks × micro-batch 1
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.tabel=x"], "unknown key 'data.tabel'; did you mean 'data.table'?"),
        (["trian.lr=1", TABLE], "unknown key 'trian'; did you mean 'train'?"),
        (["stage=video_pretrian", TABLE], "did you mean 'video_pretrain'?"),
        (["train.lr=fast", TABLE], "train.lr: Value 'fast' of type 'str' could not be converted to Float"),
        ([], "data.table is required"),
        (
            ["model=tiny", TABLE, "gpus_per_node=3"],
            "train.global_batch=4 is not divisible by data-parallel size 3",
        ),
        (
            ["stage=image_pretrain", TABLE, "data.frames=14"],
            "data.frames=14: stage.task=image trains on stills",
        ),
        (["parallel.sharding=zero3", TABLE], "parallel.sharding='zero3': choose one of"),
        (["train.lr=-1", TABLE], "train.lr=-1.0 must be > 0"),
        (["stage.task=video", TABLE], "stage.task='video': choose one of"),
    ],
)
def test_a_mistake_is_one_line_naming_the_key(args, message):
    with pytest.raises(ConfigError) as error:
        compose(args)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_launch_help_lists_groups_and_options(capsys):
    assert launch(["--help"]) == 0
    out = capsys.readouterr().out
    assert "stage: video_pretrain | camera_lora | i2v_finetune" in out
    assert "model: svd | small | tiny" in out
    assert "launcher: local | ray | slurm" in out


def test_launch_prints_the_resolved_config_and_the_dry_run(capsys):
    assert launch(["stage=i2v_finetune", "model=tiny", TABLE, "--cfg"]) == 0
    printed = capsys.readouterr().out
    assert "task: image_to_video" in printed
    assert "p_mean: 0.7" in printed
    assert launch(["stage=video_pretrain", TABLE, "nodes=32", "gpus_per_node=8", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "256 rank(s) = nodes 32 × 8" in dry
    assert "accumulation 6" in dry


def test_launch_refuses_an_unreadable_table_before_starting(capsys, tmp_path):
    assert launch(["model=tiny", f"data.table={tmp_path}/missing.lance"]) == 2
    err = capsys.readouterr().err
    assert f"data.table={tmp_path}/missing.lance: does not exist" in err
    assert len(err.strip().splitlines()) == 1


# Every setting, probed with zero, negative and empty values: each is either accepted, because it means
# something (listed below, with what it means), or refused in one line that starts with the key. A setting
# added later without a decision here fails `test_every_setting_has_a_decision`.
ZERO, NEGATIVE, EMPTY = "zero", "negative", "empty"  # False is a bool's zero
ZERO_ITEM, NEGATIVE_ITEM, EMPTY_ITEM = "zero item", "negative item", "empty item"  # in a list or dict
REFUSED: frozenset[str] = frozenset()
NONE_LIKE = frozenset({EMPTY})  # an empty string is read as null: the optional model or filter is off
SWITCH = frozenset({ZERO})  # a bool, or a number whose 0 turns its feature off or means "none"/"any"
RUN_ACCEPTS: dict[str, frozenset[str]] = {
    "job_name": REFUSED,
    "nodes": REFUSED,
    "gpus_per_node": REFUSED,
    "stage.name": REFUSED,
    "stage.task": REFUSED,
    "stage.iterations": REFUSED,
    "stage.init_from": NONE_LIKE,
    "stage.trainable": REFUSED,
    "stage.lora_rank": REFUSED,
    "stage.camera_motion": NONE_LIKE,
    "model.preset": REFUSED,
    "model.autoencoder": REFUSED,
    "model.autoencoder_path": REFUSED,  # "" would be handed to from_pretrained; null means tiny random
    "model.autoencoder_factor": REFUSED,
    "model.scale_factor": REFUSED,
    "model.text_encoder": NONE_LIKE,
    "model.image_encoder": NONE_LIKE,
    "model.micro_conditioning": REFUSED,
    "model.cache_dir": REFUSED,
    "diffusion.p_mean": frozenset({ZERO, NEGATIVE}),  # the mean of ln σ: any real number
    "diffusion.p_std": REFUSED,
    "diffusion.cond_dropout": SWITCH,  # 0: never trained unconditionally
    "diffusion.cond_aug_mean": frozenset({ZERO, NEGATIVE}),  # the mean of ln σ of the conditioning noise
    "diffusion.cond_aug_std": SWITCH,  # 0: always the same conditioning noise level
    "data.table": REFUSED,
    "data.filter": NONE_LIKE,
    "data.version": REFUSED,  # null: the latest; "" is no version or tag
    "data.val_split": REFUSED,
    "data.height": REFUSED,
    "data.width": REFUSED,
    "data.frames": REFUSED,
    "data.fps": REFUSED,
    "data.micro_batch": REFUSED,
    "data.num_workers": SWITCH,  # 0: decode in the rank's process
    "data.batch_timeout_s": REFUSED,
    "data.index_timeout_s": REFUSED,
    "data.serve": REFUSED,
    "data.motion_score_scale": REFUSED,
    "data.caption_weights": REFUSED,  # null: equal weights; [] and an all-zero list weigh nothing
    "data.elevation_deg": frozenset({ZERO, NEGATIVE}),  # an orbit at or below the horizon
    "data.cache_dir": REFUSED,
    "train.steps": REFUSED,
    "train.global_batch": REFUSED,
    "train.lr": REFUSED,
    "train.betas": frozenset({ZERO_ITEM}),  # β1 = 0: Adam without momentum
    "train.weight_decay": SWITCH,
    "train.warmup_steps": SWITCH,
    "train.schedule": REFUSED,
    "train.grad_clip": SWITCH,
    "train.nonfinite_steps_limit": REFUSED,  # skipped steps in a row that stop a run: at least one
    "train.ema_decay": SWITCH,  # 0: the "average" is the latest weights
    "train.seed": SWITCH,
    "train.log_every": REFUSED,
    "train.val_every": SWITCH,
    "train.val_samples": REFUSED,
    "train.val_sigmas": REFUSED,
    "train.preview_every": SWITCH,
    "train.preview_steps": REFUSED,
    "train.preview_guidance": frozenset({ZERO_ITEM}),  # guidance 0: the unconditional prediction
    "parallel.sharding": REFUSED,
    "parallel.mixed_precision": REFUSED,
    "parallel.activation_checkpointing": REFUSED,
    "parallel.ac_every": REFUSED,
    "parallel.compile": SWITCH,
    "parallel.init_device": REFUSED,
    "parallel.collective_timeout_s": REFUSED,
    "checkpoint.run_dir": REFUSED,
    "checkpoint.every": REFUSED,
    "checkpoint.keep": REFUSED,
    "checkpoint.async_save": SWITCH,
    "checkpoint.lease_ttl_s": REFUSED,
    "checkpoint.break_lease": SWITCH,  # False: the normal case, a held run directory is refused
    "metrics.port": SWITCH,  # 0: no endpoint
    "metrics.gpu": REFUSED,  # null: matched to the device name
    "metrics.gpu_peak_flops": frozenset({EMPTY}),  # nothing added to the built-in table
    "launcher.name": REFUSED,
    "launcher.master_port": SWITCH,  # 0: a free port
    "launcher.max_requeues": SWITCH,  # 0: the first crash ends the job
    "launcher.folder": REFUSED,
    "launcher.wait": SWITCH,
    "launcher.ray_address": NONE_LIKE,  # $RAY_ADDRESS, else a local Ray
    "launcher.ray_storage": NONE_LIKE,  # under the run directory
    "cluster.name": REFUSED,
    "cluster.gpus": SWITCH,
    "cluster.partition": NONE_LIKE,  # the site's default partition, account, QoS; no constraint
    "cluster.account": NONE_LIKE,
    "cluster.qos": NONE_LIKE,
    "cluster.constraint": NONE_LIKE,
    "cluster.time_min": REFUSED,
    "cluster.cpus_per_task": REFUSED,
    "cluster.mem_gb": SWITCH,  # 0: Slurm's default
    "cluster.exclusive": SWITCH,
    "cluster.signal_delay_s": SWITCH,  # the signal at the time limit itself
    "cluster.sbatch_extra": frozenset({EMPTY}),  # no extra options; an option without a value is refused
    "cluster.setup": frozenset({EMPTY, EMPTY_ITEM}),  # no setup lines; an empty line does nothing
    "gpu.name": REFUSED,
    "gpu.memory_gib": REFUSED,
    "gpu.bf16_tflops": REFUSED,
    "gpu.intra_node_gbps": REFUSED,
    "gpu.inter_node_gbps": REFUSED,
    "gpu.node_gpus": REFUSED,
    "plan.check": SWITCH,
    "plan.mfu": REFUSED,
    "plan.workspace_fraction": SWITCH,
    "plan.cuda_context_gib": SWITCH,
    "plan.source_mbps": REFUSED,
    "tracking": frozenset({EMPTY}),  # no tracker
    "tracker.dir": REFUSED,
    "tracker.project": REFUSED,
    "tracker.wandb_mode": REFUSED,
    "tracker.mlflow_uri": NONE_LIKE,  # a file store under tracker.dir
    "tracker.queue": REFUSED,
    "tracker.close_timeout_s": REFUSED,
    "profile.steps": frozenset({EMPTY}),  # no trace; steps count from 1
    "profile.ranks": frozenset({ZERO_ITEM}),  # rank 0
    "profile.memory": SWITCH,
    "profile.with_stack": SWITCH,
    "profile.record_shapes": SWITCH,
    "profile.memory_snapshot": SWITCH,
}
CURATE_ACCEPTS: dict[str, frozenset[str]] = {
    "input": REFUSED,
    "output": REFUSED,
    "shard": REFUSED,
    "workers": SWITCH,  # 0: the stages run in this process
    "launcher": REFUSED,
    "shards": REFUSED,
    "cluster": REFUSED,
    "cpus_per_shard": SWITCH,  # 0: workers + 1
    "gpus_per_shard": SWITCH,  # 0: CPU only
    "folder": REFUSED,
    "wait": SWITCH,
    "commit_every": REFUSED,
    "source": NONE_LIKE,  # the input URI
    "split": REFUSED,
    "cut_detector": REFUSED,
    "min_clip_s": REFUSED,
    "max_clip_s": REFUSED,  # null: clips are not split
    "max_video_s": REFUSED,
    "analysis_side": REFUSED,
    "clip_model": NONE_LIKE,
    "aesthetic_head": NONE_LIKE,
    "text_detector": NONE_LIKE,  # the built-in detector
    "captioner": NONE_LIKE,  # sidecar captions only
    "latents": SWITCH,
    "autoencoder": REFUSED,
    "autoencoder_path": REFUSED,  # "" would silently mean tiny random weights; null says so
    "latent_size": REFUSED,
    "latent_frames": REFUSED,
    "latent_fps": REFUSED,
    "cache_dir": REFUSED,
    "tag": NONE_LIKE,  # curate-<time>-<shard>
    "report": NONE_LIKE,  # curate instead of reporting
    "recipe": NONE_LIKE,
}


def settings_of(schema: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, type) of every leaf setting of a configuration dataclass, nested ones included."""
    hints = get_type_hints(schema)
    for f in fields(schema):
        kind = hints[f.name]
        if is_dataclass(kind):
            yield from settings_of(kind, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, kind


def probes(kind: Any, current: Any) -> dict[str, Any]:
    """The zero, negative and empty values of a type; for a list or dict, also its current value with one
    item replaced by (or extended with) each probe of the item type."""
    if get_origin(kind) in (Union, UnionType):
        (kind,) = [a for a in get_args(kind) if a is not type(None)]
    if kind is bool:
        return {ZERO: False}
    if kind in (int, float):
        return {ZERO: kind(0), NEGATIVE: kind(-1)}
    if kind is str:
        return {EMPTY: ""}
    item_kind = get_args(kind)[-1]
    if get_origin(kind) is list:
        rest = list(current or [])[1:]
        return {EMPTY: []} | {f"{name} item": [v, *rest] for name, v in probes(item_kind, None).items()}
    if get_origin(kind) is dict:
        extra = {f"{name} item": {"probe": v} for name, v in probes(item_kind, None).items()}
        return {EMPTY: {}} | {name: dict(current or {}) | v for name, v in extra.items()}
    raise TypeError(f"no probes for {kind}: decide how to check it")


def cases(schema: type, baseline: Any) -> list[Any]:
    return [
        pytest.param(key, name, value, id=f"{key}={name}")
        for key, kind in settings_of(schema)
        for name, value in probes(kind, setting(baseline, key)).items()
    ]


def with_setting(baseline: Any, key: str, value: Any) -> Any:
    cfg = copy.deepcopy(baseline)
    parent, _, leaf = key.rpartition(".")
    setattr(setting(cfg, parent) if parent else cfg, leaf, value)
    return cfg


def assert_decided(check: Callable[[], None], error: type[Exception], key: str, accepted: bool) -> None:
    """`check` passes when the value is accepted, else raises `error` with one line starting with `key`."""
    if accepted:
        check()
        return
    with pytest.raises(error) as refused:
        check()
    message = str(refused.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(key)}[=:. ]", message), message


RUN = compose([TABLE])
CURATE = CurateConfig(input="s3://bucket/raw/", output="s3://bucket/clips.lance")


@pytest.mark.parametrize(("schema", "decisions"), [(RunConfig, RUN_ACCEPTS), (CurateConfig, CURATE_ACCEPTS)])
def test_every_setting_has_a_decision(schema, decisions):
    assert [key for key, _ in settings_of(schema)] == list(decisions)


@pytest.mark.parametrize(("key", "probe", "value"), cases(RunConfig, RUN))
def test_a_run_setting_takes_zero_negative_or_empty_only_where_it_means_something(key, probe, value):
    cfg = with_setting(RUN, key, value)
    assert_decided(lambda: validate(cfg), ConfigError, key, probe in RUN_ACCEPTS[key])


@pytest.mark.parametrize(("key", "probe", "value"), cases(CurateConfig, CURATE))
def test_a_curation_setting_takes_zero_negative_or_empty_only_where_it_means_something(key, probe, value):
    cfg = with_setting(CURATE, key, value)
    assert_decided(cfg.validate, ValueError, key, probe in CURATE_ACCEPTS[key])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.ac_every=0", "parallel.ac_every=0 must be ≥ 1"),
        ("train.val_sigmas=[]", "train.val_sigmas=[] must be one or more noise levels, each > 0"),
        ("parallel.collective_timeout_s=0", "parallel.collective_timeout_s=0.0 must be > 0"),
        ("launcher.max_requeues=-1", "launcher.max_requeues=-1 must be ≥ 0"),
    ],
)
def test_settings_that_used_to_fail_hours_later_are_refused_from_the_command_line(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        compose(["model=tiny", TABLE, override])
