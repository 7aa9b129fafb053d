"""Text area: the fraction of a frame covered by text (captions, logos, subtitles), on a clip's first,
middle and last frames; the clip's value is the largest of the three (LVD-F drops clips over 7 %).

Two detectors behind one interface:
- `MorphologicalTextDetector` (default, no weights): text is dense, high-contrast strokes in horizontal
  runs. Morphological gradient → Otsu threshold → horizontal closing → boxes whose shape and stroke
  density look like lines of text.
- `LearnedTextDetector`: a CRAFT-class network exported with `torch.export` (`.pt2`, dynamic height and
  width) or TorchScript, whose output is a per-pixel text ("region") score; the area is the share of
  pixels above the threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch


class TextDetector(Protocol):
    def text_area(self, frame: np.ndarray) -> float:
        """Fraction of the RGB frame (H, W, 3) covered by text."""
        ...


class MorphologicalTextDetector:
    def __init__(self, min_height: int = 6, max_height_fraction: float = 0.2, min_density: float = 0.3):
        self.min_height = min_height
        self.max_height_fraction = max_height_fraction
        self.min_density = min_density

    def text_area(self, frame: np.ndarray) -> float:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        gradient = cv2.morphologyEx(
            gray, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        )
        _, binary = cv2.threshold(gradient, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        if binary.mean() > 0.5 * 255:  # edges everywhere: texture, not text
            return 0.0
        joined = cv2.morphologyEx(
            binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, w // 40), 1))
        )
        contours, _ = cv2.findContours(joined, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        mask = np.zeros_like(gray)
        for contour in contours:
            x, y, bw, bh = cv2.boundingRect(contour)
            if not self.min_height <= bh <= self.max_height_fraction * h or bw < 2 * bh:
                continue
            if (binary[y : y + bh, x : x + bw] > 0).mean() >= self.min_density:
                mask[y : y + bh, x : x + bw] = 1
        return float(mask.mean())


class LearnedTextDetector:
    """An exported text detector: (1, 3, H, W) float in [0, 1] → (1, H', W') or (1, H', W', C) scores,
    the first channel being the text-region score (CRAFT's layout)."""

    def __init__(self, path: str | Path, threshold: float = 0.4, size: int = 640):
        if str(path).endswith(".pt2"):
            self.model = torch.export.load(str(path)).module()
        else:  # TorchScript, for detectors exported before torch.export existed
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.threshold = threshold
        self.size = size

    @torch.no_grad()
    def text_area(self, frame: np.ndarray) -> float:
        scale = self.size / max(frame.shape[:2])
        resized = (
            cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else frame
        )
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float() / 255.0
        scores = self.model(x)
        scores = scores[..., 0] if scores.ndim == 4 else scores
        return float((scores > self.threshold).float().mean())


def text_area(frames: list[np.ndarray], detector: TextDetector) -> float:
    return max(detector.text_area(f) for f in frames)
