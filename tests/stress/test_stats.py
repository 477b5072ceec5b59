"""Item 10, stats: after a scripted run every ``stats()`` number is exact - accepted,
dropped (drop-incoming), handler errors, handshake errors (PROXY header), idle
timeouts, peak_active at the connection limit, and nothing left active."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import Event

from .support import Gauge, connect, engine, recv_exactly, stream_server, tcp_server, wait_until

LIMIT = 5
HELD = 9         # clients held in the handler at once: LIMIT run, the rest wait
DROPPED = 4      # arrive while drop-incoming is on
FAILING = 3      # make the handler raise
BAD_HEADERS = 2  # send no PROXY header
IDLE = 1         # send the header, then nothing
GONE = 2         # reset the connection while the handler writes to it
IDLE_TIMEOUT = 0.2
HEADER = b"PROXY UNKNOWN\r\n"


class Boom(Exception):
    """The handler's own failure (raised on purpose)."""


def make_handler(gauge: Gauge, gate: Event) -> Callable[[Any, Any], None]:
    def handler(sock: Any, peer: Any) -> None:
        with gauge.inside():
            data = sock.recv(100)
            if data == b"hold":
                gate.wait()
                sock.sendall(b"held")
            elif data == b"fail":
                raise Boom("asked to fail")
            elif data == b"gone":
                while True:  # until the reset escapes: the peer went away
                    sock.sendall(b"x" * 65536)
            else:
                sock.sendall(data)
    return handler


def ask(port: int, data: bytes) -> bytes:
    """Send the PROXY header and ``data`` (nothing: stay silent, connection open);
    return everything until the server closes."""
    with connect(port) as c:
        c.sendall(HEADER + data)
        reply = bytearray()
        try:
            while chunk := c.recv(100):
                reply += chunk
        except ConnectionResetError:
            pass
        return bytes(reply)


def reset_after(port: int, data: bytes) -> None:
    """Send the header and ``data``, then close with a reset (SO_LINGER 0)."""
    with connect(port) as c:
        c.sendall(HEADER + data)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def bad_header(port: int) -> bytes:
    with connect(port) as c:
        c.sendall(b"HELLO?\r\n")
        try:
            return recv_exactly(c, 100)
        except ConnectionResetError:
            return b""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("face", ["engine", "StreamServer", "tcp.Server"])
def test_stats_are_exact_after_a_scripted_run(face: str, monkeypatch: Any) -> None:
    start = {"engine": engine, "StreamServer": stream_server, "tcp.Server": tcp_server}[face]
    # StreamServer reports handler errors to the hub, as gevent does: declare ours
    # expected so that the hub does not print a traceback for each.
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "NOT_ERROR", (*hub.NOT_ERROR, Boom))
    gauge, gate = Gauge(), Event()
    with start(make_handler(gauge, gate), max_connections=LIMIT, proxy_protocol=True,
                     idle_timeout=IDLE_TIMEOUT) as served:
        port = served.port
        held = [gevent.spawn(ask, port, b"hold") for _ in range(HELD)]
        wait_until(lambda: gauge.running == LIMIT, 5, "the limit reached")
        assert served.stats()["accepted"] == LIMIT  # the others wait in the backlog
        gate.set()
        gevent.joinall(held, timeout=10, raise_error=True)
        assert [g.value for g in held] == [b"held"] * HELD

        dropped = 0
        if served.set_drop_incoming is not None:
            served.set_drop_incoming(True)
            for _ in range(DROPPED):
                assert ask(port, b"hello") == b""  # closed at once, never served
            served.set_drop_incoming(False)
            dropped = DROPPED
        for _ in range(FAILING):
            assert ask(port, b"fail") == b""
        for _ in range(BAD_HEADERS):
            assert bad_header(port) == b""
        for _ in range(GONE):
            reset_after(port, b"gone")
        for _ in range(IDLE):
            assert ask(port, b"") == b""  # silent after the header: the idle timeout
        assert ask(port, b"still here") == b"still here"
        wait_until(lambda: served.active() == 0, 5, "every connection closed")
        stats = served.stats()

    served_ok = HELD + 1
    assert stats == {
        "accepted": HELD + FAILING + BAD_HEADERS + GONE + IDLE + 1,
        "active": 0,
        "dropped": dropped,
        "handler_errors": FAILING,
        "accept_errors": 0,
        "peak_active": LIMIT,
        "handshake_errors": BAD_HEADERS,
        "idle_timeouts": IDLE,
        "peer_gone": GONE,
        "reclaimed": 0,  # no handler here marks its connection reclaimable
    }
    assert gauge.started == served_ok + FAILING + GONE + IDLE
