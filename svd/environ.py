"""Environment variables set for a while: what a launch or the demo hands to the processes it starts."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


@contextmanager
def scoped_environ(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in `os.environ` inside the block, restored after it: a caller in the same process (a
    notebook, the demo, a test) would otherwise hand them to every process it starts later, as a test session
    did: the ranks of a later launch, started with the warning flags of an earlier one."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
