"""Arenas over sample folders written the way the evaluation job writes them (samples.lance + videos/)."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from svd.arena.catalog import create
from svd.arena.ledger import Raters
from svd.data.storage import Storage
from svd.data.video_io import encode_mp4


def write_samples(folder: Path, model: int, conditions: int) -> None:
    """`conditions` samples at bucket 127: 4 frames of 16×16 each, shaded per model and condition."""
    rows = []
    for c in range(conditions):
        frames = np.full((4, 16, 16, 3), (40 * model + 5 * c) % 256, dtype=np.uint8)
        name = f"videos/{c:06d}-m127.mp4"
        (folder / "videos").mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode_mp4(frames, 4))
        rows.append(
            {
                "condition": c,
                "motion_bucket_id": 127,
                "seed": 1000 + c,
                "clip_id": f"clip{c}",
                "caption": f"prompt {c}",
                "video": name,
                "motion_score": float(c),
            }
        )
    lance.write_dataset(pa.Table.from_pylist(rows), str(folder / "samples.lance"))


@pytest.fixture(scope="session")
def sample_folders(tmp_path_factory) -> dict[str, str]:
    """Three models' samples of 8 conditions: 24 pairs."""
    root = tmp_path_factory.mktemp("samples")
    folders = {}
    for m, name in enumerate(("static", "moving", "mixed")):
        write_samples(root / name, m, 8)
        folders[name] = str(root / name)
    return folders


@pytest.fixture
def arena_dir(tmp_path, sample_folders) -> str:
    path = str(tmp_path / "arena")
    create(path, sample_folders, Storage(), salt="fixed: the ids and so the schedule are reproducible")
    return path


@pytest.fixture
def tokens(arena_dir) -> dict[str, str]:
    raters = Raters(arena_dir, Storage())
    return {name: raters.add(name) for name in ("ana", "ben")}
