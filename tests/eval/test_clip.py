"""CLIP similarity of generated frames, with a tiny randomly initialised CLIP saved to a folder in the Hugging
Face layout (`tiny_clip_factory`): loaded by the same code as real weights, checked against transformers' own
feature functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from svd.config import ConfigError
from svd.eval.clip import clip_similarities, key_frames, load_clip


def test_similarities_are_transformers_cosines_of_the_key_frames_to_the_prompt_and_the_image(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5, 24, 40, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    assert [f.tobytes() for f in key_frames(video)] == [video[i].tobytes() for i in (0, 2, 4)]

    scores = clip_similarities(load_clip(tiny_clip), video, caption="a red ball", image=image)

    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=[video[0], video[2], video[4], image], return_tensors="pt")["pixel_values"]
        # transformers 5: the projected features are the output's pooler_output
        images = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        tokens = processor(text=["a red ball"], return_tensors="pt", padding=True)
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)[0]
    assert scores["clip_text"] == pytest.approx(float((images[:3] @ text).mean()), abs=1e-6)
    assert scores["clip_image"] == pytest.approx(float((images[:3] @ images[3]).mean()), abs=1e-6)
    assert clip_similarities(load_clip(tiny_clip), video, caption="", image=None) == {}


def test_a_folder_without_a_clip_model_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=rf"eval.clip={tmp_path}: no CLIP model there"):
        load_clip(str(tmp_path))
