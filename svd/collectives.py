"""Decisions that one rank takes for all: rank 0 reads a source once (a table version, a row index, a
checkpoint folder, a diffusers model, the run directory's lease) and every rank gets its value, or its error.

The error matters as much as the value: a rank 0 that fails and simply raises leaves every other rank
waiting in the broadcast until the collective timeout (30 minutes by default), and then the job's log
names the timeout, not the cause. Here every rank raises at once: rank 0's own exception, or the error
the caller builds from rank 0's in one line.

    version = decided_by_rank0(
        lambda: open_table(uri).version,
        failed=lambda cause: LoaderError(f"rank 0 could not open {uri}: {cause}"),
    )
    decided_by_rank0(lease.acquire if is_rank0() else None)   # every rank raises rank 0's error itself
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from svd.errors import described

T = TypeVar("T")


def is_rank0() -> bool:
    """Rank 0 of the job; the one process when there is no process group (a tool, a test)."""
    return not _distributed() or dist.get_rank() == 0


def decided_by_rank0(
    decide: Callable[[], T] | None,
    *,
    failed: Callable[[str], Exception] | None = None,
    group: dist.ProcessGroup | None = None,
) -> T:
    """`decide()` on rank 0 only (the other ranks may pass None); every rank returns its value. When it
    raises, rank 0 re-raises its own exception, and every other rank raises `failed(<rank 0's error in one
    line>)`, or without `failed` rank 0's exception itself (as a RuntimeError naming it when it cannot be
    sent). A collective: every rank of `group` calls it."""
    if not _distributed():
        return decide()
    message: list[Any] = [None, None, None]  # [value, error in one line, the error to raise]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            message[0] = decide()
        except Exception as e:  # handed to the other ranks, then raised here as it is
            error, message[1] = e, described(e)
            message[2] = None if failed else _portable(e)
    dist.broadcast_object_list(message, src=0, group=group)
    if error is not None:
        raise error
    if message[1] is not None:
        raise failed(message[1]) if failed else message[2]
    return message[0]


def _portable(error: Exception) -> Exception:
    """The error as the other ranks can unpickle it (a storage client's error may carry what cannot)."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(described(error))
    return error


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
