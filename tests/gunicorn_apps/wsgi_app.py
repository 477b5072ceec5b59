"""A WSGI application for tests/test_gunicorn.py (run by gunicorn, monkey-patched).

Every answer is JSON naming who served it: ``pid`` (the worker), ``peer_port`` (the
client's port: the same on one keep-alive connection) and ``server`` (the environ's
SERVER_NAME:SERVER_PORT, i.e. which bind accepted it).

- ``GET /``: answers at once.
- ``GET /slow?id=X``: creates ``$GS_STATE_DIR/X.started`` holding the number of held
  requests in this worker counting itself, then waits (polling) until
  ``$GS_STATE_DIR/X.release`` exists, then answers: a request the test holds in flight.
- ``GET /sleep?s=S``: answers after ``S`` seconds (a request that takes its time).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import gevent

# How often a held request looks for its release file: short against the tests'
# deadlines, long enough to cost nothing.
POLL = 0.01
# A held request never outlives a broken test by much.
MAX_HOLD = 60.0


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    path = environ["PATH_INFO"]
    if path == "/slow":
        _hold(query["id"])
    elif path == "/sleep":
        gevent.sleep(float(query["s"]))
    elif path != "/":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    body = json.dumps({"pid": os.getpid(), "path": path, "id": query.get("id"),
                       "peer_port": environ.get("REMOTE_PORT"),
                       "server": f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"})
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body.encode()]


_held = 0  # /slow requests running in this worker


def _hold(name: str) -> None:
    global _held
    state = Path(os.environ["GS_STATE_DIR"])
    _held += 1
    try:
        (state / f"{name}.started").write_text(str(_held))
        deadline = time.monotonic() + MAX_HOLD
        while not (state / f"{name}.release").exists() and time.monotonic() < deadline:
            gevent.sleep(POLL)
    finally:
        _held -= 1
