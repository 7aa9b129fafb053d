"""The arena in a real headless browser (Debian's chromium, driven by selenium) against a real server process:
two raters vote through 20 pairs each, one with the keyboard and one with the mouse (alternating), while the
server is killed (SIGKILL) and restarted between votes. Every acknowledged vote is in the table, no rater
is shown a pair twice, and the leaderboard of those votes equals an independent Bradley–Terry fit."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from svd.arena.leaderboard import leaderboard
from svd.arena.ledger import shown_table, votes_table
from svd.arena.service import QUESTIONS
from svd.data.local_s3 import free_port
from svd.data.storage import Storage

from .test_leaderboard import independent_bradley_terry

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PAIRS_EACH = 20
VISITS = itertools.count()
KEYS = {"left": "ARROW_LEFT", "right": "ARROW_RIGHT", "equal": "ARROW_DOWN"}


class Server:
    """`jobs/arena.py serve` as a process on 127.0.0.1."""

    def __init__(self, arena_dir: str, port: int):
        self.process = subprocess.Popen(
            [sys.executable, "jobs/arena.py", "serve", arena_dir, f"port={port}"],
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.process.stdout.readline()  # printed once the socket listens
        assert "serving 24 pairs" in line, line + self.process.stdout.read()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("no chromium/chromedriver: run infra/browser/install.sh (CI does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--mute-audio",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def state(driver) -> dict[str, str]:
    return driver.execute_script("return Object.assign({}, document.body.dataset)")


def wait_for(driver, condition, timeout: float = 60.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = state(driver)
        if condition(now):
            return now
        time.sleep(0.02)
    raise AssertionError(
        f"page stuck in {state(driver)}; status: {driver.find_element('id', 'status').text!r}"
    )


def vote_in_page(driver, by_keyboard: bool, sides: list[str]) -> str:
    """Answer the three questions of the pair on screen; returns its id once the next pair is up."""
    from selenium.webdriver.common.keys import Keys

    pair = wait_for(driver, lambda s: s.get("state") == "asking")["pair"]
    for question, side in zip(QUESTIONS, sides, strict=True):
        wait_for(driver, lambda s, q=question: s.get("state") == "asking" and s.get("question") == q)
        if by_keyboard:
            driver.find_element("tag name", "body").send_keys(getattr(Keys, KEYS[side]))
        else:
            driver.find_element("id", f"choose-{side}").click()
    wait_for(
        driver, lambda s: s.get("state") == "done" or (s.get("state") == "asking" and s.get("pair") != pair)
    )
    return pair


def pending(port: int, token: str) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/next", headers={"X-Arena-Token": token})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)["pairs"]


def requested(driver) -> str:
    """Every URL the page has fetched, one per line."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).join('\\n')"
    )


def open_as(driver, port: int, token: str) -> str:
    """Load the page as this rater (a fresh load each time: the query differs); returns the pair on screen."""
    driver.get(f"http://127.0.0.1:{port}/?visit={next(VISITS)}#token={token}")
    return wait_for(driver, lambda s: s.get("state") == "asking")["pair"]


@pytest.mark.slow
def test_two_raters_vote_20_pairs_each_in_a_browser_across_a_killed_server(
    browser, arena_dir, tokens, sample_folders
):
    port = free_port()
    server = Server(arena_dir, port)
    voted: dict[str, list[str]] = {name: [] for name in tokens}
    cycle = list(KEYS)
    tabs = {}  # each rater votes in a tab of their own, going from pair to pair without reloading
    try:
        for name, token in tokens.items():
            if tabs:
                browser.switch_to.new_window("tab")
            tabs[name] = browser.current_window_handle
            open_as(browser, port, token)
            upcoming = pending(port, token)[
                1
            ]  # while the first pair is on screen, the next one's videos load
            wait_for(
                browser,
                lambda s, u=upcoming: all(
                    f"api/video/{u[k]}" in requested(browser) for k in ("left", "right")
                ),
            )
        for round_ in range(PAIRS_EACH):
            if round_ == 7:  # between votes, without warning; the raters reload their pages on the new server
                server.kill()
                server = Server(arena_dir, port)
                for name, token in tokens.items():
                    browser.switch_to.window(tabs[name])
                    on_screen = state(browser)["pair"]
                    assert open_as(browser, port, token) == on_screen  # the schedule resumed
            for r, name in enumerate(tokens):
                browser.switch_to.window(tabs[name])
                sides = [cycle[(round_ + r + k) % 3] for k in range(len(QUESTIONS))]
                voted[name].append(vote_in_page(browser, by_keyboard=(round_ + r) % 2 == 0, sides=sides))
    finally:
        server.stop()
    votes = votes_table(arena_dir, Storage()).rows()
    shown = shown_table(arena_dir, Storage()).rows()
    for name in tokens:
        assert len(voted[name]) == len(set(voted[name])) == PAIRS_EACH
        mine = [r for r in votes if r["rater"] == name]
        assert len({r["vote"] for r in mine}) == PAIRS_EACH
        assert sorted({r["pair"] for r in mine}) == sorted(voted[name])
        given = [r["pair"] for r in shown if r["rater"] == name]
        assert len(given) == len(set(given))  # no pair given to a rater twice, across the restart
    assert len({r["vote"] for r in votes}) == 2 * PAIRS_EACH
    assert len(votes) == 2 * PAIRS_EACH * len(QUESTIONS)
    assert {r["side"] for r in votes} == set(KEYS)
    assert all(r["load_ms"] > 0 for r in votes)
    board = leaderboard(votes, list(sample_folders), draws=20)
    for question in QUESTIONS:
        expected = independent_bradley_terry(
            [r for r in votes if r["question"] == question], list(sample_folders)
        )
        got = {e["model"]: e["bradley_terry"] for e in board["questions"][question]["ranking"]}
        assert [got[m] for m in sample_folders] == pytest.approx(list(expected), abs=1e-3)
