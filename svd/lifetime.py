"""Helper processes that must not outlive the process that started them.

A loader worker or a local S3 server whose parent was killed (SIGKILL, an OOM kill, a SIGTERM with no
handler) is reparented and runs on: it holds the job's output open, a port, a GPU's memory. The kernel can
signal a child when its parent dies (Linux's PR_SET_PDEATHSIG); elsewhere the owners' own shutdown is all.
"""

from __future__ import annotations

import signal
import sys


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `signum` to this process when its parent (the thread that started it) dies.
    Call it in the child: first thing in a worker, or as a `subprocess.Popen` `preexec_fn`."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)
