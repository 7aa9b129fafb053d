"""A torch.profiler trace of chosen steps, and CUDA memory snapshots: what an engineer asks for first when a
step is slow or memory runs out.

    profiler = StepProfiler(cfg.profile, env, files)
    with profiler.step(n):        # every step; outside profile.steps (or off this rank) it does nothing
        ... train step n ...
        profiler.observe(step_seconds, data_wait_seconds)
    profiler.close()              # a window the run did not reach the end of is written as it stands

`profile.steps=[a, b]` traces steps a..b (each inside a `train_step_<n>` range) on `profile.ranks` and writes
`<run_dir>/profiles/rank<r>.steps-<a>-<b>.pt.trace.json`: a Chrome trace (chrome://tracing, Perfetto) whose
name is also the TensorBoard profiler plugin's format, so `tensorboard --logdir` on a copy of the folder shows
it. Beside it, `….top.txt`: the operators that took the most time; the profiled rank prints them with the
share of the window's step time spent waiting for data.

`profile.memory_snapshot=true` on CUDA records the allocator's history from the start, writes a snapshot
(`….memory.pickle`, for https://pytorch.org/memory_viz) at the end of the window and on out-of-memory; on a
CPU rank it says once that it needs CUDA.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from svd.config import ProfileConfig, RunConfig, validate
from svd.train.distributed import DistEnv
from svd.train.run_files import RunFiles

# `jobs/launch.py --profile` traces these steps unless profile.steps says otherwise: not the first, which pays
# for warm-up (the loader's workers starting, first allocations, FSDP's lazy initialisation)
CHECK_STEPS = (2, 4)
TOP_OPERATORS = 15
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept (a ring): the last ones before an OOM


class StepProfiler:
    def __init__(
        self, cfg: ProfileConfig, env: DistEnv, files: RunFiles, write: Callable[[str], None] = print
    ):
        self.cfg, self.env, self.files, self.write = cfg, env, files, write
        here = env.rank in cfg.ranks
        self.window: tuple[int, int] | None = (cfg.steps[0], cfg.steps[1]) if cfg.steps and here else None
        self._profile: torch.profiler.profile | None = None
        self._seconds = self._wait = 0.0
        self._last = 0
        self.snapshots = cfg.memory_snapshot and here and env.device.type == "cuda"
        if cfg.memory_snapshot and here and not self.snapshots:
            write(
                f"profile.memory_snapshot=true needs CUDA; rank {env.rank} runs on {env.device}: no snapshot"
            )
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            yield
            return
        if self._profile is None:
            self._start()
        with torch.profiler.record_function(f"train_step_{step}"):
            yield
        self._last = step
        if step == self.window[1]:
            self._finish()

    def observe(self, step_seconds: float, data_wait_seconds: float) -> None:
        """A step's time and its wait for batches (called inside `step`): the window's data-wait share."""
        if self._profile is not None:
            self._seconds += step_seconds
            self._wait += data_wait_seconds

    def close(self) -> None:
        if self._profile is not None:
            self._finish()

    def memory_snapshot(self, name: str) -> str | None:
        """Write the allocator's recorded history as `profiles/rank<r>.<name>.memory.pickle`; its URI."""
        if not self.snapshots:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "snapshot.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            return self._write(f"{name}.memory.pickle", path.read_bytes())

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.env.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(
            activities=activities,
            record_shapes=self.cfg.record_shapes,
            profile_memory=self.cfg.memory,
            with_stack=self.cfg.with_stack,
        )
        self._profile.start()

    def _finish(self) -> None:
        profile, self._profile = self._profile, None
        if profile is None or self.window is None:
            return
        profile.stop()
        first, last = self.window[0], self._last
        name = f"steps-{first}-{last}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            profile.export_chrome_trace(str(path))
            uri = self._write(f"{name}.pt.trace.json", path.read_bytes())
        sort = "self_cuda_time_total" if self.env.device.type == "cuda" else "self_cpu_time_total"
        top = profile.key_averages().table(sort_by=sort, row_limit=TOP_OPERATORS)
        self._write(f"{name}.top.txt", top)
        snapshot = self.memory_snapshot(name)
        share = self._wait / self._seconds if self._seconds else 0.0
        lines = [
            f"profile of steps {first}-{last} on rank {self.env.rank}: {uri}",
            f"data wait: {share:.1%} of the step time ({self._wait:.3f} s of {self._seconds:.3f} s)",
        ]
        if snapshot:
            lines.append(f"memory snapshot: {snapshot}")
        self.write("\n".join([*lines, f"top operators ({sort}):", top]))

    def _write(self, name: str, data: str | bytes) -> str:
        relative = f"profiles/rank{self.env.rank:03d}.{name}"
        self.files.write(relative, data)
        return self.files.uri(relative)


def profile_check(cfg: RunConfig) -> RunConfig:
    """What `jobs/launch.py --profile` runs: the configured job for a few steps, traced, in a run directory of
    its own (`<run_dir>-profile-<time>`: the job's own run is neither resumed nor written), untracked."""
    first, last = cfg.profile.steps or CHECK_STEPS
    run_dir = f"{cfg.checkpoint.run_dir.rstrip('/')}-profile-{time.strftime('%Y%m%d-%H%M%S')}"
    checked = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, steps=last),
        checkpoint=dataclasses.replace(cfg.checkpoint, run_dir=run_dir),
        profile=dataclasses.replace(cfg.profile, steps=[first, last]),
        tracking=[],
    )
    validate(checked)
    return checked
