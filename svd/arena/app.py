"""The arena's web app (Flask): one page and three JSON/video routes, all at relative URLs, so it works on a
laptop and behind a reverse proxy at any prefix.

    GET  /                   the voting page (no secret in it: the rater's token is in the link's #fragment)
    GET  api/next            the rater's pending pairs: [{pair, left, right, caption}], the first on screen
    POST api/vote            {pair, choices: {question: left|right|equal}, load_ms}: written, then answered
    GET  api/video/<id>      one video of the arena's samples by its opaque id

Every api route needs the rater's token in the X-Arena-Token header. Refusals are JSON {"error": …} with a
4xx status and change nothing.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from svd.arena.service import QUESTIONS, Arena, RefusedError

PAGE = (Path(__file__).parent / "page.html").read_text().replace("__QUESTIONS__", json.dumps(QUESTIONS))
MAX_BODY_BYTES = 16 * 1024


def create_app(arena: Arena) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/")
    def page() -> Response:
        return Response(PAGE, mimetype="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/api/next")
    def next_pairs() -> Response:
        rater = arena.rater(request.headers.get("X-Arena-Token"))
        return jsonify(pairs=arena.pending(rater))

    @app.post("/api/vote")
    def vote() -> Response:
        rater = arena.rater(request.headers.get("X-Arena-Token"))
        voted = arena.vote(rater, request.get_json(silent=True))
        return jsonify(voted=voted, pairs=arena.pending(rater))

    @app.get("/api/video/<video_id>")
    def video(video_id: str) -> Response:
        arena.rater(request.headers.get("X-Arena-Token"))
        return Response(arena.video(video_id), mimetype="video/mp4", headers={"Cache-Control": "private"})

    @app.errorhandler(RefusedError)
    def refused(e: RefusedError) -> tuple[Response, int]:
        return jsonify(error=e.reason), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        return jsonify(error=e.description), e.code or 500

    return app


def serve(arena: Arena, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C (threaded: videos load while another rater votes)."""
    server = make_server(host, port, create_app(arena), threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(
        f"arena: serving {len(arena.catalog.pairs)} pairs on http://{host}:{server.server_port}/", flush=True
    )
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
