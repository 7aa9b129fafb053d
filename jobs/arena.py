"""A human-preference arena: raters choose between two models' videos of the same condition, and the
models are ranked by Elo and Bradley–Terry, as the paper chose its curation thresholds.

    python jobs/arena.py new <arena_dir> lvd_f=<samples folder> unfiltered=<samples folder> [...]
    python jobs/arena.py add-rater <arena_dir> NAME          # prints the rater's private link (token)
    python jobs/arena.py <arena_dir> [host=127.0.0.1] [port=8750]     # serve (also: serve <arena_dir> …)
    python jobs/arena.py leaderboard <arena_dir> [out=<folder>] [draws=200]

A samples folder is one evaluation's step folder (`<run>/eval/<protocol>/step-<N>`, with samples.lance and
videos/, as jobs/evaluate.py writes it); jobs/ablate.py creates the arena of its recipes itself. The models
must have sampled the same conditions with the same seeds (the same protocol): each pair is two models'
videos of one condition. The arena folder (any URI) holds arena.json, raters.json, shown.lance and
votes.lance; a restarted server resumes from them.

Raters open the link `add-rater` printed (`http://<host>:<port>/#token=…`; behind a reverse proxy, the
proxy's address with the same #token). They answer three questions per pair (visual quality, prompt
following, motion) with ← (left), ↓ (equal), → (right) or the buttons. They never see model names.

`leaderboard` writes leaderboard.json and leaderboard.png (per question: scores with bootstrap 95 %
intervals, win-rate matrix, votes) to out= (default: the arena folder) and prints the ranking.

Exit status: 0 done; 1 the arena or its samples cannot be read; 2 bad arguments.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from svd.config import ConfigError, parse_settings
from svd.errors import described

COMMANDS = ("new", "add-rater", "serve", "leaderboard")
DEFAULT_PORT = 8750


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # 0.0.0.0 to take raters from other machines (or a reverse proxy)
    port: int = DEFAULT_PORT  # 0: any free port (printed)


@dataclass
class LeaderboardSettings:
    out: str = ""  # default: the arena folder
    draws: int = 200  # bootstrap resamplings of the votes
    seed: int = 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0 if argv else 2
    command, rest = (argv[0], argv[1:]) if argv[0] in COMMANDS else ("serve", argv)
    if not rest or "=" in rest[0]:
        print(f"arena: {command} needs the arena folder first (see --help)", file=sys.stderr)
        return 2
    arena_dir, rest = rest[0], rest[1:]
    from svd.data.storage import Storage

    storage = Storage.from_env()
    try:
        if command == "new":
            return new(arena_dir, rest, storage)
        if command == "add-rater":
            return add_rater(arena_dir, rest, storage)
        if command == "leaderboard":
            return leaderboard(arena_dir, parse_settings(LeaderboardSettings, rest), storage)
        return serve(arena_dir, parse_settings(ServeSettings, rest), storage)
    except ConfigError as e:
        print(f"arena: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a store or folder that cannot be read or written
        print(f"arena: {described(e)}", file=sys.stderr)
        return 1


def new(arena_dir: str, rest: list[str], storage) -> int:
    from svd.arena.catalog import create

    bad = [a for a in rest if "=" not in a]
    if bad or not rest:
        raise ConfigError(f"new: give models as name=<samples folder>; got {bad[0] if bad else 'none'!r}")
    models = dict(a.split("=", 1) for a in rest)
    print(f"arena of {len(models)} models: {create(arena_dir, models, storage)}")
    return 0


def add_rater(arena_dir: str, rest: list[str], storage) -> int:
    from svd.arena.catalog import Catalog
    from svd.arena.ledger import Raters

    if len(rest) != 1 or "=" in rest[0]:
        raise ConfigError("add-rater: give one rater NAME after the arena folder")
    Catalog.load(arena_dir, storage)  # an arena that exists
    token = Raters(arena_dir, storage).add(rest[0])
    print(f"rater {rest[0]}: token {token}")
    print(f"link: http://<host>:<port>/#token={token}   (keep it private; it is shown once)")
    return 0


def serve(arena_dir: str, settings: ServeSettings, storage) -> int:
    from svd.arena.app import serve as serve_app
    from svd.arena.service import Arena

    serve_app(Arena(arena_dir, storage), settings.host, settings.port)
    return 0


def leaderboard(arena_dir: str, settings: LeaderboardSettings, storage) -> int:
    import json

    from svd.arena.catalog import Catalog
    from svd.arena.leaderboard import leaderboard as board_of
    from svd.arena.leaderboard import plot
    from svd.arena.ledger import votes_table
    from svd.data.storage import join, write_whole

    if settings.draws < 10:
        raise ConfigError(f"draws={settings.draws} must be ≥ 10")
    catalog = Catalog.load(arena_dir, storage)
    board = board_of(
        votes_table(arena_dir, storage).rows(), catalog.models, draws=settings.draws, seed=settings.seed
    )
    out = settings.out or arena_dir
    for name, data in (
        ("leaderboard.json", json.dumps(board, indent=2).encode()),
        ("leaderboard.png", plot(board)),
    ):
        fs, path = storage.fsspec(join(out, name))
        write_whole(fs, path, data)
    print(f"{board['votes']} votes")
    for question, result in board["questions"].items():
        ranked = ", ".join(f"{r['model']} {r['bradley_terry']:.0f}" for r in result["ranking"])
        print(f"{question}: {ranked}")
    print(f"wrote {join(out, 'leaderboard.json')} and leaderboard.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
