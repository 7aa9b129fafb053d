"""The step profiler on CPU without a training run: a trace of the chosen steps only, nothing when off, and
the settings that need CUDA say so in one line; NCCL's flight recorder is set where NCCL is the backend."""

from __future__ import annotations

import json

import torch

from svd.config import ProfileConfig, compose
from svd.data.storage import Storage
from svd.train.distributed import NCCL_FLIGHT_RECORDER, DistEnv, nccl_flight_recorder_env
from svd.train.profiling import StepProfiler, profile_check
from svd.train.run_files import RunFiles

CPU = DistEnv(
    rank=1, world_size=2, local_rank=1, local_world_size=2, device=torch.device("cpu"), backend="gloo"
)


def train(profiler: StepProfiler, steps: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    for step in range(1, steps + 1):
        with profiler.step(step):
            model(torch.randn(4, 8)).sum().backward()
            profiler.observe(step_seconds=0.5, data_wait_seconds=0.1)
    profiler.close()


def test_a_profile_traces_the_chosen_steps_only_names_the_operators_and_the_data_wait_share(tmp_path):
    lines: list[str] = []
    profiler = StepProfiler(
        ProfileConfig(steps=[2, 3], ranks=[1]), CPU, RunFiles(str(tmp_path), Storage()), lines.append
    )
    train(profiler, steps=5)

    trace = json.loads((tmp_path / "profiles" / "rank001.steps-2-3.pt.trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"train_step_2", "train_step_3", "aten::linear", "aten::gelu"} <= names
    assert not {"train_step_1", "train_step_4", "train_step_5"} & names
    assert "aten::" in (tmp_path / "profiles" / "rank001.steps-2-3.top.txt").read_text()
    (printed,) = lines
    assert "data wait: 20.0% of the step time (0.200 s of 1.000 s)" in printed
    assert "aten::" in printed


def test_off_or_on_another_rank_nothing_is_traced_or_written(tmp_path):
    for cfg in (ProfileConfig(), ProfileConfig(steps=[1, 2], ranks=[0])):
        profiler = StepProfiler(cfg, CPU, RunFiles(str(tmp_path), Storage()), print)
        assert profiler.window is None
        train(profiler, steps=2)
    assert not (tmp_path / "profiles").exists()


def test_a_memory_snapshot_on_cpu_says_in_one_line_that_it_needs_cuda(tmp_path):
    lines: list[str] = []
    StepProfiler(
        ProfileConfig(memory_snapshot=True, ranks=[1]), CPU, RunFiles(str(tmp_path), Storage()), lines.append
    )
    assert lines == ["profile.memory_snapshot=true needs CUDA; rank 1 runs on cpu: no snapshot"]


def test_the_flight_recorder_is_set_for_nccl_only_and_never_over_the_jobs_own_settings():
    assert nccl_flight_recorder_env("nccl", {}) == NCCL_FLIGHT_RECORDER
    assert nccl_flight_recorder_env("nccl", {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"}) == {
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"
    }
    assert nccl_flight_recorder_env("gloo", {}) == {}


def test_launch_profile_runs_a_few_traced_untracked_steps_in_a_run_directory_of_its_own():
    cfg = compose(["data.table=s3://b/clips.lance", "checkpoint.run_dir=s3://b/runs/r1", "tracking=[wandb]"])
    checked = profile_check(cfg)
    assert (checked.steps, checked.profile.steps, checked.tracking) == (4, [2, 4], [])
    assert checked.checkpoint.run_dir.startswith("s3://b/runs/r1-profile-")
    chosen = profile_check(compose(["data.table=s3://b/clips.lance", "profile.steps=[5,6]"]))
    assert (chosen.steps, chosen.profile.steps) == (6, [5, 6])
