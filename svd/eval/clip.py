"""CLIP similarity of generated videos: of their frames to the prompt (text-to-video) and to the conditioning
image (image-to-video), the mean cosine similarity of CLIP embeddings over the first, middle and last frames,
as curation's `clip_score` measures clips (svd/curate/aesthetics.py, the same loader and embeddings).

The weights are the user's: a local folder of a CLIP model in the Hugging Face layout (`eval.clip=`); without
one these metrics are skipped, and the evaluation says so in one line (`SKIPPED`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from svd.config import ConfigError
from svd.curate.aesthetics import ClipScorer

SKIPPED = "CLIP similarity skipped: no eval.clip=<local folder of a CLIP model in the Hugging Face layout>"


def load_clip(folder: str) -> ClipScorer:
    """The CLIP model of `folder`; a folder that is not one is refused in one line naming it."""
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"eval.clip={folder}: no CLIP model there (a folder with config.json and weights)")
    return ClipScorer(folder)


def key_frames(video: np.ndarray) -> list[np.ndarray]:
    """The first, middle and last frames of a (T, H, W, 3) uint8 video."""
    return [video[i] for i in sorted({0, len(video) // 2, len(video) - 1})]


def clip_similarities(
    scorer: ClipScorer, video: np.ndarray, *, caption: str | None, image: np.ndarray | None
) -> dict[str, float]:
    """{clip_text: frames to `caption`, clip_image: frames to `image`}, each where given."""
    frames = scorer.image_embeddings(key_frames(video))
    scores = {}
    if caption:
        scores["clip_text"] = float((frames @ scorer.text_embedding(caption)).mean())
    if image is not None:
        scores["clip_image"] = float((frames @ scorer.image_embeddings([image])[0]).mean())
    return scores
