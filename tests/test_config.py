"""The run configuration: composition of the stage groups, and one-line errors before anything starts."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from svd.config import ConfigError, compose, from_yaml, options, to_yaml

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
