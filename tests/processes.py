"""Processes as the fault tests see them: from /proc, since a launcher's ranks and their loader workers are
not children the test started (Linux only, as the launchers' fault handling)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


def _stat_fields(pid: int) -> list[str]:
    """The fields after the command name in /proc/PID/stat (the name may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def parent_pid(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> set[int]:
    return {
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and parent_pid(int(entry.name)) == pid
    }


def descendants(pid: int) -> set[int]:
    """Children, their children, and so on (a snapshot)."""
    found, frontier = set(), {pid}
    while frontier:
        frontier = set().union(*(children(p) for p in frontier)) - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running or stopped: a zombie (state Z, dead but not yet reaped by its new parent) is not."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def launched_ranks(launcher_pid: int, count: int, within_s: float = 30.0) -> list[int]:
    """The pids of the `count` ranks a launcher started, in start order: the processes below it that
    multiprocessing spawned whose parent it did not spawn too (a rank's loader workers). Looked for until
    `within_s`: a rank may be starting when asked. Fails with the process tree below the launcher."""
    deadline = time.monotonic() + within_s
    while True:
        parents, spawned = {}, set()
        for pid in descendants(launcher_pid):
            with contextlib.suppress(OSError):
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                parents[pid] = parent_pid(pid)
                if b"import spawn_main" in command:  # not "resource_tracker": -W options may name it
                    spawned.add(pid)
        ranks = sorted(pid for pid in spawned if parents[pid] not in spawned)
        if len(ranks) == count or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ranks) == count, f"{len(ranks)} ranks below launcher {launcher_pid}, not {count}:\n" + tree(
        launcher_pid
    )
    return ranks


def tree(pid: int) -> str:
    """Every process below `pid`: pid, parent, state and command line, one per line."""
    lines = []
    for child in sorted(descendants(pid)):
        with contextlib.suppress(OSError, IndexError):
            command = (
                Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            lines.append(
                f"{child} parent {parent_pid(child)} state {_stat_fields(child)[0]}: {command[:160]}"
            )
    return "\n".join(lines) or "(none)"
