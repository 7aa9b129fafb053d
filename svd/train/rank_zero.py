"""Decisions that rank 0 takes for the whole run, such as whether the run may start in its run directory.

Rank 0 reads the store once and decides; every rank gets the answer — or the error — from one broadcast, so
all ranks go on together or raise the same one-line error together, and none is left waiting for the others
in a later collective. Without a process group (a tool, a test) the caller is rank 0.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


def decide_on_rank_zero(decide: Callable[[], T] | None) -> T:
    """`decide()` on rank 0 (the other ranks pass None or anything: it is not called there); every rank
    returns its result or raises its exception. The broadcast is a collective: call it on every rank."""
    if not _distributed():
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, decide())
        except Exception as e:
            dist.broadcast_object_list([(False, _portable(e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    succeeded, value = box[0]
    if not succeeded:
        raise value
    return value


def _portable(error: Exception) -> Exception:
    """The error as the other ranks can unpickle it (a storage client's error may carry what cannot)."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
