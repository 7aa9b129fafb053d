"""Appearance scores from CLIP image embeddings of a clip's first, middle and last frames:

- `aesthetic_score`: a linear/MLP head on the L2-normalised image embedding (the LAION aesthetic
  predictor's format: `layers.N.weight/bias` Linear layers applied in order, no activations);
- `clip_score`: cosine similarity between the frames and the clip's caption (mean over the frames).

Any CLIP checkpoint in the Hugging Face layout loads from a local folder (the paper used ViT-H-14; OpenAI's
ViT-L/14 matches the LAION head). Tests use a tiny randomly initialised CLIP through the same code path.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class AestheticHead(nn.Module):
    """Linear layers applied in order to a normalised CLIP embedding; loads LAION's predictor files."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def load(path: str | Path) -> AestheticHead:
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.weight$", k))})
        if not indices:
            raise ValueError(f"{path}: no 'layers.N.weight' tensors; expected an aesthetic head")
        layers = []
        for i in indices:
            weight, bias = state[f"layers.{i}.weight"], state.get(f"layers.{i}.bias")
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            layer.load_state_dict({"weight": weight} | ({"bias": bias} if bias is not None else {}))
            layers.append(layer)
        return AestheticHead(layers).eval()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = embeddings
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)


class ClipScorer:
    def __init__(self, model_path: str | Path, aesthetic_head: str | Path | None = None):
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
        self.model = CLIPModel.from_pretrained(str(model_path)).eval()
        self.processor = CLIPProcessor.from_pretrained(str(model_path))
        self.head = AestheticHead.load(aesthetic_head) if aesthetic_head else None

    @torch.no_grad()
    def image_embeddings(self, frames: list[np.ndarray]) -> torch.Tensor:
        """(N, D) L2-normalised embeddings of RGB frames."""
        pixels = self.processor(images=frames, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def text_embedding(self, text: str) -> torch.Tensor:
        tokens = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)[0]

    @torch.no_grad()
    def score(self, frames: list[np.ndarray], caption: str | None) -> tuple[float | None, float | None]:
        """(aesthetic score, caption–frame similarity); None where the head or the caption is missing."""
        images = self.image_embeddings(frames)
        aesthetic = float(self.head(images).mean()) if self.head is not None else None
        similarity = float((images @ self.text_embedding(caption)).mean()) if caption else None
        return aesthetic, similarity
