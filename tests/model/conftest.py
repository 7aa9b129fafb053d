"""A one-process gloo group and CPU device mesh, for checking the model under FSDP2 `fully_shard`."""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator

import pytest
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@pytest.fixture
def cpu_mesh() -> Iterator[DeviceMesh]:
    """World size 1: the parameters become real DTensors, sharded over one rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        with warnings.catch_warnings():
            # "DTensor random operators may not have complete support on cpu device mesh": on one rank the
            # local shard is the whole tensor, so the ops are the plain ones.
            warnings.filterwarnings("ignore", message="DTensor random operators")
            yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
