"""Frozen conditioning encoders: CLIP text tokens (text-to-video) and the CLIP image embedding
(image-to-video), loaded from Hugging Face folders.

SVD used OpenCLIP ViT-H-14; its transformers port has the same outputs (the penultimate text hidden states,
1024-d; the projected image embedding, 1024-d). The encoders run without gradients in fp32 on the
training device; their output width must equal the UNet's `context_dim`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TextEncoder(nn.Module):
    """Captions → (B, L, D) token features of a CLIP text model (its last hidden states)."""

    def __init__(self, path: str, max_length: int = 77):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.model = CLIPTextModel.from_pretrained(path).eval().requires_grad_(False)
        self.max_length = min(max_length, self.model.config.max_position_embeddings)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, captions: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return self.model(input_ids=tokens.input_ids.to(device)).last_hidden_state.float()


class ImageEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] → (B, 1, D) projected CLIP image embeddings (one context token)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(path).eval().requires_grad_(False)
        self.size = self.model.config.image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate((images.float() + 1.0) / 2.0, size=(self.size, self.size), mode="bicubic")
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.model(pixel_values=x).image_embeds[:, None].float()
