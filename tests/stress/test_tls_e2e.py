"""Item 6, TLS end to end through each server face, with a generated certificate
(the ``certs`` fixture): real ``ssl`` clients - the stdlib's, blocking in an OS thread,
and gevent's, many at once - get their data back intact; a client that rejects the
certificate (unknown CA, wrong host name), a plain-text client and one that never
finishes its handshake are each closed without calling the handler, counted in
``handshake_errors``, and the server goes on serving."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest

from ..helpers import tls_over
from ..tls import make_certs
from .support import Gauge, connect, engine, net_server, recv_exactly, stream_server, wait_until

HANDSHAKE_TIMEOUT = 0.3
CONCURRENT = 20
DATA = bytes(range(256)) * 256  # 64 KiB: several TLS records each way


def socket_echo(gauge: Gauge) -> Callable[[Any, Any], None]:
    def handler(sock: Any, peer: Any) -> None:
        with gauge.inside():
            while data := sock.recv(65536):
                sock.sendall(data)
    return handler


def flow_echo(gauge: Gauge) -> Callable[[Any, Any], None]:
    def handler(flow: Any, peer: Any) -> None:
        with gauge.inside():
            while data := flow.read():
                flow.write(data)
    return handler


FACES = {
    "engine": (engine, socket_echo),
    "StreamServer": (stream_server, socket_echo),
    "net.serve_listeners": (net_server, flow_echo),
}


def stdlib_client(port: int, cafile: str) -> tuple[str | None, bytes]:
    """The stdlib's ssl module, blocking, in an OS thread: no gevent on this side."""
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(DATA)
        return tls.version(), recv_exactly(tls, len(DATA))


def gevent_client(port: int, ctx: ssl.SSLContext, hostname: str = "localhost") -> bytes:
    with tls_over(connect(port), ctx, hostname) as tls:
        tls.sendall(DATA)
        return recv_exactly(tls, len(DATA))


def closed_without_reply(port: int, data: bytes) -> bytes:
    with connect(port) as c:
        if data:
            c.sendall(data)
        reply = bytearray()
        try:
            while chunk := c.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return bytes(reply)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("face", list(FACES))
def test_tls_end_to_end(face: str, certs: Any, tmp_path: Path) -> None:
    start, make_handler = FACES[face]
    gauge = Gauge()
    stranger = make_certs(tmp_path, cn="localhost")  # same name, another CA
    with start(make_handler(gauge), ssl_context=certs.server_context(),
               handshake_timeout=HANDSHAKE_TIMEOUT) as served:
        port = served.port
        # Real clients: one stdlib client in a thread, many gevent clients at once.
        version, echoed = gevent.get_hub().threadpool.spawn(
            stdlib_client, port, str(certs.ca)).get(timeout=15)
        assert echoed == DATA and version in ("TLSv1.2", "TLSv1.3")
        clients = [gevent.spawn(gevent_client, port, certs.client_context())
                   for _ in range(CONCURRENT)]
        gevent.joinall(clients, timeout=15, raise_error=True)
        assert [g.value for g in clients] == [DATA] * CONCURRENT

        # Each failure is handled cleanly, and the server keeps serving after it.
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            gevent_client(port, stranger.client_context())
        assert gevent_client(port, certs.client_context()) == DATA
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            gevent_client(port, certs.client_context(), hostname="example.org")
        assert gevent_client(port, certs.client_context()) == DATA
        plain_reply = closed_without_reply(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert gevent_client(port, certs.client_context()) == DATA
        assert closed_without_reply(port, b"") == b""  # never starts: handshake_timeout
        assert gevent_client(port, certs.client_context()) == DATA

        wait_until(lambda: served.active() <= 0, 5, "every connection closed")
        stats = served.stats()
        errors = list(served.errors)
    good = 1 + CONCURRENT + 4
    # At most a TLS alert for the plain-text client: never an application byte.
    assert not plain_reply or plain_reply[:1] == b"\x15", plain_reply
    assert gauge.started == gauge.finished == good  # never for a failed handshake
    assert not errors, errors
    if stats:
        assert stats["handshake_errors"] == 4
        assert stats["accepted"] == good + 4
        assert stats["handler_errors"] == 0 and stats["active"] == 0
