"""Captions: pluggable captioners; a clip keeps every caption they produce (training samples among them).

- `ModelCaptioner`: an image-to-text model from a local folder (BLIP, GIT, …, Hugging Face layout), run on
  the clip's middle frame. The paper's CoCa/VideoBLIP captions and LLM summaries plug in the same way.
- `SidecarCaptioner`: metadata next to the video — `<name>.txt` (one caption per line) or `<name>.json`
  (`{"captions": [...]}`, `{"caption": "..."}`, or `{"segments": [{"start": s, "end": s, "caption": ...}]}`
  for captions per time range). The fallback when no model is configured, and for datasets that ship text.
"""

from __future__ import annotations

import json
from typing import Protocol

import numpy as np

from svd.data.storage import Storage


class Captioner(Protocol):
    def captions(
        self, video_uri: str, start_s: float, end_s: float, middle_frame: np.ndarray
    ) -> list[str]: ...


class ModelCaptioner:
    """Greedy decoding of an image-to-text model (anything `AutoModelForImageTextToText` loads)."""

    def __init__(self, model_path: str, max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
        self.max_new_tokens = max_new_tokens

    def captions(self, video_uri: str, start_s: float, end_s: float, middle_frame: np.ndarray) -> list[str]:
        import torch

        inputs = self.processor(images=[middle_frame], return_tensors="pt")
        with torch.no_grad():
            tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [text.strip() for text in texts if text.strip()]


class SidecarCaptioner:
    def __init__(self, storage: Storage):
        self.storage = storage

    def captions(self, video_uri: str, start_s: float, end_s: float, middle_frame: np.ndarray) -> list[str]:
        stem = video_uri.rsplit(".", 1)[0]
        for suffix in (".json", ".txt"):
            fs, path = self.storage.fsspec(stem + suffix)
            if not fs.exists(path):
                continue
            text = fs.cat_file(path).decode("utf-8")
            if suffix == ".txt":
                return [line.strip() for line in text.splitlines() if line.strip()]
            try:
                data = json.loads(text)
            except ValueError as e:  # the caller retries it on the next run, once the file is fixed
                raise ValueError(f"caption sidecar {stem}{suffix} is not valid JSON: {e}") from None
            return _from_json(data, start_s, end_s)
        return []


def _from_json(data: object, start_s: float, end_s: float) -> list[str]:
    if isinstance(data, list):
        return [str(c) for c in data]
    if not isinstance(data, dict):
        return []
    if "segments" in data:  # captions per time range: those overlapping the clip
        return [
            s["caption"]
            for s in data["segments"]
            if s.get("start", 0) < end_s and s.get("end", 1e18) > start_s
        ]
    if "captions" in data:
        return [str(c) for c in data["captions"]]
    return [str(data["caption"])] if "caption" in data else []
