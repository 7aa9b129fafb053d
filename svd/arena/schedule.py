"""Which pair a rater sees next: more comparisons where the ranking is uncertain, each pair once per rater.

The schedule is a pure function of what was shown and voted so far (both on storage), so a restarted server
resumes it. Every rater has at most `AHEAD` pairs given but not voted on (the one on screen and the one the
page preloads); a new pair is chosen when fewer are pending:

1. the model pair (i, j) with the highest priority 4·p·(1 − p) / √(1 + n_ij), where p is Bradley–Terry's
   P(i beats j) from all votes so far and n_ij their number of votes: close pairs with few votes first;
2. among that model pair's conditions this rater was not given yet, one with the fewest votes.
Ties are broken by a random draw seeded by the rater and how many pairs they were given: reproducible.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from svd.arena.catalog import Catalog, Pair
from svd.arena.ratings import Vote, bradley_terry, win_probability

AHEAD = 2


@dataclass
class RaterState:
    given: list[str] = field(default_factory=list)  # pair ids, in the order given
    left: dict[str, str] = field(default_factory=dict)  # pair id → "a" | "b" on the left
    given_time: dict[str, datetime] = field(default_factory=dict)
    voted: set[str] = field(default_factory=set)

    def pending(self) -> list[str]:
        return [p for p in self.given if p not in self.voted]


class Schedule:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.raters: dict[str, RaterState] = defaultdict(RaterState)
        self.votes: list[Vote] = []  # every answer, all questions pooled: the schedule ranks models overall
        self.pair_votes: Counter[str] = Counter()  # submissions per pair id
        self.model_pair_votes: Counter[tuple[int, int]] = Counter()

    def given(self, rater: str, pair: str, left: str, time: datetime) -> None:
        state = self.raters[rater]
        state.given.append(pair)
        state.left[pair] = left
        state.given_time[pair] = time

    def voted(self, rater: str, pair_id: str, outcomes: list[float]) -> None:
        """A rater's answers to one pair (each the share of the point model a won)."""
        pair = self.catalog.pairs[pair_id]
        self.raters[rater].voted.add(pair_id)
        self.pair_votes[pair_id] += 1
        self.model_pair_votes[(pair.a, pair.b)] += 1
        self.votes += [(pair.a, pair.b, o) for o in outcomes]

    def next_pair(self, rater: str) -> tuple[Pair, str] | None:
        """(a pair this rater was never given, "a" or "b" for the model shown on the left), or None when
        they were given every pair."""
        state = self.raters[rater]
        seen = set(state.given)
        open_pairs: dict[tuple[int, int], list[Pair]] = defaultdict(list)
        for pair in self.catalog.pairs.values():
            if pair.id not in seen:
                open_pairs[(pair.a, pair.b)].append(pair)
        if not open_pairs:
            return None
        rng = np.random.default_rng(_seed(rater, len(state.given)))
        scores = bradley_terry(self.votes, len(self.catalog.models))
        priorities = {
            mp: 4
            * win_probability(scores, *mp)
            * (1 - win_probability(scores, *mp))
            / math.sqrt(1 + self.model_pair_votes[mp])
            for mp in open_pairs
        }
        best = max(priorities.values())
        model_pairs = sorted(mp for mp, p in priorities.items() if p >= best - 1e-12)
        candidates = open_pairs[model_pairs[rng.integers(len(model_pairs))]]
        fewest = min(self.pair_votes[p.id] for p in candidates)
        candidates = sorted((p for p in candidates if self.pair_votes[p.id] == fewest), key=lambda p: p.id)
        pair = candidates[rng.integers(len(candidates))]
        return pair, "a" if rng.integers(2) == 0 else "b"


def _seed(rater: str, given: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{rater}|{given}".encode()).digest()[:8], "little")
