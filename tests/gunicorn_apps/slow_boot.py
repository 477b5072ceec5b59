"""A ``Worker`` whose boot a test can catch, for tests/test_gunicorn.py.

``SlowBootWorker`` starts initialising (``init_process``), creates
``$GS_STATE_DIR/booting-<pid>``, then waits for ``$GS_STATE_DIR/go`` before it goes on
with the boot (monkey-patching, gunicorn's signal handlers, loading the application): a
signal the test sends in between arrives while the worker boots.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from greenserve.gunicorn import Worker

# Checking for the go file: short against the test's deadlines, cheap (the worker is
# not patched yet: this sleep blocks, and nothing else runs in the process).
POLL = 0.01
# A worker never waits longer than this for a test that broke.
MAX_WAIT = 30.0


class SlowBootWorker(Worker):  # type: ignore[misc]  # gunicorn is untyped
    def patch(self) -> None:
        state = Path(os.environ["GS_STATE_DIR"])
        (state / f"booting-{os.getpid()}").touch()
        deadline = time.monotonic() + MAX_WAIT
        while not (state / "go").exists() and time.monotonic() < deadline:
            time.sleep(POLL)
        super().patch()
