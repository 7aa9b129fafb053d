"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_factory) -> str:
    """A tiny randomly initialised CLIP (32 px, 16-d embeddings) in a folder, as eval.clip takes real ones."""
    return tiny_clip_factory("eval_clip", image_size=32, patch_size=8, projection_dim=16)
