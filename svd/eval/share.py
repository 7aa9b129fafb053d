"""What one process of an evaluation does, wherever it runs: by hand (`jobs/evaluate.py`), as one of the tasks
of a Slurm job, or as a Ray task (svd/launch/evaluation.py). Its share of the shards follows from its rank and
the number of processes; whichever finishes the last shard merges, so the same code serves all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from svd.data.storage import Storage
from svd.eval.job import EvaluateSettings, Evaluation
from svd.eval.protocol import EvalProtocol
from svd.train.trained import RunError


@dataclass
class ShareResult:
    """What a process did: the steps it evaluated its share of, and the metrics of those it merged."""

    rank: int
    steps: list[int] = field(default_factory=list)
    merged: list[dict[str, Any]] = field(default_factory=list)
    folders: dict[int, str] = field(default_factory=dict)  # by step: where its results are


def open_evaluation(
    settings: EvaluateSettings,
    protocol: EvalProtocol,
    storage: Storage,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    say: Callable[[str], None] = print,
) -> Evaluation:
    """The evaluation of this process's share. A watch submitted together with the training may start before
    the run has written its configuration: it waits for it (every `poll_s`) instead of failing."""
    from svd.train.distributed import device_and_backend

    while True:
        try:
            return Evaluation(
                settings,
                protocol,
                storage,
                rank=rank,
                world_size=world_size,
                device=device_and_backend(local_rank)[0],
            )
        except RunError as e:
            if not (settings.watch and "no config.yaml" in str(e)):
                raise
            say(f"watch: waiting for the run to start ({e})")
            time.sleep(settings.poll_s)


def evaluate_share(
    settings: EvaluateSettings,
    protocol: EvalProtocol,
    *,
    rank: int,
    world_size: int,
    local_rank: int = 0,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> ShareResult:
    """This process's share of the chosen checkpoint (merged here if it finished last), or with `watch`, of
    every checkpoint of the run until its last step."""
    evaluation = open_evaluation(
        settings,
        protocol,
        Storage.from_env(),
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        say=say,
    )
    result = ShareResult(rank)
    if settings.watch:
        from svd.eval.watch import watch

        merged = watch(evaluation, poll_s=settings.poll_s, metrics_port=settings.metrics_port, say=say)
        result.steps = merged
        result.merged = [evaluation.metrics(step) for step in merged]
    else:
        step = evaluation.step()
        metrics = evaluation.evaluate(step, progress=progress)
        result.steps = [step]
        result.merged = [metrics] if metrics is not None else []
    result.folders = {step: evaluation.folder(step) for step in result.steps}
    return result
