"""Fixtures shared by every test: a leak check around each test."""

from __future__ import annotations

import fcntl
import gc
import os
import time
import weakref
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from greenserve.switch import RawFiber


def _open_fds() -> set[int]:
    # Listing /proc/self/fd opens a directory fd, listed too: it is closed on return, and
    # the test's first new fd takes its number (which must not count as there before).
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _live_greenlets() -> list[Any]:
    """gevent Greenlets not dead (started or scheduled), and raw greenlets running (the
    engine's connection fibers are raw greenlets: see switch.RawFiber)."""
    return [o for o in gc.get_objects()
            if (isinstance(o, gevent.Greenlet) and not o.dead)
            or (isinstance(o, RawFiber) and bool(o))]


@pytest.fixture(scope="session", autouse=True)
def _hub() -> None:
    # The hub's own fds (epoll, eventfd) and the resolver's thread pool exist for the
    # whole session: create them before the first fd snapshot.
    gevent.get_hub()
    gevent.get_hub().threadpool.spawn(lambda: None).get()


class LeakCheck:
    """What a test leaves behind: the fds it opened and the greenlets it made that are
    still open or running at its end (``finish`` fails on them).

    Cheap when nothing is left, as for almost every test: made before the test, it
    freezes the collector's generations (``gc.freeze``), so that at the end
    ``gc.get_objects()`` lists only what was made since, and no full collection runs
    before or after the test. Only when an fd or a running greenlet is left does
    ``finish`` collect what the test made (a cycle may hold a socket; an unreachable
    greenlet is killed when collected) and wait up to ``settle`` seconds for pending
    closes; before it reports a leak, one full collection (of everything, unfrozen)
    rules out a cycle through an older object. Does not nest: the freeze is
    process-wide.
    """

    def __init__(self) -> None:
        gc.freeze()
        self.fds = _open_fds()

    def finish(self, settle: float = 2.0) -> None:
        """Raise ``AssertionError`` naming what leaked (and kill the leaked greenlets)."""
        try:
            leaked_fds, leaked = self._leaks(settle)
        finally:
            gc.unfreeze()
        for g in leaked:
            if isinstance(g, gevent.Greenlet):
                g.kill(block=False)
            else:  # a raw greenlet: thrown into from the hub, as gevent's kill does
                gevent.get_hub().loop.run_callback(g.throw)
        details = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked_fds
                   if os.path.exists(f"/proc/self/fd/{fd}")}
        assert not leaked_fds, f"test leaked file descriptors: {details}"
        assert not leaked, f"test left greenlets running: {leaked}"

    def _leaks(self, settle: float) -> tuple[set[int], list[gevent.Greenlet]]:
        leaked_fds, leaked = self._left()
        if not leaked_fds and not leaked:
            return set(), []  # the fast path: nothing collected, nothing waited for
        del leaked  # a reference from here would keep a dropped greenlet alive
        deadline = time.monotonic() + settle
        while True:
            gc.collect()  # what the test made (the rest is frozen): cycles, dropped greenlets
            leaked_fds, leaked = self._left()
            if not leaked_fds and not leaked:
                return set(), []
            if time.monotonic() > deadline:
                break
            del leaked
            gevent.sleep(0.01)  # give pending closes a bounded chance to complete
        refs = [weakref.ref(g) for g in leaked]
        del leaked
        gc.unfreeze()
        gc.collect()  # everything: a cycle through an object older than the test
        return (_open_fds() - self.fds,
                [g for r in refs if (g := r()) is not None and not g.dead])

    def _left(self) -> tuple[set[int], list[gevent.Greenlet]]:
        # While frozen, gc.get_objects() lists only what was made since __init__.
        return _open_fds() - self.fds, _live_greenlets()


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves an fd open or a greenlet running."""
    if request.node.get_closest_marker("no_leak_check"):
        yield
        return
    check = LeakCheck()
    try:
        yield
    except BaseException:
        gc.unfreeze()
        raise
    check.finish()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A test CA and a server certificate for localhost / 127.0.0.1."""
    from .tls import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))
