"""Rank correlation (against SciPy), PSNR (closed form), SSIM (against a direct window-by-window
computation) and flicker."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from svd.eval.adherence import average_ranks, spearman
from svd.eval.quality import SSIM_K1, SSIM_K2, SSIM_SIGMA, SSIM_WINDOW, flicker, psnr, ssim


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    requested = rng.integers(0, 5, size=40).astype(float)  # motion buckets: many ties
    measured = requested * 0.3 + rng.normal(size=40)
    if seed % 2:
        measured = np.round(measured)  # ties on both sides
    assert spearman(requested, measured) == pytest.approx(spearmanr(requested, measured).statistic, abs=1e-12)


def test_spearman_of_a_monotone_relation_is_one_and_of_a_reversed_one_minus_one():
    x = np.array([1.0, 2, 3, 4, 5])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(5)))  # a constant answer follows no order


def test_tied_values_share_their_average_rank():
    assert average_ranks(np.array([10.0, 20, 10, 30, 20, 10])).tolist() == [2, 4.5, 2, 6, 4.5, 2]


def test_spearman_names_bad_input():
    with pytest.raises(ValueError, match=r"requested \(3,\) and measured \(2,\)"):
        spearman(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        spearman(np.ones(1), np.ones(1))


def test_psnr_of_a_constant_error_is_its_closed_form():
    truth = np.random.default_rng(0).uniform(0.2, 0.8, size=(3, 3, 16, 16))
    assert psnr(truth + 0.1, truth) == pytest.approx(20.0, abs=1e-9)  # 10·log10(1 / 0.01)
    assert psnr(truth, truth) == float("inf")


def direct_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM window by window, from its definition (weighted means, variances, covariance), in plain loops."""
    taps = np.arange(SSIM_WINDOW) - SSIM_WINDOW // 2
    g = np.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    values = []
    for x_plane, y_plane in zip(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), strict=True):
        for i in range(x_plane.shape[0] - SSIM_WINDOW + 1):
            for j in range(x_plane.shape[1] - SSIM_WINDOW + 1):
                x = x_plane[i : i + SSIM_WINDOW, j : j + SSIM_WINDOW]
                y = y_plane[i : i + SSIM_WINDOW, j : j + SSIM_WINDOW]
                mx, my = (w * x).sum(), (w * y).sum()
                vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
                cxy = (w * (x - mx) * (y - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_equals_its_definition_computed_window_by_window():
    rng = np.random.default_rng(1)
    truth = rng.uniform(size=(2, 3, 14, 17))
    generated = np.clip(truth + rng.normal(scale=0.1, size=truth.shape), 0, 1)
    assert ssim(generated, truth) == pytest.approx(direct_ssim(generated, truth), abs=1e-10)
    assert ssim(truth, truth) == pytest.approx(1.0, abs=1e-12)
    assert ssim(generated, truth) < ssim(np.clip(truth + 0.01, 0, 1), truth)


def test_ssim_of_two_flat_frames_is_the_luminance_term():
    a, b = np.full((1, 1, 12, 12), 0.3), np.full((1, 1, 12, 12), 0.6)
    c1 = SSIM_K1**2
    assert ssim(a, b) == pytest.approx((2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1), abs=1e-12)


def test_flicker_is_the_mean_squared_frame_difference():
    video = np.zeros((3, 1, 4, 4))
    video[1] = 0.5  # 0 → 0.5 → 0: each difference 0.25
    assert flicker(video) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="frames ≥ 2"):
        flicker(video[:1])


def test_quality_measures_name_bad_shapes():
    with pytest.raises(ValueError, match=r"generated \(2, 3, 16, 16\) and true \(2, 3, 16, 15\)"):
        psnr(np.zeros((2, 3, 16, 16)), np.zeros((2, 3, 16, 15)))
    with pytest.raises(ValueError, match="at least 11×11 pixels"):
        ssim(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))
