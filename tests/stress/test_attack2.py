"""Second attack: lean connection fibers (switch.RawFiber), peer-gone by poll, reclaiming
(its wake-up-at-the-limit rule), the TLS Writer's 16 KiB writes. Real clients on
loopback, every wait bounded.

Failing tests are bugs (each docstring says what should happen and where it goes
wrong); passing tests guard invariants the attacks could not break.
"""

from __future__ import annotations

import contextvars
import hashlib
import socket
import struct
from typing import Any

import gevent
import pytest
from gevent.event import Event

from greenserve import Switch, net, tcp
from greenserve.errors import ConnectionReset

from ..helpers import tls_over
from .support import wait_until
from .test_attack import closing_server, connect_to, line_handler

pytestmark = pytest.mark.timeout(20)

TIMEOUT = 5.0


def port_of(lsock: Any) -> int:
    return int(lsock.address.port)


def reset(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- reclaiming ----------------------------------------------------------------------------


def test_drop_incoming_at_the_limit_does_not_reclaim_an_idle_connection() -> None:
    """At ``max_connections`` with ``set_drop_incoming_connections(True)``, nothing is
    accepted (tcp.md: at the limit nothing is accepted, so nothing is dropped either),
    so nothing may be reclaimed either: an idle client must not lose its connection for
    a client that would only be dropped. (The engine reclaimed for it, then dropped it.)"""
    server = tcp.Server.create("127.0.0.1:0", line_handler, max_connections=1)
    with closing_server(server):
        a = connect_to(("127.0.0.1", server.listening_on))
        try:
            a.sendall(b"one\n")
            assert a.recv(100) == b"ok one\n"
            server.set_drop_incoming_connections(True)
            b = connect_to(("127.0.0.1", server.listening_on))  # waits in the backlog
            try:
                a.sendall(b"two\n")  # a round trip after b arrived: a still served
                assert a.recv(100) == b"ok two\n", "the idle connection was reclaimed " \
                    "for a client that would be dropped"
                assert server.stats()["reclaimed"] == 0
                a.close()  # a slot frees: b is accepted, and dropped as asked
                assert b.recv(100) == b""
                wait_until(lambda: server.stats()["dropped"] == 1, TIMEOUT)
            finally:
                b.close()
        finally:
            a.close()


def test_one_reclaim_that_is_never_released_does_not_stop_reclaiming_for_good() -> None:
    """A handler inside ``reader.idle()`` that, once reclaimed, ignores its end of file
    and waits on something else (still inside ``idle()``) never releases its slot. The
    engine keeps ``_reclaiming`` set to that socket (``_acceptor.Acceptor._reclaim_one``
    / ``_update``: ``no reclaim in flight`` is required to watch at the limit), so no
    other idle connection is ever reclaimed again: here a second connection is idle and
    reclaimable, yet the waiting client is never admitted (starvation: one bad handler
    switches reclaiming off for the whole server until it ends). The reclaimed one is
    shut down already; it should not block further reclaims forever."""
    hold = Event()
    stubborn: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        while True:
            with reader.idle():
                line = reader.read_line()
                if line is None and not stubborn:
                    stubborn.append(addr)
                    hold.wait(TIMEOUT)  # ignores end of file, waits on something else
            if line is None:
                return
            writer.write(b"ok " + line + b"\n")

    server = tcp.Server.create("127.0.0.1:0", handler, max_connections=2)
    clients: list[Any] = []
    try:
        with closing_server(server):
            for name in (b"a", b"b"):
                c = connect_to(("127.0.0.1", server.listening_on))
                clients.append(c)
                c.sendall(name + b"\n")
                assert c.recv(100) == b"ok " + name + b"\n"
            third = connect_to(("127.0.0.1", server.listening_on), timeout=3.0)
            clients.append(third)
            third.sendall(b"c\n")
            wait_until(lambda: bool(stubborn), TIMEOUT, "a reclaimed the stubborn one")
            try:
                answer = third.recv(100)
            except TimeoutError:
                answer = None
            assert answer == b"ok c\n", "b was idle and reclaimable, the client waited " \
                "for 3 s: reclaiming stuck behind a reclaim that was never released"
    finally:
        hold.set()
        for c in clients:
            c.close()


def test_reclaim_counts_are_exact_one_for_one() -> None:
    """Guard: three idle connections at the limit, three new clients one after the
    other: three reclaims, each new client served, never above the limit."""
    server = tcp.Server.create("127.0.0.1:0", line_handler, max_connections=3)
    clients: list[Any] = []
    try:
        with closing_server(server):
            for i in range(6):
                c = connect_to(("127.0.0.1", server.listening_on))
                clients.append(c)
                c.sendall(b"%d\n" % i)
                assert c.recv(100) == b"ok %d\n" % i
            stats = server.stats()
            assert stats["reclaimed"] == 3
            assert stats["peak_active"] == 3
            for c in clients[:3]:
                assert c.recv(100) == b""
    finally:
        for c in clients:
            c.close()


# -- the TLS Writer ------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_peer_that_resets_mid_write_is_a_connection_reset(tls: bool, certs: Any) -> None:
    """Writer (stream.md / its docstring): when the peer is gone the writer fails with
    ``ConnectionReset`` and sets ``consumer_left``. Over TLS a reset peer (RST while
    megabytes are pending) makes OpenSSL report ``SSLEOFError`` (errno 8), which
    ``stream._translated``/``errors.translate`` leave as is (not in ``_RESET_ERRNOS``):
    ``Writer._fail`` then sets neither ``_peer_left`` nor ``consumer_left``, and
    ``flush`` raises a raw ``ssl.SSLEOFError``. A handler waiting on ``consumer_left``
    (the documented way to notice a gone consumer) is never woken. Plain TCP does it
    right (the plain case passes)."""
    got: dict[str, Any] = {}
    done = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        try:
            writer.write(b"x" * 4_000_000)
            got["left"] = writer.consumer_left.wait(2.0)
            try:
                writer.flush()
            except Exception as exc:
                got["flush"] = exc
        finally:
            done.set()

    ctx = certs.server_context() if tls else None
    server = tcp.Server.create("127.0.0.1:0", handler, ssl_context=ctx,
                               buffer_age_limit=None, on_handler_error="ignore")
    with closing_server(server):
        raw = connect_to(("127.0.0.1", server.listening_on))
        client: Any = raw
        if tls:
            client = tls_over(raw, certs.client_context())
        try:
            assert client.recv(1000)
        finally:
            reset(client)
        assert done.wait(TIMEOUT)
    what = "TLS" if tls else "plain"
    assert got["left"] is True, f"{what}: consumer_left not set after a reset"
    assert isinstance(got["flush"], ConnectionReset), f"{what}: {got['flush']!r}"


def test_tls_large_mixed_writes_arrive_byte_exact_and_flush_returns(certs: Any) -> None:
    """Guard: writes of 1 B .. 1 MB (bytes, bytearray, memoryview), flushes in between,
    a client reading in small pieces with pauses, buffer_age_limit on: every byte in
    order, every flush returns, no age failure."""
    payload = hashlib.sha256(b"seed").digest() * (2_000_000 // 32)
    flushed = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        sizes = [1, 16383, 16384, 16385, 70000, 1_000_000, 5]
        pos = i = 0
        while pos < len(payload):
            chunk = payload[pos:pos + sizes[i % len(sizes)]]
            writer.write((chunk, bytearray(chunk), memoryview(chunk))[i % 3])
            pos += len(chunk)
            i += 1
            if i % 5 == 0:
                writer.flush()
        writer.flush()
        flushed.set()
        reader.read_line()

    server = tcp.Server.create("127.0.0.1:0", handler, ssl_context=certs.server_context(),
                               buffer_age_limit=1.0)
    with closing_server(server):
        raw = connect_to(("127.0.0.1", server.listening_on))
        client = tls_over(raw, certs.client_context())
        try:
            got = bytearray()
            n = 0
            while len(got) < len(payload):
                data = client.recv(3000)
                if not data:
                    break
                got += data
                n += 1
                if n % 50 == 0:
                    gevent.sleep(0.001)
            assert bytes(got) == payload
            assert flushed.wait(TIMEOUT)
            client.sendall(b"bye\n")
        finally:
            client.close()
        assert server.stats()["handler_errors"] == 0


# -- lean connection fibers ----------------------------------------------------------------


# (A handler in gevent.sleep waits on a hub timer like "timeout" and "own_timeouts".)
KINDS = ["read", "event", "timeout", "nested", "nested_fork", "spawn_join",
         "sleep0_loop", "own_timeouts"]


def _block(kind: str, flow: Any) -> None:
    if kind == "read":
        flow.read()
    elif kind == "event":
        Event().wait()
    elif kind == "timeout":
        with gevent.Timeout(100):
            Event().wait()
    elif kind == "nested":
        with Switch() as inner:
            inner.fork(Event().wait)
            Event().wait()
    elif kind == "nested_fork":
        with Switch() as inner:
            inner.fork(gevent.sleep, 100)
    elif kind == "spawn_join":
        g = gevent.spawn(gevent.sleep, 100)
        try:
            g.join()
        finally:
            g.kill()
    elif kind == "sleep0_loop":
        while True:
            gevent.sleep(0)
    else:
        while True:
            try:
                with gevent.Timeout(0.001):
                    Event().wait()
            except gevent.Timeout:
                pass


@pytest.mark.parametrize("how", ["cancel", "drain"])
def test_cancellation_reaches_handlers_blocked_anywhere(how: str) -> None:
    """Guard: run_server's lean fibers blocked in a read, sleep, Event.wait, a
    gevent.Timeout block, nested switches, a joined child greenlet, a sleep(0) loop, a
    loop of their own Timeouts: sw.cancel() and a drain that aborts both end them all."""
    started: list[str] = []
    ended: list[str] = []
    kinds = iter(KINDS)

    def handler(flow: Any, addr: Any) -> None:
        kind = next(kinds)
        started.append(kind)
        try:
            _block(kind, flow)
        finally:
            ended.append(kind)

    stop = Event()
    clients: list[Any] = []
    try:
        with gevent.Timeout(TIMEOUT), Switch() as sw:
            lsock = net.listen("127.0.0.1:0", sw=sw)
            sw.fork(net.run_server, lsock, handler, on_error=print, stop=stop,
                    drain_timeout=0.1)
            for _ in KINDS:
                clients.append(connect_to(("127.0.0.1", port_of(lsock))))
            wait_until(lambda: len(started) == len(KINDS), TIMEOUT)
            if how == "cancel":
                sw.cancel()
            else:
                stop.set()
    finally:
        for c in clients:
            c.close()
    assert sorted(ended) == sorted(KINDS)


def test_connections_cancelled_before_their_fibers_start_are_all_closed() -> None:
    """Guard: 40 connections accepted in one batch; the first handler closes the server
    with its connections before the others' fibers start: one handler call, every
    client sees end of file, nothing leaked."""
    calls: list[Any] = []
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        calls.append(addr)
        if len(calls) == 1:
            server.close(close_existing_connections=True)
        reader.read_line()

    server = tcp.Server.create("127.0.0.1:0", handler, max_accepts_per_batch=100,
                               max_connections=None)
    clients = []
    try:
        # Blocking stdlib connects: the hub does not run until all 40 are in the backlog.
        clients = [socket.create_connection(("127.0.0.1", int(server.listening_on)))
                   for _ in range(40)]
        assert server.close_finished.wait(TIMEOUT)
        for c in clients:
            c.settimeout(TIMEOUT)
            assert c.recv(10) == b""
        assert len(calls) == 1
        assert server.num_connections == 0
    finally:
        for c in clients:
            c.close()
        server.close(close_existing_connections=True)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), gevent.Timeout()],
                         ids=["SystemExit", "KeyboardInterrupt", "stray-Timeout"])
def test_a_base_exception_from_a_handler_fails_the_servers_switch(exc: BaseException
                                                                  ) -> None:
    """Guard: a BaseException escaping a lean fiber's handler fails run_server's switch
    with that very object (not lost, not the hub's)."""
    errors: list[Exception] = []

    def handler(flow: Any, addr: Any) -> None:
        flow.read()
        raise exc

    client = None
    with pytest.raises(BaseException) as raised, \
            gevent.Timeout(TIMEOUT, AssertionError("not failed")), Switch() as sw:
        lsock = net.listen("127.0.0.1:0", sw=sw)
        sw.fork(net.run_server, lsock, handler, on_error=errors.append)
        client = connect_to(("127.0.0.1", port_of(lsock)))
        client.sendall(b"x")
        Event().wait()
    if client is not None:
        client.close()
    assert raised.value is exc
    assert errors == []


CV: contextvars.ContextVar[str] = contextvars.ContextVar("attack2", default="unset")


def test_handlers_see_the_creators_context_and_do_not_leak_theirs() -> None:
    """Guard: contextvars set by run_server's caller are seen by each lean fiber; a
    handler's set stays its own (the next handler and the caller see the creator's)."""
    seen: list[str] = []

    def handler(flow: Any, addr: Any) -> None:
        seen.append(CV.get())
        CV.set(f"handler-{len(seen)}")
        flow.write(b"!")

    stop = Event()
    token = CV.set("creator")
    try:
        with gevent.Timeout(TIMEOUT), Switch() as sw:
            lsock = net.listen("127.0.0.1:0", sw=sw)
            sw.fork(net.run_server, lsock, handler, on_error=print, stop=stop)
            for _ in range(3):
                c = connect_to(("127.0.0.1", port_of(lsock)))
                try:
                    assert c.recv(10) == b"!"
                finally:
                    c.close()
            stop.set()
        assert CV.get() == "creator"
    finally:
        CV.reset(token)
    assert seen == ["creator"] * 3


def test_a_handler_error_is_reported_exactly_once() -> None:
    """Guard: an Exception from a lean fiber's handler goes to on_error once; a handler
    that closed its own socket then raised ConnectionResetError is a handler error
    (its socket cannot say the peer left), once too."""
    errors: list[Exception] = []

    def handler(flow: Any, addr: Any) -> None:
        if flow.read() == b"close\n":
            flow.close()
            raise ConnectionResetError("mine")
        raise ValueError("boom")

    stop = Event()
    with gevent.Timeout(TIMEOUT), Switch() as sw:
        lsock = net.listen("127.0.0.1:0", sw=sw)
        sw.fork(net.run_server, lsock, handler, on_error=errors.append, stop=stop)
        for msg in (b"x\n", b"close\n"):
            c = connect_to(("127.0.0.1", port_of(lsock)))
            try:
                c.sendall(msg)
                assert c.recv(10) == b""
            finally:
                c.close()
        wait_until(lambda: len(errors) == 2, TIMEOUT)
        stop.set()
    assert [type(e) for e in errors] == [ValueError, ConnectionResetError]
