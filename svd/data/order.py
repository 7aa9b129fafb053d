"""The global sample order: which row every position of the training stream reads, computed on the fly.

A bucket's stream is endless: position p belongs to epoch p // N and reads row perm_epoch(p mod N), where
perm_epoch is a seeded bijection of [0, N). Global step s of a bucket with per-rank batch B on W ranks
consumes positions [c, c + B·W) (c: samples consumed so far); rank r takes [c + r·B, c + (r+1)·B).
Any process computes any position without coordination, and the only state is c — so a run resumes on
any number of ranks with no sample lost or repeated.

The permutation is a Feistel network on the smallest even-bit domain 2^(2h) ≥ N, cycle-walked into
[0, N): O(1) memory (152M clips would need 1.2 GB as a materialised permutation in every process).
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-distributed 64-bit hash (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochPermutation:
    """A seeded bijection of [0, n) for one epoch; `perm(positions)` maps an array of positions."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        base = np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64) * np.uint64(_GOLDEN) + np.uint64(epoch)
        self.keys = [_mix64(base + np.uint64(r * _GOLDEN & 0xFFFFFFFFFFFFFFFF))[0] for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << h) | right

    def _feistel_inverse(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = x >> h, x & self.mask
        for key in reversed(self.keys):
            left, right = right ^ (_mix64(left ^ key) & self.mask), left
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.uint64)
        if positions.size and int(positions.max()) >= self.n:
            raise IndexError(f"position {int(positions.max())} outside [0, {self.n})")
        out = self._feistel(positions)
        outside = out >= self.n
        while outside.any():  # cycle-walking: at most a few rounds, the domain is < 4n
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)

    def inverse(self, indices: np.ndarray) -> np.ndarray:
        """The positions that map to `indices`: where in the epoch each index is read. Provenance asks which
        step read a clip; walking the cycle backwards answers it without evaluating the whole epoch."""
        indices = np.asarray(indices, dtype=np.uint64)
        if indices.size and int(indices.max()) >= self.n:
            raise IndexError(f"index {int(indices.max())} outside [0, {self.n})")
        out = self._feistel_inverse(indices)
        outside = out >= self.n
        while outside.any():
            out[outside] = self._feistel_inverse(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


def stream_indices(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Row indices in [0, n) read by stream positions (any epoch)."""
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty_like(positions)
    epochs = positions // n
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = EpochPermutation(n, seed, int(epoch))(positions[here] - epoch * n)
    return out


def rank_positions(consumed: int, batch_per_rank: int, rank: int) -> np.ndarray:
    """Stream positions of `rank`'s samples in the step that starts after `consumed` samples."""
    start = consumed + rank * batch_per_rank
    return np.arange(start, start + batch_per_rank, dtype=np.int64)
