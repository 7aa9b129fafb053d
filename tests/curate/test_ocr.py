import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from svd.curate.ocr import LearnedTextDetector, MorphologicalTextDetector, text_area
from svd.data.synthetic import moving_square, panning_texture


def with_text(frame: np.ndarray, lines: list[str], size: int, top: int = 20) -> tuple[np.ndarray, float]:
    """Draws white text lines; returns the frame and the fraction covered by their boxes."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    mask = np.zeros(frame.shape[:2], bool)
    for i, line in enumerate(lines):
        box = draw.textbbox((20, top + i * int(size * 1.6)), line, font=font)
        draw.text((20, top + i * int(size * 1.6)), line, font=font, fill=(255, 255, 255))
        mask[box[1] : box[3], box[0] : box[2]] = True
    return np.asarray(image), float(mask.mean())


@pytest.mark.parametrize("size", [14, 22])
def test_text_area_is_measured_on_plain_backgrounds(size):
    background = moving_square(1, 224, 400)[0]
    frame, truth = with_text(background, ["BREAKING NEWS tonight", "subscribe and share"], size)
    estimate = MorphologicalTextDetector().text_area(frame)
    assert truth / 2 < estimate < truth * 2


def test_frames_without_text_score_near_zero():
    detector = MorphologicalTextDetector()
    assert detector.text_area(moving_square(1, 224, 400)[0]) < 0.01
    assert detector.text_area(panning_texture(1, 224, 400, seed=3)[0]) < 0.02


def test_a_clip_counts_its_most_texty_frame():
    plain = moving_square(1, 224, 400)[0]
    texty, _ = with_text(plain, ["CAPTION TEXT HERE"], 22)
    detector = MorphologicalTextDetector()
    assert text_area([plain, texty, plain], detector) == detector.text_area(texty)


class RegionMap(torch.nn.Module):
    """A stand-in CRAFT: the region score of a pixel is its brightness; CRAFT's two channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x.mean(dim=1)
        return torch.stack([region, torch.zeros_like(region)], dim=-1)


def test_learned_detector_reads_an_exported_region_map(tmp_path):
    height, width = torch.export.Dim("height", min=16), torch.export.Dim("width", min=16)
    example = torch.zeros(1, 3, 64, 64)
    program = torch.export.export(RegionMap(), (example,), dynamic_shapes=({2: height, 3: width},))
    torch.export.save(program, tmp_path / "craft.pt2")
    detector = LearnedTextDetector(tmp_path / "craft.pt2")
    frame = np.zeros((200, 320, 3), np.uint8)
    frame[:50] = 255  # "text" over the top quarter
    assert detector.text_area(frame) == pytest.approx(0.25)
