"""The Fréchet distance and its statistics: closed forms, an independent matrix square root (SciPy), exact
merges for any split, and the interval's coverage over repeated draws."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import sqrtm

from svd.eval.frechet import (
    FeatureStats,
    StatsError,
    bootstrap_interval,
    distance_by_count,
    frechet_distance,
)


def gaussian(mean: list[float], covariance: np.ndarray, count: int = 1000) -> FeatureStats:
    """Statistics whose mean and covariance are exactly the given ones (no sampling noise)."""
    mu, sigma = np.asarray(mean, dtype=np.float64), np.asarray(covariance, dtype=np.float64)
    return FeatureStats(count, count * mu, (count - 1) * sigma + count * np.outer(mu, mu))


def test_one_dimension_is_the_squared_difference_of_means_plus_that_of_standard_deviations():
    a, b = gaussian([1.0], np.array([[4.0]])), gaussian([-2.0], np.array([[9.0]]))
    assert frechet_distance(a, b) == pytest.approx((1 + 2) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_covariances_with_one_eigenbasis_give_the_sum_over_eigenvalues():
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0]
    eigen_a, eigen_b = np.array([1.0, 2, 3, 4, 5]), np.array([0.5, 4, 1, 9, 2])
    a = gaussian([0.0] * 5, rotation @ np.diag(eigen_a) @ rotation.T)
    b = gaussian([1.0, 0, 0, 0, 2], rotation @ np.diag(eigen_b) @ rotation.T)
    expected = 1 + 4 + ((np.sqrt(eigen_a) - np.sqrt(eigen_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_two_dimensions_without_a_common_eigenbasis_match_the_closed_form():
    """For 2×2 matrices tr √M = √(tr M + 2 √det M), with M = Σa^½ Σb Σa^½: tr M = tr ΣaΣb, det M =
    det Σa · det Σb. No matrix square root involved."""
    cov_a, cov_b = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    trace_sqrt = np.sqrt(np.trace(cov_a @ cov_b) + 2 * np.sqrt(np.linalg.det(cov_a) * np.linalg.det(cov_b)))
    expected = 0.5**2 + 1.5**2 + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    distance = frechet_distance(gaussian([0.5, 0.0], cov_a), gaussian([0.0, 1.5], cov_b))
    assert distance == pytest.approx(expected, rel=1e-12)


def test_random_features_match_the_reference_implementations_sqrtm():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.3
    a, b = FeatureStats.of(x), FeatureStats.of(y)
    mu_a, mu_b = x.mean(axis=0), y.mean(axis=0)
    cov_a, cov_b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrtm(cov_a @ cov_b).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(reference, rel=1e-9)


def test_a_set_is_at_distance_zero_from_itself_even_with_fewer_samples_than_dimensions():
    few = FeatureStats.of(np.random.default_rng(2).normal(size=(10, 64)))  # singular covariance
    scale = 2 * np.trace(few.covariance)  # what the terms of the distance are made of (≈ 128)
    assert abs(frechet_distance(few, few)) < 1e-7 * scale  # rounding in the 54 zero eigenvalues


@pytest.mark.parametrize("seed", range(5))
def test_statistics_merged_from_any_split_equal_one_pass_over_all_features(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=3.0, size=(257, 12)) * rng.uniform(0.1, 10, size=12)
    cuts = np.sort(rng.integers(0, len(x), size=rng.integers(1, 6)))  # shards of any size, empty ones too
    shards = [FeatureStats.of(part) for part in np.split(x, cuts)]
    merged = sum(shards[1:], shards[0])
    whole = FeatureStats.of(x)
    assert merged.count == whole.count == 257
    np.testing.assert_allclose(merged.total, whole.total, rtol=1e-10)
    np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-10)
    reference = FeatureStats.of(rng.normal(size=(300, 12)))
    assert frechet_distance(merged, reference) == pytest.approx(frechet_distance(whole, reference), rel=1e-10)


def test_statistics_round_trip_through_bytes_exactly():
    stats = FeatureStats.of(np.random.default_rng(3).normal(size=(20, 5)))
    again = FeatureStats.from_bytes(stats.to_bytes())
    assert again.count == stats.count
    assert np.array_equal(again.total, stats.total)
    assert np.array_equal(again.outer, stats.outer)


def test_the_interval_covers_the_distance_at_this_sample_count_about_95_percent_of_the_time():
    """200 independent evaluations of one model (200 samples each) against a fixed reference: the share of
    intervals that hold the expected distance at 200 samples (from 4000 evaluations)."""
    rng = np.random.default_rng(4)
    mixing = rng.normal(size=(4, 4))
    covariance, mean = mixing @ mixing.T / 4 + 0.2 * np.eye(4), rng.normal(size=4) * 0.5
    reference = FeatureStats.of(rng.normal(size=(50_000, 4)))

    def evaluation() -> np.ndarray:
        return rng.multivariate_normal(mean, covariance, size=200)

    expected = np.mean([frechet_distance(FeatureStats.of(evaluation()), reference) for _ in range(4000)])
    intervals = [bootstrap_interval(evaluation(), reference, draws=200, seed=i) for i in range(200)]
    coverage = np.mean([low <= expected <= high for low, high in intervals])
    assert 0.90 <= coverage <= 0.99
    assert all(low < high for low, high in intervals)


def test_the_distance_of_more_samples_of_the_reference_distribution_falls_toward_zero():
    rng = np.random.default_rng(5)
    reference = FeatureStats.of(rng.normal(size=(20_000, 8)))
    samples = rng.normal(size=(2048, 8))
    curve = distance_by_count(samples, reference, [2048, 64, 256, 1024, 256])
    assert [n for n, _ in curve] == [64, 256, 1024, 2048]  # sorted, once each
    distances = [d for _, d in curve]
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < distances[0] / 10
    assert curve[1][1] == frechet_distance(FeatureStats.of(samples[:256]), reference)  # the first 256


def test_bad_input_is_named():
    a, b = FeatureStats.of(np.ones((3, 4))), FeatureStats.of(np.ones((3, 5)))
    with pytest.raises(StatsError, match="4-dim and 5-dim"):
        frechet_distance(a, b)
    with pytest.raises(StatsError, match="4-dim and 5-dim"):
        a + b
    with pytest.raises(StatsError, match="NaN or infinite"):
        FeatureStats.of(np.array([[1.0, np.nan]]))
    with pytest.raises(StatsError, match=r"shape \(4,\)"):
        FeatureStats.of(np.ones(4))
    with pytest.raises(StatsError, match="1 feature vectors: at least 2"):
        FeatureStats.of(np.ones((1, 4))).covariance  # noqa: B018
    with pytest.raises(StatsError, match=r"counts \[1, 9\] are outside 2…3"):
        distance_by_count(np.ones((3, 4)), a, [1, 2, 9])
    with pytest.raises(StatsError, match=r"level=1\.5"):
        bootstrap_interval(np.ones((3, 4)), a, level=1.5)
