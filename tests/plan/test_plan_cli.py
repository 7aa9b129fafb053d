"""jobs/plan.py (table, --json, --scaling-doc), the GPU catalogue, launch.py's refusal of a job that cannot
fit, bench/gpu.py without a GPU, and the committed docs/scaling.md against what the planner generates."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svd.config import ConfigError, compose, options
from svd.launch.plan import GIB, cost_of, plan, trainable_parameters
from svd.launch.plan_report import SCALING_DOC_COMMAND, scaling_doc, summary
from svd.model.lora import apply_lora
from svd.model.video_unet import VideoUNet
from svd.train.task import unet_config

ROOT = Path(__file__).resolve().parents[2]


def _main(script: str):
    return runpy.run_path(str(ROOT / script), run_name="not_main")["main"]


def _plan(*args: str):
    return plan(compose(["data.table=unread", *args]))


def test_table_shows_every_memory_term_the_peak_and_the_days(capsys):
    assert _main("jobs/plan.py")(["stage=video_pretrain", "nodes=32"]) == 0
    out = capsys.readouterr().out
    assert "32 node(s) × 8 h100-80gb; sharding hsdp (shards over 8)" in out
    for label in (
        "parameters (fp32 shards)",
        "AdamW moments",
        "EMA",
        "activations",
        "frozen encoders",
        "allowance",
    ):
        assert label in out
    assert "of 79.6 GiB: fits" in out
    assert "150,000 steps:" in out
    assert "days" in out
    assert "MB/s read per node" in out


def test_json_is_the_same_plan_machine_readable(capsys):
    assert _main("jobs/plan.py")(["stage=video_pretrain", "nodes=32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = _plan("stage=video_pretrain", "nodes=32", "gpus_per_node=8")
    assert data["fits"] is True
    assert (data["nodes"], data["gpus_per_node"], data["sharding"]) == (32, 8, "hsdp")
    assert data["memory"]["peak"] == pytest.approx(expected.memory.peak)
    terms = {k: v for k, v in data["memory"].items() if k != "peak"}
    working = max(
        terms["activations"] + terms["backward_extra"], terms["optimizer_step"], terms["encode_work"]
    )
    held = sum(v for k, v in terms.items() if k not in ("activations", "backward_extra", "optimizer_step"))
    assert data["memory"]["peak"] == pytest.approx(held - terms["encode_work"] + working)
    assert data["samples_per_second"] * data["step_seconds"] == pytest.approx(1536)
    assert data["days"] == pytest.approx(150_000 * data["step_seconds"] / 86400)


def test_blocks_list_every_block_pair_with_its_share(capsys):
    assert _main("jobs/plan.py")(["stage=video_pretrain", "nodes=32", "--blocks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = lines[next(i for i, line in enumerate(lines) if "params (M)" in line) + 1 :]
    names = [row.split()[0] for row in rows]
    assert names[0] == "embed"
    assert names[-1] == "out"
    assert "mid.attn.0" in names
    assert sum(float(row.split()[1]) for row in rows) == pytest.approx(1524.6, abs=0.2)


def test_a_plan_that_does_not_fit_exits_1_and_a_bad_key_2(capsys):
    main = _main("jobs/plan.py")
    assert main(["stage=video_finetune_hq", "gpu=a100-40gb", "nodes=1", "data.micro_batch=8"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["stage=video_pretrain", "gpu=h300"]) == 2
    assert "gpu='h300' is not an option" in capsys.readouterr().err


def test_catalogue_gpus_change_the_limit_and_the_time():
    kinds = options("gpu")
    assert kinds == ["a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb"]
    plans = {k: _plan("stage=video_pretrain_hr", f"gpu={k}", "nodes=4", "gpus_per_node=8") for k in kinds}
    assert (
        plans["h200-141gb"].memory_limit > plans["h100-80gb"].memory_limit > plans["a100-40gb"].memory_limit
    )
    # same work, 989 vs 312 TFLOP/s
    assert plans["a100-80gb"].step_seconds / plans["h100-80gb"].step_seconds == pytest.approx(
        989 / 312, rel=0.01
    )
    assert plans["a100-80gb"].memory.peak == pytest.approx(plans["h100-80gb"].memory.peak)
    with pytest.raises(ConfigError, match=r"gpu\.memory_gib=0"):
        compose(["data.table=unread", "gpu.memory_gib=0"])


def test_sharding_over_more_ranks_divides_the_states_and_hsdp_keeps_them_per_node():
    fsdp = [_plan("parallel.sharding=fsdp", f"nodes={n}", "gpus_per_node=8") for n in (1, 4)]
    assert fsdp[1].memory.optimizer == pytest.approx(fsdp[0].memory.optimizer / 4)
    hsdp = _plan("parallel.sharding=hsdp", "nodes=4", "gpus_per_node=8")
    assert hsdp.memory.optimizer == pytest.approx(fsdp[0].memory.optimizer)
    # AdamW's two fp32 moments of 1525M parameters over 8 ranks
    assert fsdp[0].memory.optimizer == pytest.approx(2 * 4 * fsdp[0].parameters / 8)


def test_checkpointing_shrinks_activations_and_costs_a_forward_of_the_blocks():
    none = _plan("stage=video_pretrain_hr", "nodes=4", "gpus_per_node=8")
    full = _plan(
        "stage=video_pretrain_hr", "nodes=4", "gpus_per_node=8", "parallel.activation_checkpointing=full"
    )
    assert full.memory.activations < 0.1 * none.memory.activations
    assert full.flops["recompute"] == pytest.approx(0.95 * full.flops["forward"], rel=0.05)
    assert full.step_seconds > none.step_seconds
    assert full.max_micro_batch > none.max_micro_batch


def test_largest_micro_batch_is_the_last_that_fits():
    p = _plan("stage=video_pretrain_hr", "nodes=4", "gpus_per_node=8")
    assert p.max_micro_batch >= 1
    fits = _plan(
        "stage=video_pretrain_hr", "nodes=4", "gpus_per_node=8", f"data.micro_batch={p.max_micro_batch}"
    )
    assert fits.fits
    too_many = compose(["data.table=unread", "stage=video_pretrain_hr", "nodes=4", "gpus_per_node=8"])
    too_many.data.micro_batch = p.max_micro_batch + 1  # the global batch need not divide for the plan
    assert not plan(too_many).fits


def test_launch_refuses_a_gpu_job_that_cannot_fit_naming_the_term_and_the_fix(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "jobs/launch.py",
            "stage=video_finetune_hq",
            "gpu=a100-40gb",
            "nodes=1",
            "gpus_per_node=8",
            "data.micro_batch=8",
            "launcher=slurm",
            f"data.table={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    message = out.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "peak" in message
    assert "> 40.0 GiB of a100-40gb" in message
    assert "the largest term is activations (saved for backward)" in message
    assert "parallel.activation_checkpointing=full data.micro_batch=" in message
    assert "plan.check=false" in message


def test_the_admitted_plan_is_summarised_in_one_line():
    p = _plan("stage=video_pretrain", "nodes=32", "gpus_per_node=8")
    line = summary(p)
    assert "\n" not in line
    assert line.startswith(f"plan: peak {p.memory.peak / GIB:.1f} of 79.6 GiB per h100-80gb, ")
    assert f"{p.days:.2f} days for 150,000 steps" in line


def test_launch_checks_gpu_jobs_only_and_can_be_told_not_to():
    runs_on_gpus = runpy.run_path(str(ROOT / "jobs" / "launch.py"), run_name="not_main")["runs_on_gpus"]
    assert runs_on_gpus(compose(["data.table=unread", "launcher=slurm"]))
    assert not runs_on_gpus(compose(["data.table=unread", "launcher=slurm", "cluster.gpus=false"]))
    assert not compose(["data.table=unread", "plan.check=false"]).plan.check


def test_bench_gpu_refuses_without_cuda_and_compares_measured_with_planned():
    out = subprocess.run(
        [sys.executable, "bench/gpu.py", "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "CUDA GPU" in out.stderr
    bench = runpy.run_path(str(ROOT / "bench" / "gpu.py"), run_name="not_main")
    assert bench["gpu_kind"]("NVIDIA H100 80GB HBM3") == "h100-80gb"
    assert bench["gpu_kind"]("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    p = bench["planned"]("h100-80gb")
    assert (p.frames, p.height, p.width, p.latent) == (14, 320, 576, (192, 40, 72))
    assert (p.compute_dtype, p.activation_checkpointing, p.sharding) == ("bf16", "full", "fsdp")
    executed = p.flops["forward"] + p.flops["backward"] + p.flops["recompute"]
    measured = bench["Measured"](
        step_seconds=2 * p.step_seconds,
        peak_allocated=p.memory.peak - p.memory.workspace,
        peak_reserved=p.memory.peak,
        flops_per_sample=executed,
        peak_flops=989e12,
    )
    rows = {name: got / want for name, got, want in bench["comparison"](p, measured)}
    assert rows["step time (s)"] == pytest.approx(2.0)
    assert rows["utilisation (MFU as the trainer counts it)"] == pytest.approx(0.5)
    assert rows["peak reserved (GiB) vs plan with allowance"] == pytest.approx(1.0)
    assert "ratio" in bench["format_comparison"](bench["comparison"](p, measured))


def test_paper_stages_fit_32_nodes_of_h100():
    p = _plan("stage=video_pretrain", "nodes=32", "gpus_per_node=8")
    assert p.fits
    assert p.memory.peak < 40 * GIB
    assert p.parameters == pytest.approx(1521e6, rel=0.01)  # the paper's 1521M


def test_committed_scaling_doc_is_what_the_planner_generates():
    committed = (ROOT / "docs" / "scaling.md").read_text()
    assert committed == scaling_doc(), (
        f"docs/scaling.md is out of date: regenerate it with {SCALING_DOC_COMMAND}"
    )


@pytest.mark.parametrize(("stage", "extra"), [("camera_lora", ["stage.lora_rank=4"]), ("image_pretrain", [])])
def test_trainable_parameters_are_those_the_trainer_trains(stage, extra):
    """LoRA adapters of the temporal attention; in Stage I everything but the temporal layers."""
    cfg = compose(["data.table=unread", f"stage={stage}", "model=tiny", *extra])
    with torch.device("meta"):
        model = VideoUNet(unet_config(cfg, latent_channels=12))
    if stage == "camera_lora":
        apply_lora(model, rank=4)
    else:
        for _, p in model.temporal_parameters():
            p.requires_grad_(False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameters(cfg, cost_of(cfg)) == trained
