"""The processes a rank starts (its loader's workers) end before the rank does.

Loader workers ignore SIGTERM (a scheduler signals every process of a job, and the stop is the rank's to
handle: svd.data.loader), so `Process.terminate()` no longer ends one. Two shutdowns rely on it: torch's, for
a worker slow to take its last index (it waits 5 s, then terminates it), and Python's exit (terminate every
daemonic child, then join it; torch's own shutdown does nothing once the interpreter is exiting). A worker
that missed its shutdown then kept its rank from ever exiting (seen on a loaded machine). So the rank ends
them itself while it still runs.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def children_ended(patience_s: float = 10.0) -> Iterator[None]:
    """Child processes started in the block and still running when it ends are given `patience_s` to leave
    (a worker leaves once it has its last index), then killed. When the block raises, its traceback first
    lets go of the frames that hold the loader's iterator, whose release shuts its workers down."""
    before = set(multiprocessing.active_children())
    try:
        yield
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        deadline = time.monotonic() + patience_s
        for child in set(multiprocessing.active_children()) - before:
            child.join(timeout=max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()
