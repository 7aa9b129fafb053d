"""Ratings from pairwise votes, as pure functions: Elo in vote order, Bradley–Terry by Hunter's MM
algorithm, bootstrap intervals and the win-rate matrix.

A vote here is `(a, b, outcome)`: model indices and the share of the point that `a` won (1, 0, or ½ for
"equal"). Both scores are on the Elo scale (400·log10 of a strength, mean 1000), so the two columns of the
leaderboard read alike; Bradley–Terry is the one to trust (it does not depend on the order of the votes),
Elo is shown because the paper reports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Vote = tuple[int, int, float]  # (model a, model b, share of the point a won: 1, ½, 0)

ELO_K = 32.0
ELO_START = 1000.0
# One virtual "equal" of every model with every other: it keeps a model that never won at a finite score
# (the plain MLE sends it to −∞) and pulls scores from few votes toward the middle.
PRIOR_TIES = 1.0


def elo(votes: Sequence[Vote], models: int, *, k: float = ELO_K) -> np.ndarray:
    """Sequential Elo over the votes in the order given (the order they were cast)."""
    scores = np.full(models, ELO_START)
    for a, b, outcome in votes:
        expected = 1.0 / (1.0 + 10.0 ** ((scores[b] - scores[a]) / 400.0))
        scores[a] += k * (outcome - expected)
        scores[b] -= k * (outcome - expected)
    return scores


def wins_and_games(votes: Sequence[Vote], models: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, N): W[i, j] the points i won against j (an "equal" is ½ each), N[i, j] their votes."""
    wins = np.zeros((models, models))
    games = np.zeros((models, models))
    for a, b, outcome in votes:
        wins[a, b] += outcome
        wins[b, a] += 1.0 - outcome
        games[a, b] += 1.0
        games[b, a] += 1.0
    return wins, games


def bradley_terry(
    votes: Sequence[Vote], models: int, *, prior_ties: float = PRIOR_TIES, tol: float = 1e-10
) -> np.ndarray:
    """Bradley–Terry maximum likelihood (P(i beats j) = p_i / (p_i + p_j)), "equal" as half a win each,
    with `prior_ties` virtual "equal" votes between every two models; on the Elo scale, mean 1000.

    Hunter's MM update p_i ← W_i / Σ_j N_ij / (p_i + p_j) converges monotonically to the maximum."""
    wins, games = wins_and_games(votes, models)
    off_diagonal = 1.0 - np.eye(models)
    wins = wins + 0.5 * prior_ties * off_diagonal
    games = games + prior_ties * off_diagonal
    total_wins = wins.sum(axis=1)
    strength = np.ones(models)
    for _ in range(10_000):
        denominator = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        updated = total_wins / denominator
        updated /= np.exp(np.log(updated).mean())
        if np.max(np.abs(np.log(updated) - np.log(strength))) < tol:
            strength = updated
            break
        strength = updated
    return to_elo_scale(np.log(strength))


def to_elo_scale(log_strength: np.ndarray) -> np.ndarray:
    scores = 400.0 * log_strength / np.log(10.0)
    return scores - scores.mean() + ELO_START


def win_rates(votes: Sequence[Vote], models: int) -> np.ndarray:
    """R[i, j]: the share of i's votes against j that i won ("equal" half); NaN where they never met."""
    wins, games = wins_and_games(votes, models)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(games > 0, wins / games, np.nan)


def bootstrap(
    votes: Sequence[Vote], models: int, *, draws: int = 200, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """95 % percentile intervals of both scores over `draws` resamplings of the votes (with replacement,
    kept in their cast order for Elo): {"elo": (low, high), "bradley_terry": (low, high)}, per model."""
    rng = np.random.default_rng(seed)
    elo_draws = np.empty((draws, models))
    bt_draws = np.empty((draws, models))
    for d in range(draws):
        picked = np.sort(rng.integers(0, len(votes), size=len(votes)))
        sample = [votes[i] for i in picked]
        elo_draws[d] = elo(sample, models)
        bt_draws[d] = bradley_terry(sample, models)
    return {
        "elo": (np.percentile(elo_draws, 2.5, axis=0), np.percentile(elo_draws, 97.5, axis=0)),
        "bradley_terry": (np.percentile(bt_draws, 2.5, axis=0), np.percentile(bt_draws, 97.5, axis=0)),
    }


def win_probability(scores: np.ndarray, a: int, b: int) -> float:
    """P(a beats b) from scores on the Elo scale."""
    return float(1.0 / (1.0 + 10.0 ** ((scores[b] - scores[a]) / 400.0)))
