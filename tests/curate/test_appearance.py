"""CLIP scores and captions through the real loading code, with tiny random models."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svd.curate.aesthetics import AestheticHead, ClipScorer
from svd.curate.captions import ModelCaptioner, SidecarCaptioner
from svd.data.storage import Storage
from svd.data.synthetic import moving_square, panning_texture

FRAMES = [panning_texture(1, 64, 96, seed=s)[0] for s in range(3)]


def test_aesthetic_score_is_the_head_on_normalised_embeddings(tiny_clip, aesthetic_head):
    path, (w0, b0, w2, b2) = aesthetic_head
    scorer = ClipScorer(tiny_clip, path)
    embeddings = scorer.image_embeddings(FRAMES)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    expected = ((embeddings @ w0.T + b0) @ w2.T + b2).mean().item()
    aesthetic, similarity = scorer.score(FRAMES, caption=None)
    assert aesthetic == pytest.approx(expected, abs=1e-5)
    assert similarity is None


def test_clip_score_is_the_mean_cosine_between_frames_and_caption(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    _, similarity = scorer.score(FRAMES, "a red square")
    images, text = scorer.image_embeddings(FRAMES), scorer.text_embedding("a red square")
    assert similarity == pytest.approx(F.cosine_similarity(images, text[None]).mean().item(), abs=1e-5)
    assert -1.0 <= similarity <= 1.0
    assert scorer.score(FRAMES, "a red square")[1] != scorer.score(FRAMES, "zzz 123")[1]


def test_a_file_without_head_layers_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 4)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"layers\.N\.weight"):
        AestheticHead.load(tmp_path / "x.safetensors")


def test_sidecar_captions_from_text_and_json(tmp_path):
    storage = Storage()
    (tmp_path / "a.txt").write_text("a red square\n\nmoving right\n")
    (tmp_path / "b.json").write_text(json.dumps({"captions": ["one", "two"]}))
    (tmp_path / "c.json").write_text(
        json.dumps(
            {
                "segments": [
                    {"start": 0, "end": 5, "caption": "early"},
                    {"start": 5, "end": 9, "caption": "late"},
                ]
            }
        )
    )
    captioner, frame = SidecarCaptioner(storage), np.zeros((8, 8, 3), np.uint8)
    assert captioner.captions(str(tmp_path / "a.mp4"), 0, 1, frame) == ["a red square", "moving right"]
    assert captioner.captions(str(tmp_path / "b.mp4"), 0, 1, frame) == ["one", "two"]
    assert captioner.captions(str(tmp_path / "c.mp4"), 6, 8, frame) == ["late"]
    assert captioner.captions(str(tmp_path / "none.mp4"), 0, 1, frame) == []


def test_a_model_captioner_writes_a_caption_deterministically(tiny_captioner):
    captioner = ModelCaptioner(tiny_captioner, max_new_tokens=5)
    frame = moving_square(1, 64, 64)[0]
    first = captioner.captions("x.mp4", 0, 1, frame)
    assert len(first) == 1
    assert first[0]
    assert captioner.captions("x.mp4", 0, 1, frame) == first
