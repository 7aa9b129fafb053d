"""Decisions that one rank takes for all: rank 0 reads a source once (a table version, a row index, a
checkpoint folder, a diffusers model) and every rank gets its value, or its error.

The error matters as much as the value: a rank 0 that fails and simply raises leaves every other rank
waiting in the broadcast until the collective timeout (30 minutes by default), and then the job's log
names the timeout, not the cause. Here the other ranks raise at once, in one line naming rank 0's error.

    version = decided_by_rank0(
        lambda: open_table(uri).version,
        failed=lambda cause: LoaderError(f"rank 0 could not open {uri}: {cause}"),
    )
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from svd.errors import one_line

T = TypeVar("T")


def decided_by_rank0(
    decide: Callable[[], T],
    *,
    failed: Callable[[str], Exception],
    group: dist.ProcessGroup | None = None,
) -> T:
    """`decide()` on rank 0 only (on the one process when there is no process group); every rank returns
    its value. When it raises, rank 0 re-raises its own exception and every other rank raises
    `failed(<rank 0's error in one line>)`. A collective: every rank of `group` calls it."""
    if not (dist.is_available() and dist.is_initialized()):
        return decide()
    message: list[Any] = [None, None]  # [value, error line]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            message[0] = decide()
        except Exception as e:  # handed to the other ranks, then raised here as it is
            error, message[1] = e, f"{type(e).__name__}: {one_line(e)}"
    dist.broadcast_object_list(message, src=0, group=group)
    if error is not None:
        raise error
    if message[1] is not None:
        raise failed(message[1])
    return message[0]
