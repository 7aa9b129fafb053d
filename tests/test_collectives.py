"""Rank 0 decides, every rank learns the value or the error: two real gloo ranks."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

import pytest
import torch.distributed as dist

from svd.collectives import decided_by_rank0
from svd.data.local_s3 import free_port

# The ranks are forked from pytest, which has imported Lance; they never use it.
pytestmark = pytest.mark.filterwarnings("ignore:lance is not fork-safe")

# Far beyond the test's own bound: a rank that waited for a failed rank 0 would hang the test, not pass it.
COLLECTIVE_TIMEOUT_S = 900


class RefusedError(RuntimeError):
    pass


def _rank(rank: int, port: int, fail: bool, results) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    calls = []

    def decide() -> int:
        calls.append(rank)
        if fail:
            raise ValueError("the table\nat s3://b/t.lance, /src/lance/dataset.rs:12:3 does not exist")
        return 7

    try:
        outcome = ("value", decided_by_rank0(decide, failed=lambda cause: RefusedError(f"rank 0: {cause}")))
    except Exception as e:  # what this rank raised
        outcome = (type(e).__name__, str(e))
    results.put((rank, outcome, calls))
    dist.destroy_process_group()


def _run(fail: bool) -> dict[int, tuple]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, fail, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        got = [results.get(timeout=120) for _ in ranks]
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return {rank: (outcome, calls) for rank, outcome, calls in got}


def test_every_rank_gets_the_value_that_rank_0_alone_computed():
    assert _run(fail=False) == {0: (("value", 7), [0]), 1: (("value", 7), [])}


def test_a_failing_rank_0_fails_every_rank_at_once_in_one_line_instead_of_leaving_them_waiting():
    got = _run(fail=True)
    assert got[0] == (
        ("ValueError", "the table\nat s3://b/t.lance, /src/lance/dataset.rs:12:3 does not exist"),
        [0],
    )
    assert got[1] == (("RefusedError", "rank 0: ValueError: the table at s3://b/t.lance does not exist"), [])


def test_without_a_process_group_it_is_a_plain_call():
    assert not dist.is_initialized()
    assert decided_by_rank0(lambda: "v", failed=RefusedError) == "v"
    with pytest.raises(ValueError, match="own"):
        decided_by_rank0(lambda: (_ for _ in ()).throw(ValueError("own")), failed=RefusedError)
