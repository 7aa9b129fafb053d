"""Every stage of the paper trains through `jobs/launch.py … launcher=local`, each starting from the one
before it (`stage.init_from`), and the results export for inference."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
launch = runpy.run_path(str(ROOT / "jobs" / "launch.py"), run_name="launch")["main"]
export = runpy.run_path(str(ROOT / "jobs" / "export.py"), run_name="export")["main"]


def run_stage(train_table: dict, stage: str, *extra: str, run: str = "") -> str:
    run_dir = f"{train_table['bucket']}/stages/{run or stage}"
    # What the launch sets for the processes it starts, restored after it: in a test session they were
    # handed to every later launcher (its ranks started with another launch's warning flags)
    scoped = ("PYTHONWARNINGS", "OMP_NUM_THREADS", "SVD_RUN_OWNER")
    before = {name: os.environ.get(name) for name in scoped}
    code = launch(
        [
            f"stage={stage}",
            "model=tiny",
            "launcher=local",
            "nodes=1",
            "gpus_per_node=1",
            f"data.table={train_table['table']}",
            f"checkpoint.run_dir={run_dir}",
            "train.steps=2",
            "train.global_batch=2",
            "data.fps=4",
            *extra,
        ]
    )
    assert code == 0
    assert {name: os.environ.get(name) for name in scoped} == before
    return run_dir


@pytest.mark.slow
def test_every_stage_trains_from_the_previous_one_and_exports(
    train_table, s3_env, moto_s3, tiny_clip_encoder, tmp_path, capsys
):
    text, image = f"model.text_encoder={tiny_clip_encoder}", f"model.image_encoder={tiny_clip_encoder}"
    images = run_stage(train_table, "image_pretrain", text)
    video = run_stage(train_table, "video_pretrain", text, "data.frames=4", f"stage.init_from={images}")
    assert "added (fresh init)" in capsys.readouterr().out  # the temporal layers joined the image model
    hr = run_stage(train_table, "video_pretrain_hr", text, "data.frames=4", f"stage.init_from={video}")
    run_stage(train_table, "video_finetune_hq", text, "data.frames=4", f"stage.init_from={hr}")
    i2v = run_stage(train_table, "i2v_finetune", image, "data.frames=4", f"stage.init_from={hr}")
    out = capsys.readouterr().out
    assert "1 reshaped" in out
    assert "network.conv_in.weight" in out  # 12 → 24 input channels
    run_stage(train_table, "interpolation", text, "data.frames=5", f"stage.init_from={hr}")
    lora = run_stage(train_table, "camera_lora", image, "data.frames=4", f"stage.init_from={i2v}")
    run_stage(train_table, "multiview", image, "data.frames=4")

    assert export([f"run={i2v}", f"out={tmp_path / 'unet'}"]) == 0
    from diffusers import UNetSpatioTemporalConditionModel

    unet = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet")
    assert unet.config.in_channels == 24
    assert unet.config.cross_attention_dim == 32

    assert export([f"run={lora}", f"out={tmp_path / 'zoom.safetensors'}", "format=lora"]) == 0
    from safetensors.torch import load_file

    adapters = load_file(tmp_path / "zoom.safetensors")
    assert adapters
    assert all(".lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_b" in k)  # the adapters trained
    assert_only_the_adapters_trained(i2v, lora, moto_s3)


def assert_only_the_adapters_trained(base: str, lora: str, moto_s3) -> None:
    """The camera-motion LoRA run trained (and averaged) its adapters only; the base's weights are as the
    base run left them, and the run wrote the adapters on their own beside its checkpoint."""
    from safetensors.torch import load

    from svd.train.checkpoint import read_full_state

    before = read_full_state(base, "ema.weights")
    model = read_full_state(lora, "model.model")
    ema = read_full_state(lora, "ema.weights")
    assert ema
    assert all(".lora_" in k for k in ema)
    fs, path = moto_s3.storage.fsspec(f"{lora}/lora.safetensors")
    saved = load(fs.cat_file(path))
    assert set(saved) == {k.removeprefix("network.") for k in ema}
    frozen = [k for k in before if "temporal_blocks" in k and "attn.to_q.weight" in k]
    assert frozen
    assert all(torch.equal(model[k], before[k]) for k in frozen)


@pytest.mark.slow
def test_an_exported_image_to_video_unet_runs_in_stable_video_diffusion_pipeline(
    train_table, s3_env, tiny_clip_encoder, tmp_path, capsys
):
    from diffusers import (
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from svd.model.autoencoder import AutoencoderConfig, build_autoencoder

    i2v = run_stage(
        train_table,
        "i2v_finetune",
        "model.autoencoder=kl_temporal",  # the released latent layout: 4 channels (+4 conditioning)
        f"model.image_encoder={tiny_clip_encoder}",
        "data.frames=4",
        "train.preview_every=2",
        run="released-layout",
    )
    assert export([f"run={i2v}", f"out={tmp_path / 'unet'}"]) == 0
    unet = UNetSpatioTemporalConditionModel.from_pretrained(tmp_path / "unet")
    assert unet.config.in_channels == 8
    pipe = StableVideoDiffusionPipeline(
        vae=build_autoencoder(AutoencoderConfig(kind="kl_temporal")).vae,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(tiny_clip_encoder),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
    )
    image = Image.new("RGB", (16, 16), (200, 80, 40))
    frames = pipe(
        image, height=16, width=16, num_frames=4, num_inference_steps=2, decode_chunk_size=4, output_type="np"
    ).frames
    assert frames.shape == (1, 4, 16, 16, 3)

    # and the released layout comes back in as a stage's starting point
    capsys.readouterr()
    run_stage(
        train_table,
        "i2v_finetune",
        "model.autoencoder=kl_temporal",
        "data.frames=4",
        f"stage.init_from={tmp_path / 'unet'}",
        run="from-diffusers",
    )
    assert "0 reshaped, 0 added (fresh init), 0 dropped" in capsys.readouterr().out
