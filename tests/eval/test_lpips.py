"""LPIPS with a randomly initialised AlexNet and random linear weights saved to a folder (`tiny_lpips`):
loaded by the same code as real weights, checked against a direct numpy computation of the published
definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from svd.config import ConfigError
from svd.eval.job import skipped
from svd.eval.lpips import SCALE, SHIFT, SKIPPED, Lpips
from svd.eval.protocol import load_protocol


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(x, w.shape[-2:], axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("chwij,ocij->ohw", windows, w) + b[:, None, None]


def max_pool(x: np.ndarray) -> np.ndarray:
    return sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def numpy_lpips(folder: str, a: np.ndarray, b: np.ndarray) -> float:
    """Zhang et al. (2018), eq. 1, for one pair of (3, h, w) frames in [0, 1], with AlexNet's relu1…relu5."""
    state = {k: v.double().numpy() for k, v in torch.load(f"{folder}/alexnet.pth").items()}
    lin = {k: v.double().numpy().reshape(-1) for k, v in torch.load(f"{folder}/lin.pth").items()}
    stride_pad = {0: (4, 2), 3: (1, 2), 6: (1, 1), 8: (1, 1), 10: (1, 1)}

    def layers(frame: np.ndarray) -> list[np.ndarray]:
        x = (frame * 2 - 1 - np.array(SHIFT)[:, None, None]) / np.array(SCALE)[:, None, None]
        out = []
        for i, (stride, pad) in stride_pad.items():
            weight, bias = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
            x = np.maximum(conv(x, weight, bias, stride, pad), 0)
            out.append(x)
            if i in (0, 3):
                x = max_pool(x)
        return out

    total = 0.0
    for k, (x, y) in enumerate(zip(layers(a), layers(b), strict=True)):
        x = x / (np.sqrt((x**2).sum(0)) + 1e-10)
        y = y / (np.sqrt((y**2).sum(0)) + 1e-10)
        total += float((lin[f"lin{k}.model.1.weight"][:, None, None] * (x - y) ** 2).sum(0).mean())
    return total


def test_lpips_is_the_published_definition_and_zero_for_identical_frames(tiny_lpips):
    folder, sha256 = tiny_lpips
    rng = np.random.default_rng(0)
    truth = rng.random((2, 3, 35, 48))
    generated = np.clip(truth + rng.normal(0, 0.1, truth.shape), 0, 1)
    scorer = Lpips.load(folder, sha256=sha256)
    expected = np.mean([numpy_lpips(folder, g, t) for g, t in zip(generated, truth, strict=True)])
    assert expected > 0
    assert scorer(generated, truth) == pytest.approx(expected, rel=1e-9)
    assert scorer(truth, truth) == 0.0
    with pytest.raises(ValueError, match="LPIPS needs frames of at least 31×31 pixels, got"):
        scorer(truth[..., :30], truth[..., :30])


def test_weights_that_are_missing_or_not_the_pinned_file_are_refused_in_one_line(tiny_lpips, tmp_path):
    folder, sha256 = tiny_lpips
    with pytest.raises(ConfigError, match=rf"eval.lpips={tmp_path}: no alexnet.pth there"):
        Lpips.load(str(tmp_path), sha256=sha256)
    with pytest.raises(ConfigError, match=rf"alexnet.pth has sha256 {sha256}, eval.lpips_sha256 pins 00"):
        Lpips.load(folder, sha256="00")
    with pytest.raises(ConfigError, match=r"eval.lpips=x needs eval.lpips_sha256=<sha256 of its alexnet"):
        load_protocol("interpolation_holdout", ["lpips=x"])


def test_without_weights_lpips_is_skipped_in_one_line_for_interpolation_only():
    assert SKIPPED in skipped(load_protocol("interpolation_holdout"))
    assert SKIPPED not in skipped(load_protocol("interpolation_holdout", ["lpips=x", "lpips_sha256=ab"]))
    assert SKIPPED not in skipped(load_protocol("motion_adherence"))
