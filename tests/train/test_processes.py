"""A rank's child processes (its loader's workers, which ignore SIGTERM) end before the rank does."""

from __future__ import annotations

import multiprocessing
import signal
import time
import weakref

import pytest

from svd.train.processes import children_ended


def _stuck_worker(ready) -> None:
    """A loader worker that missed its shutdown: it ignores SIGTERM, waits for an index that never comes."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(600)


def test_a_child_that_ignores_sigterm_and_never_leaves_is_ended_with_the_block():
    """Before: Python's exit terminated it (ignored) and joined it forever; the rank never exited."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    left_alone = ctx.Process(target=time.sleep, args=(600,), daemon=True)
    left_alone.start()  # started before the block: not the block's to end
    try:
        with children_ended(patience_s=1.0):
            stuck = ctx.Process(target=_stuck_worker, args=(ready,), daemon=True)
            stuck.start()
            assert ready.wait(timeout=120)
            stuck.terminate()  # what torch's shutdown and Python's exit do: no effect
            stuck.join(timeout=1.0)
            assert stuck.is_alive()
        assert not stuck.is_alive()
        assert left_alone.is_alive()
    finally:
        left_alone.kill()
        left_alone.join()


class LoaderIterator:
    """Stands for the loader's iterator, whose release shuts its workers down."""


def test_a_failure_lets_go_of_the_frames_that_hold_the_loaders_iterator():
    held = []

    def fit() -> None:
        batches = LoaderIterator()
        held.append(weakref.ref(batches))
        raise RuntimeError("a rank's error")

    with pytest.raises(RuntimeError, match="a rank's error") as raised, children_ended():
        fit()
    assert raised.value.__traceback__ is not None  # the error keeps its traceback (file, line, function)
    assert held[0]() is None  # but not the locals of its frames
