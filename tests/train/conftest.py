"""A tiny CLIP saved in the Hugging Face layout, loaded by the same code as real encoders (the clip table the
training tests read, `train_table`, is shared with the launcher tests: tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_clip_encoder(tiny_clip_factory) -> str:
    """Text hidden size and image projection 32 = the tiny UNet's context_dim; 224 px, the size the diffusers
    pipeline feeds its image encoder."""
    return tiny_clip_factory("tiny_clip32", image_size=224, patch_size=56, projection_dim=32)
