"""The leaderboard from the votes table against fits computed here independently, and the schedule's choice of
the uncertain pairs."""

from __future__ import annotations

import json
import runpy
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from svd.arena.catalog import Catalog
from svd.arena.ledger import votes_table
from svd.arena.ratings import PRIOR_TIES, bradley_terry
from svd.arena.schedule import Schedule
from svd.arena.service import OUTCOME, QUESTIONS, Arena
from svd.data.storage import Storage

ROOT = Path(__file__).resolve().parents[2]
STRENGTH = {"static": 0.0, "moving": 1.5, "mixed": 0.7}  # the simulated raters' taste (log-odds scale)


def independent_bradley_terry(rows: list[dict], models: list[str]) -> np.ndarray:
    """Maximum likelihood by SciPy's BFGS on the log-likelihood (not the arena's MM algorithm), with the
    same prior (PRIOR_TIES "equal" votes between every two models, an "equal" half a win each), on the Elo
    scale with mean 1000."""
    index = {m: i for i, m in enumerate(models)}
    outcomes = [(index[r["model_a"]], index[r["model_b"]], OUTCOME[r["choice"]]) for r in rows]
    n = len(models)
    outcomes += [(i, j, 0.5) for i in range(n) for j in range(i + 1, n) for _ in range(int(PRIOR_TIES))]

    def negative_log_likelihood(s: np.ndarray) -> float:
        total = 0.0
        for a, b, won in outcomes:
            total -= won * np.log(1 / (1 + np.exp(s[b] - s[a]))) + (1 - won) * np.log(
                1 / (1 + np.exp(s[a] - s[b]))
            )
        return total

    s = minimize(negative_log_likelihood, np.zeros(n), method="BFGS", options={"gtol": 1e-9}).x
    elo = 400 * s / np.log(10)
    return elo - elo.mean() + 1000


def cast_votes(arena_dir: str, tokens: dict[str, str]) -> list[dict]:
    """Both raters vote on every pair through the service, by the simulated taste (seeded)."""
    arena = Arena(arena_dir, Storage())
    rng = np.random.default_rng(7)
    sides = ("left", "right")
    for token in tokens.values():
        rater = arena.rater(token)
        while pending := arena.pending(rater):
            pair = pending[0]
            left = arena.catalog.models[arena.catalog.videos[pair["left"]].model]
            right = arena.catalog.models[arena.catalog.videos[pair["right"]].model]
            p_left = 1 / (1 + np.exp(STRENGTH[right] - STRENGTH[left]))
            choices = {}
            for q in QUESTIONS:
                draw = rng.random()
                choices[q] = "equal" if draw > 0.85 else sides[int(draw > 0.85 * p_left)]
            arena.vote(rater, {"pair": pair["pair"], "choices": choices, "load_ms": 10.0})
    return votes_table(arena_dir, Storage()).rows()


def test_the_leaderboard_equals_an_independent_bradley_terry_fit_of_the_table(arena_dir, tokens, tmp_path):
    rows = cast_votes(arena_dir, tokens)
    assert len({r["vote"] for r in rows}) == 48  # 2 raters × 24 pairs
    main = runpy.run_path(str(ROOT / "jobs" / "arena.py"))["main"]
    assert main(["leaderboard", arena_dir, f"out={tmp_path}", "draws=50"]) == 0
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert (tmp_path / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = board["models"]
    assert models == list(STRENGTH)
    assert board["votes"] == 48
    for question in QUESTIONS:
        answers = [r for r in rows if r["question"] == question]
        result = board["questions"][question]
        expected = independent_bradley_terry(answers, models)
        got = {e["model"]: e for e in result["ranking"]}
        assert [got[m]["bradley_terry"] for m in models] == pytest.approx(list(expected), abs=1e-3)
        assert [e["model"] for e in result["ranking"]] == sorted(
            models, key=lambda m: -got[m]["bradley_terry"]
        )
        for entry in result["ranking"]:
            low, high = entry["bradley_terry_95"]
            assert low <= entry["bradley_terry"] <= high
            assert entry["elo_95"][0] < entry["elo_95"][1]
            assert entry["votes"] == sum(1 for r in answers if entry["model"] in (r["model_a"], r["model_b"]))
        a, b = models.index("static"), models.index("moving")
        between = [r for r in answers if {r["model_a"], r["model_b"]} == {"static", "moving"}]
        points = sum(
            OUTCOME[r["choice"]] if r["model_a"] == "static" else 1 - OUTCOME[r["choice"]] for r in between
        )
        assert result["games"][a][b] == len(between) == 16
        assert result["win_rate"][a][b] == pytest.approx(points / len(between))
        assert result["win_rate"][b][a] == pytest.approx(1 - points / len(between))
    overall = {
        m: np.mean([board["questions"][q]["ranking"][0]["model"] == m for q in QUESTIONS]) for m in models
    }
    assert max(overall, key=overall.get) == "moving"  # the simulated favourite leads


def test_a_model_that_never_won_gets_a_finite_score_below_the_others():
    scores = bradley_terry([(0, 1, 1.0)] * 20 + [(0, 2, 1.0)] * 20 + [(1, 2, 0.5)] * 4, 3)
    assert np.all(np.isfinite(scores))
    assert scores[0] > scores[1] == pytest.approx(scores[2])
    assert scores.mean() == pytest.approx(1000)


def test_the_schedule_asks_about_the_closest_least_voted_models(arena_dir):
    schedule = Schedule(Catalog.load(arena_dir, Storage()))
    pairs = {(p.a, p.b): p.id for p in schedule.catalog.pairs.values()}
    now = datetime.now(UTC)
    # 0 beat 1 clearly, 0 beat 2 clearly, 1 and 2 met once and tied: (1, 2) is the open question.
    for model_pair, outcome, times in (((0, 1), 1.0, 6), ((0, 2), 1.0, 6), ((1, 2), 0.5, 1)):
        for k in range(times):
            schedule.given(f"r{k}", pairs[model_pair], "a", now)
            schedule.voted(f"r{k}", pairs[model_pair], [outcome] * len(QUESTIONS))
    chosen, _ = schedule.next_pair("new")
    assert (chosen.a, chosen.b) == (1, 2)
    assert chosen.id != pairs[(1, 2)]  # a condition of (1, 2) with fewer votes than the voted one
