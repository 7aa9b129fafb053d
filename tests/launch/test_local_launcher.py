"""The local launcher's report of a failed multi-rank run: the first failing rank's own error, in one line.
(Its processes are tested in tests/train/test_trainer.py and tests/faults/test_interrupted_runs.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

from svd.launch.local import first_failure


def raised(reports: Path, rank: int, error: Exception, monkeypatch) -> str:
    """Rank `rank` raised `error`: torch's error file, written as the ranks' `record` wrapper writes it."""
    path = reports / "svd-run" / "attempt_0" / str(rank) / "error.json"
    path.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        raise error
    except type(error) as e:
        ErrorHandler().record_exception(e)
    time.sleep(0.01)  # file times in order, whatever the file system's clock resolution
    return str(path)


class CheckpointError(Exception):
    pass


def test_the_rank_that_raised_first_is_named_not_the_one_torch_noticed_first(tmp_path, monkeypatch):
    raised(
        tmp_path, 1, CheckpointError("s3://b/run/checkpoints/step-4 is incomplete\nmore detail"), monkeypatch
    )
    noticed = raised(tmp_path, 0, RuntimeError("Connection closed by peer [127.0.0.1]:1234"), monkeypatch)
    error = ChildFailedError("_rank_main", {0: ProcessFailure(0, os.getpid(), 1, noticed)})
    assert first_failure(error, tmp_path) == (
        "rank 1 (and 1 more): CheckpointError: s3://b/run/checkpoints/step-4 is incomplete"
    )


@pytest.mark.parametrize(("exitcode", "how"), [(-9, "killed by SIGKILL"), (3, "exit status 3")])
def test_a_rank_that_died_without_an_error_is_the_cause_of_the_others_errors(
    tmp_path, monkeypatch, exitcode, how
):
    raised(tmp_path, 0, RuntimeError("Connection closed by peer [127.0.0.1]:1234"), monkeypatch)
    error = ChildFailedError("_rank_main", {1: ProcessFailure(1, os.getpid(), exitcode, "<N/A>")})
    assert first_failure(error, tmp_path) == f"rank 1 (and 1 more): {how}"
