"""Item 4, slow and hostile clients, all at once for a measured window:

- slowloris (a byte every 0.5 s, never a whole line): cut by ``idle_timeout`` (0.3 s);
- a client that never reads what it asked for: cut by the ``Writer``'s
  ``buffer_age_limit`` (0.3 s);
- an oversized line: ``Reader.read_line(max_length=...)`` raises ``LineTooLong``;
- a TLS client that never finishes its handshake: cut by ``handshake_timeout`` (0.3 s).

Meanwhile normal clients (plain and TLS) make round trips; none of them waits for a
hostile one: the slowest round trip stays far below the hostile timeouts.

The first test runs them against the engine with a ``Reader`` and ``Writer`` made by
the handler; the second against ``tcp.Server.create``, which makes them itself and
ends a never-reading client's connection without the handler's help.
"""

from __future__ import annotations

import collections
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from greenserve import LineTooLong, Reader, Writer, WriterBufferAgeExceeded, tcp

from ..helpers import tls_over
from .support import connect, engine, recv_exactly, wait_until

IDLE_TIMEOUT = 0.3
AGE_LIMIT = 0.3
HANDSHAKE_TIMEOUT = 0.3
MAX_LINE = 4096
SLOWLORIS_PERIOD = 0.5
PER_KIND = 8      # hostile clients of each kind at once
WINDOW = 1.5      # seconds during which normal clients measure their round trips
FLOOD_CHUNK = b"x" * 65536


class Cut(NamedTuple):
    port: int      # the client's (ports are reused: see `ended`)
    kind: str      # the error that ended the connection
    lasted: float  # seconds from accept to the cut
    ended: float   # time.monotonic() at the cut


def line_server(cuts: list[Cut]) -> Callable[[Any, Any], None]:
    """Echo lines; ``FLOOD`` asks for endless data. Records every connection that
    ended in an error (a cut)."""
    def handler(sock: Any, peer: Any) -> None:
        began = time.monotonic()
        reader = Reader(sock)
        try:
            with Writer(sock, buffer_age_limit=AGE_LIMIT) as writer:
                while (line := reader.read_line(max_length=MAX_LINE)) is not None:
                    if line == b"FLOOD":
                        flood(sock, writer)
                    writer.write(line + b"\n")
        except (TimeoutError, LineTooLong, WriterBufferAgeExceeded) as exc:
            now = time.monotonic()
            cuts.append(Cut(peer.port, type(exc).__name__, now - began, now))
            raise
    return handler


def flood(sock: Any, writer: Writer) -> None:
    # A small fixed send buffer: the kernel stops taking data soon after the peer
    # stops reading, so the writer's buffer starts ageing at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    while True:
        writer.write(FLOOD_CHUNK)
        writer.flush()


# -- hostile clients: each loops until `stop`, recording how long until it was cut ------------


def slowloris(port: int, stop: Event, cut_after_last_byte: list[float]) -> None:
    while not stop.is_set():
        with connect(port) as c:
            c.settimeout(SLOWLORIS_PERIOD)
            while True:
                c.sendall(b"G")  # never a newline
                sent = time.monotonic()
                try:
                    if c.recv(10) == b"":
                        cut_after_last_byte.append(time.monotonic() - sent)
                        break
                except TimeoutError:
                    continue  # not cut yet: the next byte


def never_reads(port: int, stop: Event, cuts: list[Cut]) -> None:
    def was_cut(me: int, since: float) -> bool:
        return any(cut.port == me and cut.ended >= since for cut in cuts)

    while not stop.is_set():
        c = gsocket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        with c:
            c.settimeout(10)
            c.connect(("127.0.0.1", port))
            since = time.monotonic()
            c.sendall(b"FLOOD\n")
            me = c.getsockname()[1]
            wait_until(lambda m=me, t=since: was_cut(m, t), 5, "a client that never reads cut")


def oversized(port: int, stop: Event, durations: list[float]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        with connect(port) as c:
            try:
                c.sendall(b"A" * (16 * MAX_LINE))  # and no newline
                while c.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # closed with our bytes unread: a reset
        durations.append(time.monotonic() - began)
        stop.wait(0.05)  # pace the reconnects: this measures blocking, not CPU share


def tls_staller(port: int, stop: Event, durations: list[float]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        with connect(port) as c:
            c.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
            try:
                while c.recv(100):
                    pass
            except ConnectionResetError:
                pass
        durations.append(time.monotonic() - began)


# -- normal clients ---------------------------------------------------------------------------


def normal_round_trips(make: Callable[[], Any], rtts: list[float], tag: bytes) -> None:
    deadline = time.monotonic() + WINDOW
    with make() as c:
        i = 0
        while time.monotonic() < deadline:
            request = b"%s %d\n" % (tag, i)
            began = time.monotonic()
            c.sendall(request)
            assert recv_exactly(c, len(request)) == request
            rtts.append(time.monotonic() - began)
            i += 1


def tls_client(port: int, certs: Any) -> Any:
    return tls_over(connect(port), certs.client_context())


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(values), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


@pytest.mark.slow
@pytest.mark.timeout(40)
def test_hostile_clients_are_cut_and_delay_nobody(certs: Any, record_property: Any) -> None:
    cuts: list[Cut] = []
    tls_cuts: list[Cut] = []
    stop = Event()
    loris: list[float] = []
    big: list[float] = []
    stalled: list[float] = []
    plain_rtts: list[float] = []
    tls_rtts: list[float] = []
    with engine(line_server(cuts), idle_timeout=IDLE_TIMEOUT) as plain, \
            engine(line_server(tls_cuts), ssl_context=certs.server_context(),
                   handshake_timeout=HANDSHAKE_TIMEOUT) as tls:
        hostile = []
        for _ in range(PER_KIND):
            hostile += [gevent.spawn(slowloris, plain.port, stop, loris),
                        gevent.spawn(never_reads, plain.port, stop, cuts),
                        gevent.spawn(oversized, plain.port, stop, big),
                        gevent.spawn(tls_staller, tls.port, stop, stalled)]
        # Every hostile connection is in (the never-readers' floods have started).
        wait_until(lambda: plain.stats()["active"] >= 2 * PER_KIND, 5, "hostile clients in")
        normal = [gevent.spawn(normal_round_trips, lambda: connect(plain.port), plain_rtts,
                               b"plain"),
                  gevent.spawn(normal_round_trips, lambda: connect(plain.port), plain_rtts,
                               b"plain2"),
                  gevent.spawn(normal_round_trips, lambda: tls_client(tls.port, certs),
                               tls_rtts, b"tls")]
        gevent.joinall(normal, timeout=WINDOW + 10, raise_error=True)
        stop.set()
        gevent.joinall(hostile, timeout=10, raise_error=True)
        wait_until(lambda: plain.active() == 0 and tls.active() == 0, 5, "all closed")
        plain_stats, tls_stats = plain.stats(), tls.stats()
        errors = collections.Counter(type(exc).__name__ for exc, _ in plain.errors)
        tls_errors = [exc for exc, _ in tls.errors]

    flood_cuts = [cut.lasted for cut in cuts if cut.kind == "WriterBufferAgeExceeded"]
    figures = {
        "plain_rtt": summary(plain_rtts), "tls_rtt": summary(tls_rtts),
        "slowloris_cut_after_last_byte_s": summary(loris),
        "tls_staller_cut_s": summary(stalled), "oversized_cut_s": summary(big),
        "never_reader_cut_s": summary(flood_cuts),
        "plain_stats": plain_stats, "tls_stats": tls_stats}
    record_property("figures", figures)
    print(f"hostile: {figures}")

    # Each hostile kind was cut by its own bound, every time.
    assert loris and all(IDLE_TIMEOUT * 0.9 <= d < IDLE_TIMEOUT + 0.3 for d in loris), loris
    assert plain_stats["idle_timeouts"] == len(loris)
    assert stalled and all(HANDSHAKE_TIMEOUT * 0.9 <= d < HANDSHAKE_TIMEOUT + 0.5
                           for d in stalled), stalled
    assert tls_stats["handshake_errors"] == len(stalled) and tls_stats["handler_errors"] == 0
    assert not tls_errors, tls_errors
    assert errors["LineTooLong"] == len(big) and all(d < IDLE_TIMEOUT for d in big), big
    assert errors["WriterBufferAgeExceeded"] == len(flood_cuts) >= PER_KIND
    assert set(errors) == {"LineTooLong", "WriterBufferAgeExceeded"}, errors
    assert all(d < AGE_LIMIT * 1.25 + 0.5 for d in flood_cuts), flood_cuts
    # Nobody waited for them: the slowest normal round trip is far below every cut.
    assert len(plain_rtts) > 100 and len(tls_rtts) > 50
    assert max(plain_rtts + tls_rtts) < min(IDLE_TIMEOUT, AGE_LIMIT, HANDSHAKE_TIMEOUT) / 2


def tcp_line_server(cuts: list[Cut], errors: list[BaseException]) -> tcp.Server:
    """``line_server`` on ``tcp.Server.create``: the server makes the Reader and the
    Writer (``buffer_age_limit=AGE_LIMIT``) and ends a connection whose peer stopped
    reading by itself; the handler only records how its connection ended."""
    def handler(peer: Any, reader: Reader, writer: Writer) -> None:
        began = time.monotonic()
        try:
            while (line := reader.read_line(max_length=MAX_LINE)) is not None:
                if line == b"FLOOD":
                    flood(writer_socket(writer), writer)
                writer.write(line + b"\n")
        except (LineTooLong, WriterBufferAgeExceeded) as exc:
            now = time.monotonic()
            cuts.append(Cut(peer.port, type(exc).__name__, now - began, now))
            raise
    return tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0), handler,
                             on_handler_error=lambda peer, exc: errors.append(exc),
                             buffer_age_limit=AGE_LIMIT,
                             backlog=1024)


def writer_socket(writer: Writer) -> Any:
    return writer._sock  # only to shrink its send buffer (see flood)


@pytest.mark.slow
@pytest.mark.timeout(40)
def test_tcp_server_cuts_never_readers_and_long_lines_and_keeps_serving() -> None:
    cuts: list[Cut] = []
    errors: list[BaseException] = []
    stop = Event()
    big: list[float] = []
    rtts: list[float] = []
    with tcp_line_server(cuts, errors) as server:
        port = int(server.listening_on)
        hostile = []
        for _ in range(PER_KIND):
            hostile += [gevent.spawn(never_reads, port, stop, cuts),
                        gevent.spawn(oversized, port, stop, big)]
        wait_until(lambda: server.num_connections >= PER_KIND, 5, "hostile clients in")
        normal = gevent.spawn(normal_round_trips, lambda: connect(port), rtts, b"tcp")
        gevent.joinall([normal], timeout=WINDOW + 10, raise_error=True)
        stop.set()
        gevent.joinall(hostile, timeout=10, raise_error=True)
        wait_until(lambda: server.num_connections == 0, 5, "every slot freed")
        stats = server.stats()
        server.close()

    flood_cuts = [cut.lasted for cut in cuts if cut.kind == "WriterBufferAgeExceeded"]
    print(f"tcp.Server hostile: never_reader_cut_s={summary(flood_cuts)} "
          f"oversized_cut_s={summary(big)} rtt={summary(rtts)} stats={stats}")
    assert len(flood_cuts) >= PER_KIND
    assert all(d < AGE_LIMIT * 1.25 + 0.5 for d in flood_cuts), flood_cuts
    assert big and all(d < IDLE_TIMEOUT for d in big), big
    # A peer that stopped reading is the connection's own end, not a handler error;
    # a line over max_length is (the handler chose not to catch it).
    assert {type(exc) for exc in errors} == {LineTooLong}
    assert stats["handler_errors"] == len(errors) == len(big)
    assert len(rtts) > 100 and max(rtts) < AGE_LIMIT / 2
