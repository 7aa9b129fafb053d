"""The arena over HTTP (Flask's test client on the real app): votes land in the table before the answer,
every kind of bad request is refused with a 4xx and writes nothing, model names and paths never reach the
browser, and a new server over the same folder resumes the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pytest

from svd.arena.app import create_app
from svd.arena.ledger import shown_table, votes_table
from svd.arena.service import QUESTIONS, Arena
from svd.config import ConfigError
from svd.data.storage import Storage

ANSWERS = {"quality": "left", "prompt": "equal", "motion": "right"}


class Rater:
    def __init__(self, client, token: str):
        self.client, self.headers = client, {"X-Arena-Token": token}

    def next(self) -> list[dict]:
        reply = self.client.get("api/next", headers=self.headers)
        assert reply.status_code == 200, reply.json
        return reply.json["pairs"]

    def vote(self, pair: str, answers: dict | None = None, load_ms: float = 25.0):
        body = {"pair": pair, "choices": answers or ANSWERS, "load_ms": load_ms}
        return self.client.post("api/vote", headers=self.headers, json=body)


def server(arena_dir: str):
    return create_app(Arena(arena_dir, Storage())).test_client()


def rows(arena_dir: str) -> tuple[list[dict], list[dict]]:
    return shown_table(arena_dir, Storage()).rows(), votes_table(arena_dir, Storage()).rows()


def test_a_vote_is_in_the_table_when_acknowledged_with_the_models_the_sides_stood_for(arena_dir, tokens):
    client = server(arena_dir)
    ana = Rater(client, tokens["ana"])
    pairs = ana.next()
    assert len(pairs) == 2  # the one on screen and the one preloading
    reply = ana.vote(pairs[0]["pair"], load_ms=31.5)
    assert reply.status_code == 200
    assert reply.json["voted"] == 1
    assert reply.json["pairs"][0] == pairs[1]  # the preloaded pair comes next
    shown, votes = rows(arena_dir)
    assert len(votes) == len(QUESTIONS)
    assert {r["vote"] for r in votes} == {votes[0]["vote"]}
    assert {r["question"]: r["side"] for r in votes} == ANSWERS
    arena = Arena(arena_dir, Storage())
    pair = arena.catalog.pairs[pairs[0]["pair"]]
    left_model = pair.a if arena.catalog.videos[pairs[0]["left"]].model == pair.a else pair.b
    left_letter = "a" if left_model == pair.a else "b"
    by_question = {r["question"]: r for r in votes}
    assert by_question["quality"]["choice"] == left_letter
    assert by_question["motion"]["choice"] == ("b" if left_letter == "a" else "a")
    assert by_question["prompt"]["choice"] == "equal"
    first = by_question["quality"]
    assert (first["model_a"], first["model_b"]) == (
        arena.catalog.models[pair.a],
        arena.catalog.models[pair.b],
    )
    assert (first["condition"], first["motion_bucket_id"], first["seed"]) == pair.condition
    assert first["rater"] == "ana"
    assert first["load_ms"] == 31.5
    assert first["shown_time"] <= first["time"]
    assert [r["pair"] for r in shown if r["rater"] == "ana"][:2] == [p["pair"] for p in pairs]


def test_model_names_and_paths_never_reach_the_browser(arena_dir, tokens, sample_folders):
    client = server(arena_dir)
    ana = Rater(client, tokens["ana"])
    seen = [client.get("/").get_data(as_text=True)]
    for _ in range(5):
        pairs = ana.next()
        seen.append(json.dumps(pairs))
        reply = ana.vote(pairs[0]["pair"])
        seen.append(reply.get_data(as_text=True))
    text = "\n".join(seen)
    for name, folder in sample_folders.items():
        assert name not in text
        assert folder not in text
    assert "videos/" not in text


def test_without_a_valid_token_nothing_is_shown_served_or_written(arena_dir, tokens):
    client = server(arena_dir)
    pair = Rater(client, tokens["ana"]).next()[0]
    before = rows(arena_dir)
    for headers in ({}, {"X-Arena-Token": "forged"}, {"X-Arena-Token": tokens["ana"] + "x"}):
        assert client.get("api/next", headers=headers).status_code == 401
        assert client.get(f"api/video/{pair['left']}", headers=headers).status_code == 401
        body = {"pair": pair["pair"], "choices": ANSWERS, "load_ms": 1.0}
        reply = client.post("api/vote", headers=headers, json=body)
        assert reply.status_code == 401
        assert "token" in reply.json["error"]
    assert rows(arena_dir) == before


def test_only_videos_of_the_samples_can_be_fetched_by_id(arena_dir, tokens, sample_folders):
    client = server(arena_dir)
    ana = Rater(client, tokens["ana"])
    pair = ana.next()[0]
    served = client.get(f"api/video/{pair['left']}", headers=ana.headers)
    assert served.status_code == 200
    assert served.mimetype == "video/mp4"
    assert served.data == Path(Arena(arena_dir, Storage()).catalog.videos[pair["left"]].uri).read_bytes()
    video = Path(sample_folders["static"]) / "videos" / "000000-m127.mp4"
    for attempt in (
        "../../../../etc/passwd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        str(video),
        "videos%2F000000-m127.mp4",
        "..%2Farena.json",
        pair["left"] + "x",
    ):
        reply = client.get(f"api/video/{attempt}", headers=ana.headers)
        assert reply.status_code == 404, attempt
        assert reply.data[:4] != b"\x00\x00\x00\x1c"


def test_votes_for_a_pair_not_shown_twice_or_malformed_are_refused_and_write_nothing(arena_dir, tokens):
    client = server(arena_dir)
    ana, ben = Rater(client, tokens["ana"]), Rater(client, tokens["ben"])
    pairs = ana.next()
    assert ana.vote(pairs[0]["pair"]).status_code == 200
    ana_given = {p["pair"] for p in pairs + ana.next()}
    bens_only = sorted({p["pair"] for p in ben.next()} - ana_given)
    assert bens_only  # this arena's schedule gives ben another pair first
    before = rows(arena_dir)
    never_given = sorted(set(Arena(arena_dir, Storage()).catalog.pairs) - ana_given - set(bens_only))[0]
    refusals = [
        (ana.vote(pairs[0]["pair"]), 409, "already"),  # the double submit
        (ana.vote(never_given), 409, "not a pair you were shown"),
        (ana.vote(bens_only[0]), 409, "not a pair you were shown"),
        (ana.vote("no-such-pair"), 409, "not a pair you were shown"),
        (ana.vote(pairs[1]["pair"], {"quality": "left"}), 400, "choices"),
        (ana.vote(pairs[1]["pair"], {**ANSWERS, "quality": "up"}), 400, "choices.quality"),
        (ana.vote(pairs[1]["pair"], {**ANSWERS, "extra": "left"}), 400, "choices"),
        (ana.vote(pairs[1]["pair"], load_ms=-1), 400, "load_ms"),
        (ana.vote(pairs[1]["pair"], load_ms=float("nan")), 400, "load_ms"),
        (client.post("api/vote", headers=ana.headers, data="{not json"), 400, "JSON object"),
        (client.post("api/vote", headers=ana.headers, json=[1, 2]), 400, "JSON object"),
        (client.post("api/vote", headers=ana.headers, json={"pair": 7}), 400, "pair"),
        (client.post("api/vote", headers=ana.headers, json={"pair": "x" * 20_000}), 413, ""),
        (client.get("api/vote", headers=ana.headers), 405, ""),
        (client.post("api/next", headers=ana.headers), 405, ""),
    ]
    for reply, status, reason in refusals:
        assert reply.status_code == status, reply.get_data(as_text=True)
        assert reason in reply.json["error"]
    assert rows(arena_dir) == before


def test_a_new_server_resumes_the_schedule_and_gives_no_rater_a_pair_twice(arena_dir, tokens):
    first = Rater(server(arena_dir), tokens["ana"])
    voted = first.next()[0]["pair"]
    assert first.vote(voted).status_code == 200
    pending = first.next()
    restarted = Rater(server(arena_dir), tokens["ana"])
    assert restarted.next() == pending  # the same pairs, sides and videos as before the restart
    assert restarted.vote(pending[0]["pair"]).status_code == 200
    given = [voted, pending[0]["pair"]]
    for _ in range(40):  # to the end of the arena's 24 pairs, a fresh server every 5 votes
        if len(given) % 5 == 0:
            restarted = Rater(server(arena_dir), tokens["ana"])
        pairs = restarted.next()
        if not pairs:
            break
        assert restarted.vote(pairs[0]["pair"]).status_code == 200
        given.append(pairs[0]["pair"])
    assert len(given) == len(set(given)) == 24
    shown, votes = rows(arena_dir)
    assert sorted(r["pair"] for r in shown) == sorted(given)  # each given once, across the restarts
    assert len({r["vote"] for r in votes}) == 24
    assert len(votes) == 24 * len(QUESTIONS)
    server(arena_dir)  # a start compacts the tables that one-row appends fragmented
    for table in (shown_table(arena_dir, Storage()), votes_table(arena_dir, Storage())):
        assert len(lance.dataset(table.uri).get_fragments()) == 1
    assert rows(arena_dir) == (shown, votes)


def test_a_folder_that_is_not_an_arena_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"not an arena \(no arena.json"):
        Arena(str(tmp_path), Storage())
