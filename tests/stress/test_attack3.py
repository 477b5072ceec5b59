"""Third attack: the lean connection (``_gevent.Conn``) that ``net.run_server`` and
``tcp.Server.create`` now give each accepted connection, and ``Flow.socket`` made over
it on first use. Real clients on loopback, every wait bounded.

Failing tests are bugs (each docstring says what should happen and where it goes
wrong).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.select
import pytest
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from greenserve import Flow, Switch, net, tcp

from .support import wait_until
from .test_attack import connect_to

pytestmark = pytest.mark.timeout(20)

TIMEOUT = 5.0


@contextmanager
def serving(handler: Callable[[Flow, Any], object], **kw: Any) -> Iterator[Any]:
    """``run_server`` on 127.0.0.1 in a greenlet; yields the address to connect to.
    Stopped (and its handlers drained, then aborted) on exit."""
    stop = Event()
    errors: list[Exception] = []
    address: AsyncResult = AsyncResult()

    def run() -> None:
        with Switch() as sw:
            lsock = net.listen("127.0.0.1:0", sw=sw)
            address.set(("127.0.0.1", lsock.address.port))
            net.run_server(lsock, handler, on_error=errors.append, stop=stop,
                           drain_timeout=1.0, **kw)

    g = gevent.spawn(run)
    try:
        yield address.get(timeout=TIMEOUT)
    finally:
        stop.set()
        g.join(TIMEOUT)
        assert g.dead
        g.get()


def outcome_with_a_client(handler: Callable[[Flow, Any], object],
                          outcome: AsyncResult) -> Any:
    """Serve ``handler``, connect one client that sends nothing, and return what the
    handler put in ``outcome``."""
    with serving(handler) as addr:
        client = connect_to(addr)
        try:
            return outcome.get(timeout=TIMEOUT)
        finally:
            client.close()


def test_closing_flow_socket_wakes_a_read_waiting_on_the_flow() -> None:
    """net.md: a server's flow and its ``.socket`` are "the same connection" once the
    socket is made, and a close from another greenlet raises ``EBADF`` in a greenlet
    waiting on it (gevent's socket, and ``Flow`` over one, do: ``cancel_wait_ex``).
    Here the handler waits in ``flow.read()`` (on ``Conn``'s own read watcher) while a
    helper closes ``flow.socket``: gevent's ``close`` cancels only the gevent socket's
    watchers (``_gevent.py`` ``Conn.gevent_socket``: the ``Conn`` keeps its own
    ``_read``/``_write`` watchers, which nobody cancels), so the fd is closed under a
    libev watcher that stays started and the read never returns (only the test's
    ``gevent.Timeout`` ends it; without one it hangs, holding its slot, until a new
    connection reusing the fd number wakes it)."""
    outcome: AsyncResult = AsyncResult()

    def handler(flow: Flow, addr: Any) -> None:
        waiting = Event()

        def closer() -> None:
            waiting.wait()
            gevent.sleep(0)  # let the read park first
            flow.socket.close()

        helper = gevent.spawn(closer)
        try:
            waiting.set()
            with gevent.Timeout(2, False):
                try:
                    flow.read()
                    outcome.set("read returned")
                except OSError as exc:
                    outcome.set(exc)
                return
            outcome.set("read still blocked after the socket was closed")
        finally:
            helper.join(TIMEOUT)

    got = outcome_with_a_client(handler, outcome)
    assert isinstance(got, OSError), got


def test_close_does_not_throw_into_a_reader_whose_wait_already_ended() -> None:
    """``Conn.close`` (``_gevent.py`` ``_cancel_wait``) stops the waiter's watcher and
    schedules ``waiter.throw(EBADF)`` unconditionally. When the waiter's read ends
    another way before that callback runs (its timeout expired in the same loop
    iteration: here the hub is held up so that the closer's timer and the read's
    ``gevent.Timeout`` fire together), the ``EBADF`` is thrown anyway, later, into
    whatever the greenlet does next (or into the hub if it died: a traceback). gevent's
    own ``cancel_wait`` checks, when its callback runs, that the watcher is still
    waiting (a ``Flow`` over a gevent socket sleeps fine afterwards)."""
    outcome: AsyncResult = AsyncResult()

    def handler(flow: Flow, addr: Any) -> None:
        def closer() -> None:
            gevent.sleep(0.05)
            flow.close()

        def hold_up_the_hub() -> None:
            gevent.sleep(0.01)
            time.sleep(0.3)  # both timers below expire while the hub is held up

        helpers = [gevent.spawn(closer), gevent.spawn(hold_up_the_hub)]
        try:
            try:
                with gevent.Timeout(0.1):
                    flow.read()
            except gevent.Timeout:
                pass
            except OSError:
                outcome.set("the close came first: inconclusive")
                return
            try:
                gevent.sleep(0.1)
                outcome.set("ok")
            except OSError as exc:
                outcome.set(f"stray {exc!r} after the read had timed out")
        finally:
            gevent.joinall(helpers, timeout=TIMEOUT)

    got = outcome_with_a_client(handler, outcome)
    assert got == "ok", got


def _nonblocking_read_after_a_short_read(data_waiting: bool) -> Any:
    """What a server handler's ``flow.read()`` gives once ``flow.socket`` is made
    non-blocking, right after a short read (the flow's "drained" state)."""
    outcome: AsyncResult = AsyncResult()
    sent = Event()

    def handler(flow: Flow, addr: Any) -> None:
        try:
            assert flow.read() == b"abc"  # short: the next read would wait first
            flow.socket.setblocking(False)
            if data_waiting:
                flow.write(b"go")
                # gevent's select: wait (bounded) until the client's bytes are here.
                readable, _, _ = gevent.select.select([flow.fileno()], [], [], TIMEOUT)
                assert readable
            outcome.set(flow.read())
        except BaseException as exc:
            outcome.set(exc)
        sent.wait(TIMEOUT)

    with serving(handler) as addr:
        client = connect_to(addr)
        try:
            client.sendall(b"abc")
            if data_waiting:
                assert client.recv(2) == b"go"
                client.sendall(b"def")
            got = outcome.get(timeout=TIMEOUT)
        finally:
            sent.set()
            client.close()
    return got


def test_a_nonblocking_flow_reads_bytes_that_are_waiting() -> None:
    """With ``flow.socket.setblocking(False)`` ("the socket's timeout applies to the
    flow's reads and writes too", net.md) and bytes already in the kernel, ``read``
    must return them (a ``Flow`` over a gevent socket does). On the lean path it raises
    ``TimeoutError``: after a short read ``Conn.receive`` (``_gevent.py``) waits for
    readability *first* (``wait_first``) even with a timeout of 0.0, and ``_block``
    with a 0 s timer lets the timer win over the ready io watcher (libev runs the timer
    queued after the io event first). A handler that set ``idle_timeout`` then even
    has its connection closed as idle."""
    got = _nonblocking_read_after_a_short_read(data_waiting=True)
    assert got == b"def", got


def test_a_nonblocking_flow_with_nothing_to_read_raises_blocking_io_error() -> None:
    """(Also on the gevent-socket path: ``_gevent.receive`` has the same
    ``wait_first``.) A non-blocking socket with nothing to read raises
    ``BlockingIOError`` (gevent's ``recv``, and ``Conn.recv`` itself); ``flow.read``
    after a short read raises ``TimeoutError`` instead (the 0 s wait of
    ``wait_first``), which the engine, with ``idle_timeout`` set, takes for an idle
    connection."""
    got = _nonblocking_read_after_a_short_read(data_waiting=False)
    assert isinstance(got, BlockingIOError), got


def test_closing_the_reader_fails_a_writer_waiting_to_send() -> None:
    """``tcp.Server.create``: the reader closes the connection's socket while the
    writer still holds unsent bytes (its peer reads slowly) and waits for writability
    on a watcher of its own. gevent's socket close tells the loop first
    (``loop.closing_fd(fd)``: every watcher on the fd gets an event, so the writer's
    send fails with ``EBADF`` at once; before the lean connections the slot was free
    within ~0.2 s). ``Conn.close`` (``_gevent.py``) closes the stdlib socket without
    that: the writer's watcher stays started on a closed fd, ``flush`` never returns,
    and the server's ``writer.close()`` after the handler waits the whole
    ``CLOSE_FLUSH_TIMEOUT`` (30 s) holding the connection's slot (and a drain)."""
    outcome: AsyncResult = AsyncResult()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        reader.read_line()
        while writer.bytes_pending < 1 << 20:  # the kernel's buffers are full
            writer.write(b"x" * 65536)
            gevent.sleep(0.001)
        reader.close()
        try:
            with gevent.Timeout(2):
                writer.flush()
            outcome.set("flushed")
        except gevent.Timeout:
            outcome.set("flush still waiting 2 s after the socket was closed")
        except Exception as exc:
            outcome.set(exc)

    server = tcp.Server.create("127.0.0.1:0", handler, buffer_age_limit=None,
                               on_handler_error="ignore")
    client = gsocket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads
        client.settimeout(TIMEOUT)
        client.connect(("127.0.0.1", server.listening_on))
        client.sendall(b"hi\n")
        got = outcome.get(timeout=TIMEOUT)
        assert isinstance(got, Exception), got
        wait_until(lambda: server.stats()["active"] == 0, TIMEOUT, "connection released")
    finally:
        client.close()
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(TIMEOUT)
