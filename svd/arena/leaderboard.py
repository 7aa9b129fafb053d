"""The leaderboard of an arena's votes: per question, Elo and Bradley–Terry scores with bootstrap 95 %
intervals, the win-rate matrix and the number of votes; as JSON and as a PNG."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from svd.arena.ratings import bootstrap, bradley_terry, elo, win_rates, wins_and_games
from svd.arena.service import OUTCOME, QUESTIONS


def leaderboard(
    votes: list[dict[str, Any]], models: list[str], *, draws: int = 200, seed: int = 0
) -> dict[str, Any]:
    """`votes`: rows of votes.lance; models are named by `models` (the arena's order)."""
    index = {name: i for i, name in enumerate(models)}
    ordered = sorted(votes, key=lambda r: r["time"])
    questions = {}
    for question in QUESTIONS:
        rows = [r for r in ordered if r["question"] == question]
        pairs = [(index[r["model_a"]], index[r["model_b"]], OUTCOME[r["choice"]]) for r in rows]
        questions[question] = _scores(pairs, models, draws=draws, seed=seed)
    return {"models": models, "votes": len({r["vote"] for r in votes}), "questions": questions}


def _scores(votes: list, models: list[str], *, draws: int, seed: int) -> dict[str, Any]:
    n = len(models)
    bt, el = bradley_terry(votes, n), elo(votes, n)
    intervals = bootstrap(votes, n, draws=draws, seed=seed) if votes else None
    _, games = wins_and_games(votes, n)
    rates = win_rates(votes, n)
    table = []
    for i in np.argsort(-bt, kind="stable"):
        entry: dict[str, Any] = {
            "model": models[i],
            "bradley_terry": float(bt[i]),
            "elo": float(el[i]),
            "votes": int(games[i].sum()),
        }
        if intervals is not None:
            entry["bradley_terry_95"] = [
                float(intervals["bradley_terry"][0][i]),
                float(intervals["bradley_terry"][1][i]),
            ]
            entry["elo_95"] = [float(intervals["elo"][0][i]), float(intervals["elo"][1][i])]
        table.append(entry)
    return {
        "votes": len(votes),
        "ranking": table,
        "win_rate": [[None if np.isnan(x) else float(x) for x in row] for row in rates],  # row beat column
        "games": games.astype(int).tolist(),
    }


def plot(board: dict[str, Any]) -> bytes:
    """PNG: per question, the Bradley–Terry scores with their intervals (top) and the win-rate matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = board["models"]
    columns = len(board["questions"])
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7.5), squeeze=False)
    for c, (question, result) in enumerate(board["questions"].items()):
        ranking = result["ranking"]
        names = [r["model"] for r in ranking]
        scores = np.array([r["bradley_terry"] for r in ranking])
        top = axes[0][c]
        if "bradley_terry_95" in ranking[0]:
            low = scores - np.array([r["bradley_terry_95"][0] for r in ranking])
            high = np.array([r["bradley_terry_95"][1] for r in ranking]) - scores
            top.errorbar(range(len(names)), scores, yerr=[low, high], fmt="o", capsize=4)
        else:
            top.plot(range(len(names)), scores, "o")
        top.set_xticks(range(len(names)), names, rotation=30, ha="right")
        top.set_title(f"{question}: Bradley–Terry (Elo scale)\n{result['votes']} votes, 95 % bootstrap")
        top.grid(alpha=0.3)
        rates = np.array([[np.nan if x is None else x for x in row] for row in result["win_rate"]])
        bottom = axes[1][c]
        bottom.imshow(rates, vmin=0, vmax=1, cmap="RdBu")
        for i in range(len(models)):
            for j in range(len(models)):
                if not np.isnan(rates[i, j]):
                    bottom.text(
                        j, i, f"{rates[i, j]:.2f}\n({result['games'][i][j]})", ha="center", va="center"
                    )
        bottom.set_xticks(range(len(models)), models, rotation=30, ha="right")
        bottom.set_yticks(range(len(models)), models)
        bottom.set_title("win rate of row over column (votes)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()
