"""Fixtures shared by every test: a leak check around each test."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator

import gevent
import pytest


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _live_greenlets() -> list[gevent.Greenlet]:
    return [o for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead]


@pytest.fixture(scope="session", autouse=True)
def _hub() -> None:
    # The hub's own fds (epoll, eventfd) and the resolver's thread pool exist for the
    # whole session: create them before the first fd snapshot.
    gevent.get_hub()
    gevent.get_hub().threadpool.spawn(lambda: None).get()


def _settle(before: set[int], greenlets_before: set[int]) -> tuple[set[int], list[object]]:
    """Give pending closes a bounded chance to complete (waits on the condition)."""
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()
        leaked_fds = _open_fds() - before
        leaked = [g for g in _live_greenlets() if id(g) not in greenlets_before]
        if (not leaked_fds and not leaked) or time.monotonic() > deadline:
            return leaked_fds, leaked
        gevent.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves an fd open or a greenlet running."""
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    gc.collect()
    before = _open_fds()
    greenlets_before = {id(g) for g in _live_greenlets()}
    yield
    leaked_fds, leaked = _settle(before, greenlets_before)
    for g in leaked:
        g.kill(block=False)
    details = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked_fds
               if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked_fds, f"test leaked file descriptors: {details}"
    assert not leaked, f"test left greenlets running: {leaked}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A test CA and a server certificate for localhost / 127.0.0.1."""
    from .tls import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))
