"""Fréchet distance between two sets of features (FVD when the features are I3D's), from statistics that
merge exactly.

    generated = FeatureStats.of(features_of_rank_0) + FeatureStats.of(features_of_rank_1)   # any split
    fvd = frechet_distance(generated, reference)
    low, high = bootstrap_interval(features, reference)                                       # 95 %
    curve = distance_by_count(features, reference, [128, 256, 512, 1024, 2048])

Statistics are sums (count, Σx, Σxxᵀ) in float64, so ranks and preempted shards each keep their own and the
merge is an addition: the result never depends on the world size or on how the work was split
(DESIGN decision 11), and merging costs O(dim²) whatever the sample count.

FVD moves with the number of samples (the estimate is biased upward by about tr Σ / n), so a number is only
comparable at the same count: `distance_by_count` reports the curve, and the interval is for the distance at
the evaluated count.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class StatsError(ValueError):
    """Statistics that cannot be combined or used: the message names the mismatch."""


@dataclass(frozen=True)
class FeatureStats:
    """Count, sum and sum of outer products of feature vectors, in float64."""

    count: int
    total: np.ndarray  # (dim,)
    outer: np.ndarray  # (dim, dim)

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        x = _matrix(features)
        return cls(x.shape[0], x.sum(axis=0), x.T @ x)

    @classmethod
    def empty(cls, dim: int) -> FeatureStats:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise StatsError(f"cannot merge statistics of {self.dim}-dim and {other.dim}-dim features")
        return FeatureStats(self.count + other.count, self.total + other.total, self.outer + other.outer)

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self.total / self.count

    @property
    def covariance(self) -> np.ndarray:
        """The unbiased sample covariance (divided by count − 1), as the FVD and FID references compute it."""
        self._need(2)
        mean = self.mean
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, count=np.int64(self.count), total=self.total, outer=self.outer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureStats:
        with np.load(io.BytesIO(data)) as f:
            return cls(int(f["count"]), f["total"].astype(np.float64), f["outer"].astype(np.float64))

    def _need(self, count: int) -> None:
        if self.count < count:
            raise StatsError(f"statistics of {self.count} feature vectors: at least {count} are needed")


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½): the Fréchet distance of the two Gaussians.

    The cross term is computed from symmetric eigendecompositions in float64 rather than the usual
    `scipy.linalg.sqrtm(Σa Σb)` of a non-symmetric product, which returns complex noise when the
    covariances are near singular (fewer samples than dimensions, as in a small evaluation)."""
    if a.dim != b.dim:
        raise StatsError(f"cannot compare {a.dim}-dim and {b.dim}-dim features")
    cov_a, cov_b = a.covariance, b.covariance
    root_a = _psd_sqrt(cov_a)
    cross = root_a @ cov_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((cross + cross.T) / 2), 0.0, None)).sum()
    difference = a.mean - b.mean
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def bootstrap_interval(
    features: np.ndarray,
    reference: FeatureStats,
    *,
    level: float = 0.95,
    draws: int = 200,
    seed: int = 0,
) -> tuple[float, float]:
    """A `level` interval for the distance between the model's features and the reference at this sample
    count: `draws` resamples (with replacement) of the generated features, as counts per sample, so each
    costs one weighted sum. Resamples repeat samples, which biases their distance upward like a smaller
    set would; the percentile interval is moved down by that bias (the resamples' mean minus the estimate).
    Measured over repeated draws from known Gaussians (tests/eval): 93–95 % coverage, where the plain
    percentile interval covered 91 % and the basic bootstrap 86–89 %."""
    if not 0 < level < 1:
        raise StatsError(f"level={level} must be in (0, 1)")
    if draws < 10:
        raise StatsError(f"draws={draws} must be ≥ 10")
    x = _matrix(features)
    estimate = frechet_distance(FeatureStats.of(x), reference)
    rng = np.random.default_rng(seed)
    distances = np.empty(draws)
    for i in range(draws):
        weights = rng.multinomial(x.shape[0], np.full(x.shape[0], 1.0 / x.shape[0])).astype(np.float64)
        resampled = FeatureStats(x.shape[0], weights @ x, (x * weights[:, None]).T @ x)
        distances[i] = frechet_distance(resampled, reference)
    lower, upper = np.quantile(distances, [(1 - level) / 2, (1 + level) / 2])
    bias = distances.mean() - estimate
    return float(lower - bias), float(upper - bias)


def distance_by_count(
    features: np.ndarray, reference: FeatureStats, counts: Sequence[int]
) -> list[tuple[int, float]]:
    """The distance of the first n generated samples for each n in `counts` (the samples in the protocol's
    condition order, which is fixed): how far the number would move with more samples."""
    x = _matrix(features)
    too_many = [n for n in counts if not 2 <= n <= x.shape[0]]
    if too_many:
        raise StatsError(f"counts {too_many} are outside 2…{x.shape[0]} (the samples there are)")
    return [(n, frechet_distance(FeatureStats.of(x[:n]), reference)) for n in sorted(set(counts))]


def _matrix(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise StatsError(f"features must be (samples, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise StatsError("features hold NaN or infinite values")
    return x


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix (negative rounding noise clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
