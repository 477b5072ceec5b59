"""What guards the suite itself.

The leak check that runs around every test (conftest's ``no_leaks``) fails a test that
leaves an fd open or a greenlet running, and only then: what was there before the test,
and what the test left to the collector or to a close still pending, is not a leak.
Its tests run the check themselves (``LeakCheck``, what the fixture runs): it cannot
nest (it freezes the collector's generations), so the fixture is off for them, and each
test cleans up what it leaked on purpose.

``helpers.closed_by_server``, which many tests assert, is false for a connection the
server keeps open.
"""

from __future__ import annotations

import gc
import socket
import warnings

import gevent
import pytest
from gevent.event import Event

from .conftest import LeakCheck, _open_fds
from .helpers import closed_by_server, reset

SETTLE = 0.05  # the fixture's is 2 s: these leaks are real, waiting longer changes nothing

# The leak check cannot nest: the fixture is off for the tests that run it.
runs_the_check = pytest.mark.no_leak_check


@runs_the_check
def test_an_fd_left_open_fails_the_check() -> None:
    check = LeakCheck()
    leaked = socket.socket()
    try:
        # The first fd a test opens takes the number of the one the check's listing of
        # /proc/self/fd had: it is seen, and named.
        expected = f"leaked file descriptors: {{{leaked.fileno()}: 'socket:\\[[0-9]+\\]'}}\n"
        with pytest.raises(AssertionError, match=expected):
            check.finish(SETTLE)
    finally:
        leaked.close()
    assert gc.get_freeze_count() == 0


@runs_the_check
def test_a_greenlet_left_running_fails_the_check() -> None:
    check = LeakCheck()
    never = Event()
    leaked = gevent.spawn(never.wait)
    gevent.sleep(0)  # it runs, and blocks
    try:
        with pytest.raises(AssertionError, match="left greenlets running"):
            check.finish(SETTLE)
    finally:
        leaked.kill()  # the check killed it already (without waiting): this waits
    assert leaked.dead and gc.get_freeze_count() == 0


@runs_the_check
def test_a_greenlet_started_at_the_very_end_is_seen() -> None:
    check = LeakCheck()
    leaked = gevent.spawn_later(60, lambda: None)  # not started when the test ends
    try:
        with pytest.raises(AssertionError, match="left greenlets running"):
            check.finish(SETTLE)
    finally:
        leaked.kill()
    assert leaked.dead


@runs_the_check
def test_what_was_there_before_and_what_is_let_go_is_no_leak() -> None:
    older_sock = socket.socket()
    older = gevent.spawn(Event().wait)
    gevent.sleep(0)
    try:
        check = LeakCheck()
        # A socket only a garbage cycle holds: the collector closes it (with a warning
        # that it was not closed, which is not the leak check's business).
        cycle: list[object] = [socket.socket()]
        cycle.append(cycle)
        del cycle
        # A close still pending when the test ends.
        pending = socket.socket()
        gevent.spawn_later(0.01, pending.close)
        # A greenlet that ends on its own, soon.
        gevent.spawn(gevent.sleep, 0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            check.finish(settle=2.0)
        assert gc.get_freeze_count() == 0
    finally:
        older.kill()
        older_sock.close()


@runs_the_check
def test_nothing_left_takes_the_fast_path() -> None:
    # Nothing made and left: no collection (the frozen heap is not even scanned).
    fds = _open_fds()
    gc.disable()  # only the check may collect here
    try:
        check = LeakCheck()
        collections = [g["collections"] for g in gc.get_stats()]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        gevent.spawn(lambda: None).join()
        check.finish(SETTLE)
        assert [g["collections"] for g in gc.get_stats()] == collections
    finally:
        gc.enable()
    assert _open_fds() == fds


# -- closed_by_server --------------------------------------------------------------------


def test_closed_by_server_is_false_while_the_server_keeps_the_connection_open() -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        with socket.create_connection(lsock.getsockname(), timeout=10) as c:
            server, _ = lsock.accept()
            with server:
                server.sendall(b"data, then nothing")
                assert closed_by_server(c, timeout=0.05) is False
                assert c.gettimeout() == 10  # left as it was
                server.close()
                assert closed_by_server(c) is True


def test_closed_by_server_is_true_for_a_reset() -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        with socket.create_connection(lsock.getsockname(), timeout=10) as c:
            server, _ = lsock.accept()
            reset(server)
            assert closed_by_server(c, timeout=0.05) is True
