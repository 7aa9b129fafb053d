"""The arena's rules, apart from HTTP: who may see which pair, what a valid vote is, and writing it before
saying yes. One lock orders every change, so two requests of one rater (a double submit) cannot both pass.
"""

from __future__ import annotations

import math
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from svd.arena.catalog import Catalog
from svd.arena.ledger import Raters, shown_table, votes_table
from svd.arena.schedule import AHEAD, Schedule
from svd.data.storage import Storage

# The paper's questions (Blattmann et al. 2023, App. E: human preference studies), "equal" allowed.
QUESTIONS = {
    "quality": "Which video has the better visual quality?",
    "prompt": "Which video follows the prompt better?",
    "motion": "Which video has the better motion?",
}
SIDES = ("left", "right", "equal")
OUTCOME = {"a": 1.0, "b": 0.0, "equal": 0.5}  # the share of the point model a won


@dataclass
class RefusedError(Exception):
    """A request the arena does not accept: the HTTP status and a one-line reason."""

    status: int
    reason: str


class Arena:
    def __init__(self, arena_dir: str, storage: Storage):
        self.catalog = Catalog.load(arena_dir, storage)
        self.storage = storage
        self.raters = Raters(arena_dir, storage)
        self.shown = shown_table(arena_dir, storage)
        self.votes = votes_table(arena_dir, storage)
        self.schedule = Schedule(self.catalog)
        self._lock = threading.Lock()
        self._resume()

    def _resume(self) -> None:
        """The schedule as the tables left it (a restart continues where the last server stopped)."""
        self.shown.compact()
        self.votes.compact()
        for row in self.shown.rows():
            if row["pair"] in self.catalog.pairs:
                self.schedule.given(row["rater"], row["pair"], row["left"], row["time"])
        answers: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(self.votes.rows(), key=lambda r: r["time"]):
            answers.setdefault(row["vote"], []).append(row)
        for rows in answers.values():
            if rows[0]["pair"] in self.catalog.pairs:
                self.schedule.voted(rows[0]["rater"], rows[0]["pair"], [OUTCOME[r["choice"]] for r in rows])

    def rater(self, token: str | None) -> str:
        name = self.raters.rater(token) if token else None
        if name is None:
            raise RefusedError(401, "no valid rater token (ask the organiser for your link)")
        return name

    def pending(self, rater: str) -> list[dict[str, Any]]:
        """The pairs given to `rater` and not voted yet (the first is on screen, the next preloads), topped
        up to AHEAD; each new one is recorded before it is returned."""
        with self._lock:
            state = self.schedule.raters[rater]
            while len(state.pending()) < AHEAD:
                chosen = self.schedule.next_pair(rater)
                if chosen is None:
                    break
                pair, left = chosen
                now = datetime.now(UTC)
                self.shown.append([{"rater": rater, "pair": pair.id, "left": left, "time": now}])
                self.schedule.given(rater, pair.id, left, now)
            return [self._view(rater, p) for p in state.pending()]

    def _view(self, rater: str, pair_id: str) -> dict[str, Any]:
        """What the browser gets: the pair's id, its videos' ids by side and the caption; no model name."""
        pair = self.catalog.pairs[pair_id]
        on_left = pair.a if self.schedule.raters[rater].left[pair_id] == "a" else pair.b
        on_right = pair.b if on_left == pair.a else pair.a
        return {
            "pair": pair_id,
            "left": self.catalog.video_of(on_left, pair.condition),
            "right": self.catalog.video_of(on_right, pair.condition),
            "caption": pair.caption,
        }

    def vote(self, rater: str, body: Any) -> int:
        """Check the submission, write its answers, then count them; returns how many pairs `rater` voted."""
        pair_id, sides, load_ms = _parse_vote(body)
        with self._lock:
            state = self.schedule.raters[rater]
            if pair_id in state.voted:
                raise RefusedError(409, f"pair {pair_id}: you voted on it already")
            if pair_id not in state.pending():
                raise RefusedError(409, f"pair {pair_id}: not a pair you were shown")
            pair = self.catalog.pairs[pair_id]
            left = state.left[pair_id]
            right = "b" if left == "a" else "a"
            now, vote = datetime.now(UTC), uuid.uuid4().hex
            rows = [
                {
                    "vote": vote,
                    "rater": rater,
                    "pair": pair_id,
                    "question": question,
                    "choice": {"left": left, "right": right, "equal": "equal"}[side],
                    "side": side,
                    "model_a": self.catalog.models[pair.a],
                    "model_b": self.catalog.models[pair.b],
                    "condition": pair.condition[0],
                    "motion_bucket_id": pair.condition[1],
                    "seed": pair.condition[2],
                    "time": now,
                    "shown_time": state.given_time[pair_id],
                    "load_ms": load_ms,
                }
                for question, side in sides.items()
            ]
            self.votes.append(rows)  # on storage before the browser hears yes
            self.schedule.voted(rater, pair_id, [OUTCOME[r["choice"]] for r in rows])
            return len(state.voted)

    def video(self, video_id: str) -> bytes:
        """A video of the arena's samples by its id; nothing else can be named."""
        video = self.catalog.videos.get(video_id)
        if video is None:
            raise RefusedError(404, "no such video")
        fs, path = self.storage.fsspec(video.uri)
        return fs.cat_file(path)


def _parse_vote(body: Any) -> tuple[str, dict[str, str], float]:
    """(pair id, {question: side}, load_ms) from the JSON body, or RefusedError(400) naming the bad field."""
    if not isinstance(body, dict):
        raise RefusedError(400, "the body must be a JSON object")
    pair, choices, load_ms = body.get("pair"), body.get("choices"), body.get("load_ms")
    if not isinstance(pair, str) or not pair:
        raise RefusedError(400, "pair: a pair id is required")
    if not isinstance(choices, dict) or set(choices) != set(QUESTIONS):
        raise RefusedError(400, f"choices: one answer for each of {list(QUESTIONS)}")
    bad = [q for q, side in choices.items() if side not in SIDES]
    if bad:
        raise RefusedError(400, f"choices.{bad[0]}: choose one of {list(SIDES)}")
    is_number = isinstance(load_ms, int | float) and not isinstance(load_ms, bool)
    if not (is_number and math.isfinite(load_ms) and 0 <= load_ms < 86_400_000):
        raise RefusedError(400, "load_ms: milliseconds from 0 to a day")
    return pair, {q: choices[q] for q in QUESTIONS}, float(load_ms)
