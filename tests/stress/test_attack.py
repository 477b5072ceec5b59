"""Attacks on what changed in this session: reclaiming idle connections, ``peer_left``,
the TLS ``Writer`` sending from the hub. Real clients on loopback (TCP, unix sockets in
a tmp dir, TLS), every wait bounded.

Failing tests are bugs (each docstring says what should happen and where it goes
wrong); passing tests guard invariants the attacks could not break.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event

from greenserve import Switch, Writer, net, tcp

from ..helpers import tls_over
from .support import wait_until

pytestmark = pytest.mark.timeout(20)

TIMEOUT = 5.0


# -- clients ---------------------------------------------------------------------------------


def connect_to(addr: Any, timeout: float = TIMEOUT) -> gsocket.socket:
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def tls_connect(addr: Any, certs: Any) -> gssl.SSLSocket:
    return tls_over(connect_to(addr), certs.client_context())


def rst(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_exactly(sock: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


class BioClient:
    """A TLS client whose records the test holds in hand (``MemoryBIO``), to send a
    record whole or in pieces over a plain socket."""

    def __init__(self, sock: gsocket.socket, certs: Any) -> None:
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = certs.client_context().wrap_bio(self._in, self._out,
                                                    server_hostname="localhost")
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(65536)
                if not data:
                    raise EOFError("server closed during the handshake") from None
                self._in.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def record(self, data: bytes) -> bytes:
        """The TLS record(s) carrying ``data``, not sent."""
        self._obj.write(data)
        return self._out.read()

    def recv(self) -> bytes:
        """Decrypted bytes, ``b""`` at end of file (or a reset)."""
        while True:
            try:
                return self._obj.read(65536)
            except ssl.SSLWantReadError:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    return b""
                if not data:
                    return b""
                self._in.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def close(self) -> None:
        self.sock.close()


def line_handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
    """A line protocol waiting for each line inside ``reader.idle()``."""
    while True:
        with reader.idle():
            line = reader.read_line()
        if line is None:
            return
        writer.write(b"ok " + line + b"\n")


def line_server(**kw: Any) -> tuple[Any, Callable[[], Any]]:
    """A ``tcp.Server`` running :func:`line_handler`; returns it and the address to
    connect to."""
    where = kw.pop("where", "127.0.0.1:0")
    server = tcp.Server.create(where, line_handler, **kw)
    return server, lambda: (where[5:] if where.startswith("unix:")
                            else ("127.0.0.1", server.listening_on))


@contextmanager
def closing_server(server: Any) -> Iterator[Any]:
    try:
        yield server
    finally:
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(TIMEOUT)


# -- 1. the TLS Writer ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_a_client_that_stops_reading_only_loses_its_connection(transport: str,
                                                               certs: Any) -> None:
    """``buffer_age_limit``: "the server shuts the connection down and cancels its
    handler ... It is not a handler error" (tcp.md). Over TLS it is: ``tcp.py``'s
    ``_writer_failed`` calls ``acceptor.abort_connection(sock)`` with the TLS wrapper,
    and ``Acceptor.abort_connection`` looks it up in ``_conns`` (keyed by the accepted
    socket, not the wrapper: it should map it through ``_owner_of``), so nothing is
    aborted; the handler's next write raises ``WriterBufferAgeExceeded``, a handler
    error, and with the default ``on_handler_error="raise"`` one slow TLS client closes
    the whole server."""
    ended: list[BaseException] = []

    def producer(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        try:
            for _ in range(2000):
                writer.write(b"x" * 65536)
                gevent.sleep(0.005)
        except BaseException as exc:
            ended.append(exc)
            raise

    ctx = certs.server_context() if transport == "tls" else None
    server = tcp.Server.create("127.0.0.1:0", producer, max_connections=4,
                               buffer_age_limit=0.3, ssl_context=ctx)
    with closing_server(server):
        addr = ("127.0.0.1", server.listening_on)
        client = tls_connect(addr, certs) if transport == "tls" else connect_to(addr)
        try:
            client.sendall(b"hi\n")  # and never reads
            wait_until(lambda: server.stats()["active"] == 0, TIMEOUT, "connection ended")
            stats = server.stats()
            assert not server.is_closed, f"one slow client closed the server: {ended}"
            assert stats["handler_errors"] == 0, ended
        finally:
            client.close()


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_a_reader_keeping_pace_is_never_cut_by_buffer_age_limit(transport: str,
                                                                certs: Any) -> None:
    """The writer is always 256 KiB ahead of a reader that takes 16 KiB every 2 ms: no
    byte waits longer than ~0.1 s, far below ``buffer_age_limit=0.5``. Over TLS the
    writer fails anyway: ``tls_send_nowait`` (``_gevent.py``) returns 0 bytes taken on
    ``SSLWantWriteError`` although OpenSSL (no ``SSL_MODE_ENABLE_PARTIAL_WRITE``) has
    already sent records of it, and the retry with the grown buffer only returns once
    *everything* is sent; so ``Writer._sent`` (``stream.py`` ``_send``) never moves
    while the buffer never empties, ``bytes_pending`` counts bytes the client already
    read, ``flush`` waits for later writes, and the age check cuts a healthy client.
    (Sending at most one TLS record's worth per ``write`` call would fix it.)"""
    lsock = gsocket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)  # accepted: inherited
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    client = gsocket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    client.settimeout(TIMEOUT)
    with Switch() as sw:
        sw.attach(lsock)
        sw.attach(client)
        client.connect(lsock.getsockname())
        server_side, _ = lsock.accept()
        sw.attach(server_side)
        if transport == "tls":
            handshake = sw.fork_promise(tls_over, server_side, certs.server_context(),
                                        server_side=True)
            client = sw.attach(tls_over(client, certs.client_context()))
            server_side = sw.attach(handshake.get(timeout=TIMEOUT))
        failures: list[BaseException] = []
        writer = Writer(server_side, buffer_age_limit=0.5, on_failure=failures.append)
        total = 245 * 16384  # about 4 MB, in whole writes
        received = [0]

        def produce() -> None:
            written = 0
            while written < total and not failures:
                while written - received[0] > 256 * 1024 and not failures:
                    gevent.sleep(0.001)
                writer.write(b"y" * 16384)
                written += 16384

        def consume() -> None:
            while received[0] < total:
                data = client.recv(16384)
                if not data:
                    return
                received[0] += len(data)
                gevent.sleep(0.002)

        p = sw.fork_promise(produce)
        c = sw.fork_promise(consume)
        gevent.joinall([c], timeout=15)
        writer.close()
        assert not failures, f"{failures} with the client reading; received {received[0]}"
        assert received[0] == total
        p.get(timeout=1)


@pytest.mark.slow
def test_many_slow_tls_readers_get_every_byte(certs: Any) -> None:
    """Guard: concurrent TLS writers of mixed bytes/bytearray writes of every size,
    with flushes, while their readers read the same sockets: every byte arrives, in
    order, and every slot is freed."""
    size = 300_000
    n = 12

    def data_for(i: int) -> bytes:
        return random.Random(i).randbytes(size)

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        i = int(reader.read_line() or b"-1")
        data, rnd, pos = data_for(i), random.Random(i + 1000), 0
        while pos < size:
            step = rnd.choice([1, 7, 100, 4096, 5000, 16384, 70000])
            chunk = data[pos:pos + step]
            writer.write(chunk if rnd.random() < 0.5 else bytearray(chunk))
            pos += step
            if rnd.random() < 0.2:
                gevent.sleep(0.001)
            if rnd.random() < 0.02:
                writer.flush()
        writer.write(b"|" + (reader.read_line() or b"?"))

    server = tcp.Server.create("127.0.0.1:0", handler, max_connections=n,
                               ssl_context=certs.server_context())
    with closing_server(server):
        addr = ("127.0.0.1", server.listening_on)

        def client(i: int) -> bool:
            c = tls_connect(addr, certs)
            try:
                c.sendall(b"%d\nbye%d\n" % (i, i))
                got, rnd = bytearray(), random.Random(i + 5000)
                while data := c.recv(rnd.choice([1000, 16384, 65536])):
                    got += data
                    if rnd.random() < 0.5:
                        gevent.sleep(0.002)
                return bytes(got) == data_for(i) + b"|bye%d" % i
            finally:
                c.close()

        clients = [gevent.spawn(client, i) for i in range(n)]
        gevent.joinall(clients, timeout=15)
        assert [g.value for g in clients] == [True] * n
        wait_until(lambda: server.stats()["active"] == 0, TIMEOUT)
        stats = server.stats()
        assert stats["accepted"] == n and stats["handler_errors"] == 0


# -- 2. peer_left -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_a_peer_that_leaves_with_bytes_unread_is_gone_not_a_handler_error(
        transport: str, certs: Any) -> None:
    """A client asks for a stream, sends one more line (which the handler, busy
    writing, never reads) and leaves. The handler's write fails with a reset: the peer
    is gone. But ``_gevent.peer_gone`` peeks one byte (``MSG_PEEK``), which returns
    the unread line before the reset, so the engine calls the connection alive and the
    reset a handler error; with tcp.Server's default ``on_handler_error="raise"`` the
    server closes. Any client can close a streaming server this way. (Asking the
    kernel for the connection's state, e.g. ``TCP_INFO``'s ``tcpi_state`` or
    ``poll(POLLRDHUP|POLLHUP|POLLERR)``, does not depend on the receive queue.)"""

    def stream(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        reader.read_line()
        for _ in range(5000):
            writer.write(b"y" * 65536)
            writer.flush()

    ctx = certs.server_context() if transport == "tls" else None
    server = tcp.Server.create("127.0.0.1:0", stream, max_connections=4, ssl_context=ctx)
    with closing_server(server):
        addr = ("127.0.0.1", server.listening_on)
        client = tls_connect(addr, certs) if transport == "tls" else connect_to(addr)
        try:
            client.sendall(b"stream please\n")
            assert client.recv(65536)  # streaming has begun: the handler only writes
            client.sendall(b"bye\n")   # never read by the handler
        finally:
            client.close()  # unread data on the client's side: the kernel resets
        wait_until(lambda: server.stats()["active"] == 0, TIMEOUT, "connection ended")
        stats = server.stats()
        assert not server.is_closed, "a client that left closed the server"
        assert (stats["peer_gone"], stats["handler_errors"]) == (1, 0)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_backend_reset_is_reported_when_the_client_half_closed(family: str,
                                                                 tmp_path: Path) -> None:
    """A client sends its request and shuts down its sending side (``nc -N``, HTTP/1.0
    style) but waits for the answer. The handler's backend resets:
    ``ConnectionResetError`` escapes the handler. Its own client is alive, so this is
    a handler error (architecture.md, 7: "if the connection is alive, the error came
    from something else the handler talked to"). But ``peer_gone`` sees the client's
    end of file and calls it ``peer_gone``: the backend failure is silently dropped
    (a DEBUG line "went away") while the client is still there, waiting."""
    errors: list[Exception] = []

    def proxy(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        reader.read_line()
        assert reader.read_line() is None  # the client is done sending
        raise ConnectionResetError(104, "the backend reset")

    where = f"unix:{tmp_path}/s" if family == "unix" else "127.0.0.1:0"
    server = tcp.Server.create(where, proxy, max_connections=4,
                               on_handler_error=lambda peer, exc: errors.append(exc))
    with closing_server(server):
        addr = str(tmp_path / "s") if family == "unix" else ("127.0.0.1", server.listening_on)
        client = connect_to(addr)
        try:
            client.sendall(b"GET /\n")
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b""  # the server ends the connection
        finally:
            client.close()
        wait_until(lambda: server.stats()["active"] == 0, TIMEOUT)
        stats = server.stats()
        assert (stats["handler_errors"], stats["peer_gone"]) == (1, 0), (stats, errors)


def test_a_peer_that_resets_is_gone_on_every_transport(certs: Any, tmp_path: Path) -> None:
    """Guard: a client that resets while the handler waits for it is ``peer_gone``,
    never a handler error, on TCP, TLS and unix sockets."""
    for transport in ("tcp", "tls", "unix"):
        where = f"unix:{tmp_path}/{transport}" if transport == "unix" else "127.0.0.1:0"
        server, address = line_server(where=where, max_connections=2,
                                      ssl_context=certs.server_context()
                                      if transport == "tls" else None)
        with closing_server(server):
            client = (tls_connect(address(), certs) if transport == "tls"
                      else connect_to(address()))
            client.sendall(b"a\n")
            assert read_exactly(client, 5) == b"ok a\n"
            client.sendall(b"half a line")
            if transport == "unix":
                client.close()  # end of file in the middle of a line
            else:
                rst(client)
            wait_until(lambda s=server: s.stats()["active"] == 0, TIMEOUT)
            stats = server.stats()
            assert stats["handler_errors"] == 0, transport
            assert not server.is_closed, transport


# -- 3. reclaiming idle connections ------------------------------------------------------------


@pytest.mark.parametrize("face", ["run_server", "tcp.Server batch 16"])
def test_reaching_the_limit_reclaims_nothing_when_no_client_waits(face: str) -> None:
    """``max_connections=2``; ``a`` is served and idle; ``b`` arrives and takes the
    second slot. Nobody waits in the backlog, so nothing may be reclaimed ("one for
    one"). With ``max_accepts_per_batch`` > 1 (run_server's default is 100, gunicorn's
    with one worker too) ``_accept_batch`` (``_acceptor.py``) loops on after accepting
    ``b``, finds ``active >= limit`` and calls ``_reclaim_one()`` without any client
    waiting: ``a`` is closed for nobody. Every client that fills the last slot costs
    an idle client its connection."""
    stop = Event()
    with Switch() as sw:
        if face == "run_server":
            def handler(flow: Any, addr: Any) -> None:
                while True:
                    with flow.idle():
                        data = flow.read()
                    if not data:
                        return
                    flow.write(b"ok " + data)

            lsock = net.listen("127.0.0.1:0", sw=sw)
            port = lsock.address.port
            sw.fork(net.run_server, lsock, handler, on_error=print, max_connections=2,
                    stop=stop, drain_timeout=1)
            server = None
        else:
            server, address = line_server(max_connections=2, max_accepts_per_batch=16)
            port = address()[1]
        try:
            a = sw.attach(connect_to(("127.0.0.1", port)))
            a.sendall(b"a\n")
            assert a.recv(100) == b"ok a\n"
            b = sw.attach(connect_to(("127.0.0.1", port)))
            b.sendall(b"b\n")
            assert b.recv(100) == b"ok b\n"
            a.sendall(b"a again\n")  # a round trip: had a been reclaimed, end of file
            assert a.recv(100) == b"ok a again\n"
        finally:
            stop.set()
            if server is not None:
                server.close(close_existing_connections=True)
                assert server.close_finished.wait(TIMEOUT)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_tls_request_arriving_in_pieces_is_never_reclaimed(family: str, certs: Any,
                                                             tmp_path: Path) -> None:
    """A TLS client sends its first request and, in the same packet, the first bytes
    of the record carrying its second. The handler answers, enters ``reader.idle()``
    and reads: the SSL object takes the partial record out of the kernel and waits for
    the rest. From then on ``has_unread`` is false (nothing decrypted, nothing in the
    kernel) and ``TCP_INFO``'s byte count does not move (the bytes arrived before the
    mark; on unix there is no count at all): a second client makes the engine reclaim
    the connection in the middle of its request ("never one whose next message has
    begun to arrive", tcp.md). The mark should count the bytes *consumed* by then
    (received minus still queued), and TLS's own buffer is invisible to the engine."""
    where = f"unix:{tmp_path}/s" if family == "unix" else "127.0.0.1:0"
    server, address = line_server(where=where, max_connections=1,
                                  ssl_context=certs.server_context())
    with closing_server(server):
        first = BioClient(connect_to(address()), certs)
        second = None
        try:
            record1, record2 = first.record(b"first\n"), first.record(b"second request\n")
            first.sock.sendall(record1 + record2[:10])
            assert first.recv() == b"ok first\n"
            second = connect_to(address())  # waits in the backlog
            second.sendall(b"(not TLS: never answered)")
            try:  # give the engine its chance to (wrongly) reclaim `first`
                wait_until(lambda: server.stats()["reclaimed"] > 0, 1.0)
            except AssertionError:
                pass
            try:
                first.sock.sendall(record2[10:])
            except OSError as exc:
                pytest.fail(f"reclaimed in the middle of a request: {exc!r}")
            assert first.recv() == b"ok second request\n", (
                "reclaimed in the middle of a request")
        finally:
            first.close()
            if second is not None:
                second.close()


def reclaim_round(seed: int, tmp: Path) -> dict[str, Any]:
    """One random scenario: a face, a transport, a limit and clients that keep their
    connection, send partial lines, pipeline, connect and leave, reset; the handler
    records how many run at once and any request cut in the middle."""
    rnd = random.Random(seed)
    face = rnd.choice(["tcp", "net"])
    unix = rnd.random() < 0.5
    limit = rnd.choice([1, 2, 3])
    nclients = rnd.choice([5, 10, 20])
    gauge = {"now": 0, "peak": 0}
    cut: list[bytes] = []
    errors: list[Any] = []
    tmp = tmp / f"r{seed}"

    @contextmanager
    def inside() -> Iterator[None]:
        gauge["now"] += 1
        gauge["peak"] = max(gauge["peak"], gauge["now"])
        try:
            yield
        finally:
            gauge["now"] -= 1

    def reader_handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        with inside():
            while True:
                with reader.idle():
                    line = reader.read_line()
                if line is None:
                    return
                if not line.endswith(b";"):  # cut: by its client (R...) or the server
                    if not line.startswith(b"R"):
                        cut.append(line)
                    return
                gevent.sleep(rnd.choice([0, 0, 0.001, 0.005]))
                writer.write(b"ok " + line + b"\n")

    def flow_handler(flow: Any, addr: Any) -> None:
        with inside():
            buf = b""
            while True:
                if b"\n" not in buf:
                    if buf:  # in the middle of a request: not idle
                        data = flow.read()
                    else:
                        with flow.idle():
                            data = flow.read()
                    if not data:
                        if buf and not buf.startswith(b"R"):
                            cut.append(buf)
                        return
                    buf += data
                    continue
                line, buf = buf.split(b"\n", 1)
                gevent.sleep(rnd.choice([0, 0, 0.001, 0.005]))
                flow.write(b"ok " + line + b"\n")

    results: dict[int, str] = {}
    waiting_idle: set[int] = set()
    all_served = Event()

    def settled() -> None:
        if len(results) + len(waiting_idle) >= nclients:
            all_served.set()

    def client(i: int, addr: Any) -> None:
        kind = rnd.choice(["keep", "keep", "partial", "leave", "rst", "pipeline", "twice"])
        stay = rnd.random() < 0.5
        gevent.sleep(rnd.random() * 0.03)
        sock = connect_to(addr)
        try:
            if kind == "leave":
                results[i] = "ok"
                return
            if kind == "rst":
                sock.sendall(b"Rhalf")
                results[i] = "ok"
                return
            for k in range(2 if kind == "twice" else 1):
                req = b"q%d.%d;\n" % (i, k)
                want = b"ok " + req
                try:
                    if kind == "partial":
                        sock.sendall(req[:2])
                        gevent.sleep(rnd.random() * 0.03)
                        sock.sendall(req[2:])
                    elif kind == "pipeline":
                        more = b"p%d;\n" % i
                        sock.sendall(req + more[:2])
                        gevent.sleep(rnd.random() * 0.03)
                        sock.sendall(more[2:])
                        want += b"ok " + more
                    else:
                        sock.sendall(req)
                except OSError:  # reclaimed before this request: allowed
                    results[i] = "reclaimed between requests"
                    return
                got = read_exactly(sock, len(want))
                if not got and k == 1:
                    results[i] = "reclaimed between requests"
                    return
                if got != want:
                    results[i] = f"answer {got!r}, wanted {want!r}"
                    return
                gevent.sleep(rnd.random() * 0.02)
            if stay:
                waiting_idle.add(i)
                settled()
                sock.settimeout(None)
                end = gevent.spawn(sock.recv, 100)
                gevent.wait([end, all_served], count=1)
                ended = end.ready()
                end.kill()
                waiting_idle.discard(i)
                if ended and end.successful() and end.value != b"":
                    results[i] = f"unexpected {end.value!r}"
                    return
            results[i] = "ok"
        except Exception as exc:
            results[i] = repr(exc)
        finally:
            if kind == "rst" and not unix:
                rst(sock)
            else:
                sock.close()
            settled()

    stop = Event()
    with Switch() as sw:
        if unix:
            tmp.mkdir()
            where = f"unix:{tmp}/s"
        else:
            where = "127.0.0.1:0"
        try:
            if face == "tcp":
                server = tcp.Server.create(where, reader_handler, max_connections=limit,
                                           on_handler_error=lambda p, e: errors.append(e))
                addr = f"{tmp}/s" if unix else ("127.0.0.1", server.listening_on)
            else:
                server = None
                lsock = net.listen(where, sw=sw)
                addr = f"{tmp}/s" if unix else ("127.0.0.1", lsock.address.port)
                sw.fork(net.run_server, lsock, flow_handler, on_error=errors.append,
                        max_connections=limit, stop=stop, drain_timeout=1)
            clients = [sw.fork(client, i, addr) for i in range(nclients)]
            gevent.joinall(clients, timeout=8)
            stats = server.stats() if server is not None else None
            if not all(g.dead for g in clients):
                sw.cancel()
        finally:
            stop.set()
            if face == "tcp":
                server.close(close_existing_connections=True)
                server.close_finished.wait(TIMEOUT)
    if unix:
        tmp.rmdir()
    bad = {i: r for i, r in results.items() if r not in ("ok", "reclaimed between requests")}
    return {"case": (face, "unix" if unix else "tcp", limit, nclients), "peak": gauge["peak"],
            "limit": limit, "cut": cut, "errors": errors, "bad": bad,
            "missing": nclients - len(results), "stats": stats}


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [range(0, 12), range(12, 24)])
def test_random_clients_never_break_the_reclaim_invariants(seeds: range,
                                                          tmp_path: Path) -> None:
    """Guard (plain TCP and unix, run_server and tcp.Server, limits 1-3): never above
    the limit, no request cut in the middle, no handler error, every client answered
    (or reclaimed between its requests: allowed), stats consistent."""
    for seed in seeds:
        r = reclaim_round(seed, tmp_path)
        assert r["peak"] <= r["limit"], r
        assert not r["cut"] and not r["errors"] and not r["bad"] and not r["missing"], r
        if r["stats"] is not None:
            assert r["stats"]["peak_active"] <= r["limit"], r
            assert r["stats"]["active"] <= r["limit"], r


def test_stopping_while_a_reclaim_and_a_handshake_are_in_flight(certs: Any) -> None:
    """Guard: run_server at its limit with TLS: two idle clients, one that never
    handshakes, one in the backlog (a reclaim starts; the reclaimed handler takes
    0.3 s to end); ``stop`` is set then. The drain ends within its deadline and leaves
    nothing open (the leak check)."""

    def handler(flow: Any, addr: Any) -> None:
        while True:
            with flow.idle():
                data = flow.read()
            if not data:
                gevent.sleep(0.3)  # slow cleanup after the reclaim's end of file
                return
            flow.write(b"ok " + data)

    stop = Event()
    with Switch() as sw:
        lsock = net.listen("127.0.0.1:0", sw=sw)
        addr = ("127.0.0.1", lsock.address.port)
        runner = sw.fork(net.run_server, lsock, handler, on_error=print, max_connections=3,
                         stop=stop,
                         drain_timeout=0.5, ssl_context=certs.server_context(),
                         handshake_timeout=5)
        clients = []
        for _ in range(2):
            c = sw.attach(tls_connect(addr, certs))
            c.sendall(b"x")
            assert c.recv(10) == b"ok x"
            clients.append(c)
        sw.attach(connect_to(addr))  # never handshakes
        sw.attach(connect_to(addr))  # waits in the backlog
        wait_until(lambda: clients[0].recv(10) == b"", TIMEOUT)  # the oldest reclaimed
        started = time.monotonic()
        stop.set()
        runner.join(TIMEOUT)
        assert runner.dead and time.monotonic() - started < 2


# -- 4. gunicorn ------------------------------------------------------------------------------


ROOT = Path(__file__).parent.parent.parent
APPS = ROOT / "tests" / "gunicorn_apps"


class _Arbiter:
    """``gunicorn -k greenserve.gunicorn.Worker --worker-connections 1`` on a unix
    socket and 127.0.0.1, debug log (to see reclaims)."""

    def __init__(self, path: str) -> None:
        from ..test_gunicorn import NO_CONTROL_SOCKET, READY_CONF

        cmd = [sys.executable, "-m", "gunicorn", *NO_CONTROL_SOCKET, "-c", str(READY_CONF),
               "-k", "greenserve.gunicorn.Worker", "-w", "1", "--pythonpath", str(APPS),
               "--bind", f"unix:{path}", "--bind", "127.0.0.1:0",
               "--worker-connections", "1", "--keep-alive", "30", "--log-level", "debug",
               "wsgi_app:app"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def seen(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def port(self) -> int:
        for line in list(self.lines):
            if m := re.search(r"Listening at: .*127\.0\.0\.1:(\d+)", line):
                return int(m[1])
        raise AssertionError("\n".join(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def http_response(sock: socket.socket) -> bytes:
    """The status line of one whole response, or b"EOF" if the connection ended."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return b"EOF"
        buf += data
    head, body = buf.split(b"\r\n\r\n", 1)
    length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                  if h.lower().startswith(b"content-length:"))
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            return b"EOF"
        body += data
    return head.split(b"\r\n")[0]


@pytest.mark.no_leak_check
@pytest.mark.slow
@pytest.mark.parametrize("how", ["unix, headers in two parts", "tcp, pipelined"])
def test_gunicorn_never_reclaims_a_request_that_has_begun(how: str, tmp_path: Path) -> None:
    """gunicorn.md: "A connection whose next request has begun to arrive (a byte
    received, read or not) is never closed this way". The Worker marks the whole
    ``next(parser)`` as reclaimable (``_RequestWait``) and nothing unmarks it when
    gunicorn's parser reads the first bytes. So:

    - over a unix socket (gunicorn behind nginx), headers that arrive in two parts:
      the parser has taken the first part out of the kernel, and with no ``TCP_INFO``
      the engine sees an idle connection;
    - over TCP, a pipelined request of which only a part came with the previous one:
      the part sits in gunicorn's buffer before the wait is even marked.

    A client arriving at ``--worker-connections`` then has the engine close the
    connection in the middle of its request. (Also over TCP when the next request
    arrives before the worker re-enters the wait: the mark's byte count already
    includes it.)"""
    path = str(tmp_path / "g.sock")
    arbiter = _Arbiter(path)
    try:
        wait_until(lambda: arbiter.seen("Worker ready") > 0, 15)
        port = arbiter.port()

        def conn() -> socket.socket:
            if how.startswith("unix"):
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(TIMEOUT)
                s.connect(path)
                return s
            return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)

        first = conn()
        second = None
        try:
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            if how.startswith("unix"):
                first.sendall(request)
                assert http_response(first) == b"HTTP/1.1 200 OK"
                first.sendall(request[:18])  # the next request begins
            else:
                first.sendall(request + request[:18])
                assert http_response(first) == b"HTTP/1.1 200 OK"
            second = conn()
            second.sendall(request)  # waits in the backlog
            try:  # the engine's chance to (wrongly) reclaim `first`
                wait_until(lambda: arbiter.seen("closing an idle one") > 0, 3.0)
            except AssertionError:
                pass
            try:
                first.sendall(request[18:])
                answer = http_response(first)
            except OSError as exc:
                answer = repr(exc).encode()
            assert answer == b"HTTP/1.1 200 OK", (
                f"reclaimed in the middle of a request: {answer!r}")
        finally:
            first.close()
            if second is not None:
                second.close()
    finally:
        arbiter.kill()


# -- 5. odd unix names ------------------------------------------------------------------------


def test_a_peer_bound_to_a_108_byte_path_is_served(tmp_path: Path) -> None:
    """Guard: a client bound to a relative 108-byte path (no NUL terminator in
    ``sun_path``, which Python's ``bind`` refuses: bound here through libc) is
    accepted, and its address names it."""
    import ctypes

    peers: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        peers.append(addr)
        writer.write(b"hi\n")

    server = tcp.Server.create(f"unix:{tmp_path}/s", handler, max_connections=2)
    cwd = os.getcwd()
    client = gsocket.socket(socket.AF_UNIX)
    try:
        os.chdir(tmp_path)
        libc = ctypes.CDLL(None, use_errno=True)
        name = b"p" * 108
        sockaddr = struct.pack("H", socket.AF_UNIX) + name
        assert libc.bind(client.fileno(), ctypes.c_char_p(sockaddr), len(sockaddr)) == 0
        client.settimeout(TIMEOUT)
        client.connect(str(tmp_path / "s"))
        assert read_exactly(client, 3) == b"hi\n"
        assert len(peers) == 1 and peers[0].path in ("p" * 108, name)
    finally:
        os.chdir(cwd)
        client.close()
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(TIMEOUT)
