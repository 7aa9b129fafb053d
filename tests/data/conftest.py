"""Helpers of the data tests."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """Running or stopped: a zombie (state Z, dead but not yet reaped by its new parent) is not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
