"""Small randomly initialised models saved in the Hugging Face layout, loaded by the same code as real
weights; and generated videos whose shots and transitions are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from svd.data.synthetic import moving_square, panning_texture, video_with_cuts, zooming_texture

H, W, FPS = 180, 320, 24


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_factory) -> str:
    return tiny_clip_factory("tiny_clip", image_size=32, patch_size=8, projection_dim=16)


@pytest.fixture(scope="session")
def aesthetic_head(tmp_path_factory) -> tuple[str, list[torch.Tensor]]:
    """A head in LAION's layout (layers.0 and layers.2, as their MLP with dropouts between)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    weights = {
        "layers.0.weight": torch.randn(4, 16, generator=g),
        "layers.0.bias": torch.randn(4, generator=g),
        "layers.2.weight": torch.randn(1, 4, generator=g),
        "layers.2.bias": torch.randn(1, generator=g),
    }
    path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_file(weights, path)
    return str(path), [
        weights[k] for k in ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    ]


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory) -> str:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[DEC]",
        "a",
        "red",
        "square",
        "moving",
        "video",
        "sky",
    ]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        text_config=small
        | {
            "vocab_size": len(vocab),
            "max_position_embeddings": 40,
            "bos_token_id": 5,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
            "encoder_hidden_size": 32,
        },
        vision_config=small | {"image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    ).save_pretrained(folder)
    return str(folder)


def shots_video(seed: int = 0, lengths=(72, 84, 66), transitions=(("cut", 0), ("dissolve", 12))):
    """Shots of a pan, a zoom and a moving square joined by the given transitions: (frames, truth)."""
    rng = np.random.default_rng(seed)
    makers = [
        lambda n: panning_texture(n, H, W, velocity=(0.0, 2.0), seed=int(rng.integers(1 << 30))),
        lambda n: zooming_texture(n, H, W, rate=0.02, seed=int(rng.integers(1 << 30))),
        lambda n: moving_square(n, H, W, velocity=(0.0, 2.0)),
    ]
    shots = [makers[i % 3](n) for i, n in enumerate(lengths)]
    return video_with_cuts(shots, list(transitions))
