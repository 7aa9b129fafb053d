"""jobs/arena.py as an organiser uses it (new, add-rater, leaderboard), its one-line refusals, and the app
mounted under a reverse proxy's prefix."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import lance
import pyarrow as pa
import pytest
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

from svd.arena.app import PAGE, create_app
from svd.arena.service import Arena
from svd.data.storage import Storage

from .conftest import write_samples

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def arena_main():
    return runpy.run_path(str(ROOT / "jobs" / "arena.py"))["main"]


def test_an_organiser_creates_an_arena_adds_raters_and_reads_an_empty_leaderboard(
    arena_main, sample_folders, tmp_path, capsys
):
    arena_dir = str(tmp_path / "arena")
    models = [f"{name}={folder}" for name, folder in sample_folders.items()]
    assert arena_main(["new", arena_dir, *models]) == 0
    assert arena_main(["new", arena_dir, *models]) == 0  # the same arena again: kept, salt and all
    salt = json.loads((tmp_path / "arena" / "arena.json").read_text())["salt"]
    assert arena_main(["add-rater", arena_dir, "ana"]) == 0
    token = re.search(r"token=(\S+)", capsys.readouterr().out).group(1)
    assert Arena(arena_dir, Storage()).rater(token) == "ana"
    assert token not in (tmp_path / "arena" / "raters.json").read_text()  # only its digest is kept
    assert json.loads((tmp_path / "arena" / "arena.json").read_text())["salt"] == salt
    assert arena_main(["leaderboard", arena_dir, "draws=10"]) == 0
    board = json.loads((tmp_path / "arena" / "leaderboard.json").read_text())
    assert board["votes"] == 0
    assert {e["bradley_terry"] for e in board["questions"]["quality"]["ranking"]} == {1000.0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["new", "{dir}", "only={static}"], "at least 2 models, got 1"),
        (["new", "{dir}", "a={static}", "b/c={moving}"], "model name 'b/c'"),
        (["new", "{dir}", "a={static}", "b={dir}/none"], "cannot be read as a samples table"),
        (["new", "{dir}", "a={static}", "b"], "give models as name=<samples folder>"),
        (["add-rater", "{dir}", "ana"], "not an arena (no arena.json"),
        (["serve", "{dir}", "port=80x"], "port"),
        (["leaderboard", "{dir}", "draws=3"], "draws=3 must be ≥ 10"),
        (["add-rater"], "needs the arena folder first"),
    ],
)
def test_a_mistake_is_one_line_naming_it(arena_main, sample_folders, tmp_path, capsys, args, message):
    values = {"dir": str(tmp_path / "arena"), **sample_folders}
    argv = [a.format(**values) for a in args]
    if argv[0] in ("serve", "leaderboard"):
        assert arena_main(["new", values["dir"], *(f"{k}={v}" for k, v in sample_folders.items())]) == 0
        capsys.readouterr()
    assert arena_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_a_rater_name_is_taken_once(arena_dir, tokens):
    from svd.arena.ledger import Raters
    from svd.config import ConfigError

    with pytest.raises(ConfigError, match="rater 'ana' exists already"):
        Raters(arena_dir, Storage()).add("ana")
    with pytest.raises(ConfigError, match=r"rater name '\.\./x'"):
        Raters(arena_dir, Storage()).add("../x")


def test_behind_a_reverse_proxy_prefix_the_page_and_its_requests_work(arena_dir, tokens):
    requested = re.findall(r'(?:fetch|api)\("([^"]*)"', PAGE)
    assert sorted(set(requested)) == ["api/next", "api/video/", "api/vote"]  # relative: under any prefix
    assert "/api" not in PAGE
    proxied = DispatcherMiddleware(
        lambda env, start: [], {"/team/arena": create_app(Arena(arena_dir, Storage()))}
    )
    client = Client(proxied)
    assert b"Which video is better?" in client.get("/team/arena/").data
    headers = {"X-Arena-Token": tokens["ana"]}
    pairs = client.get("/team/arena/api/next", headers=headers).json["pairs"]
    assert client.get(f"/team/arena/api/video/{pairs[0]['left']}", headers=headers).status_code == 200
    body = {
        "pair": pairs[0]["pair"],
        "choices": {"quality": "left", "prompt": "left", "motion": "left"},
        "load_ms": 1,
    }
    assert client.post("/team/arena/api/vote", headers=headers, json=body).json["voted"] == 1


def test_help_names_every_command(arena_main, capsys):
    assert arena_main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("new", "add-rater", "leaderboard", "host=127.0.0.1"):
        assert command in out
    assert arena_main([]) == 2  # nothing given: the help, and a failing status


def _rewrite(folder: Path, column: str, value) -> None:
    """The samples table of `folder` with `column` of condition 0 set to `value`."""
    rows = lance.dataset(str(folder / "samples.lance")).to_table().to_pylist()
    rows[0][column] = value
    lance.write_dataset(pa.Table.from_pylist(rows), str(folder / "samples.lance"), mode="overwrite")


def test_samples_of_different_clips_or_with_paths_outside_their_folder_are_refused(tmp_path):
    from svd.arena.catalog import create
    from svd.config import ConfigError

    for name in ("a", "b"):
        write_samples(tmp_path / name, ("a", "b").index(name), 2)
    models = {name: str(tmp_path / name) for name in ("a", "b")}
    _rewrite(tmp_path / "b", "clip_id", "another clip")
    with pytest.raises(
        ConfigError, match=r"condition 0 is clip 'clip0' in a's samples but \['another clip'\]"
    ):
        create(str(tmp_path / "arena"), models, Storage())
    _rewrite(tmp_path / "b", "clip_id", "clip0")
    _rewrite(tmp_path / "b", "video", "../a/videos/000000-m127.mp4")
    with pytest.raises(ConfigError, match=r"video '\.\./a/videos/000000-m127\.mp4' is not a path inside"):
        create(str(tmp_path / "arena"), models, Storage())
    assert not (tmp_path / "arena").exists()
