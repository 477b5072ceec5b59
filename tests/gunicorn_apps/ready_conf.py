"""gunicorn config for tests/test_gunicorn.py: log when a worker is ready to serve.

``post_worker_init`` runs in the worker after its signal handlers are installed and the
application is loaded, just before the worker starts accepting: a test that signals a
worker waits for this line first.
"""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    worker.log.info("Worker ready (pid: %s)", worker.pid)
