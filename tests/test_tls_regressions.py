"""TLS where it meets back-pressure and closing: the Writer over TLS against a slow
reader (server and client side), and every engine stop while a client sits in its TLS
handshake. (The contract suite runs such behaviours over every face; these pin the
engine and stream pieces themselves.)"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from greenserve import Switch, Tcp, tcp
from greenserve._acceptor import Acceptor
from greenserve.flow import open_listener

from .helpers import make_acceptor, recv_all

pytestmark = pytest.mark.timeout(30)

CHUNK = bytes(range(256)) * 256  # 64 KiB
COUNT = 128                      # 8 MiB in all: far more than the kernel buffers hold
LATE = 0.5                       # the slow reader starts this late (part of the scenario)


def _expected() -> str:
    return hashlib.sha256(CHUNK * COUNT).hexdigest()


def _read_all_late(sock: Any) -> str:
    gevent.sleep(LATE)
    digest = hashlib.sha256()
    size = 0
    while size < len(CHUNK) * COUNT:
        data = sock.recv(65536)
        if not data:
            break
        digest.update(data)
        size += len(data)
    return digest.hexdigest()


def test_a_tls_server_writer_delivers_every_byte_to_a_slow_reader(certs: Any) -> None:
    flushed = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        for _ in range(COUNT):
            writer.write(CHUNK)
        writer.flush()
        flushed.set()

    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0), handler,
                               ssl_context=certs.server_context(), max_connections=1)
    try:
        where = tcp.WhereToConnect.of_host_and_port("127.0.0.1", server.listening_on)
        sock = tcp.connect_sock(where, timeout=5, ssl_context=certs.client_context(),
                                server_hostname="localhost")
        sock.settimeout(5)
        try:
            assert _read_all_late(sock) == _expected()
        finally:
            sock.close()
        assert flushed.wait(5)
        # The slot is free again: a second client is served.
        sock = tcp.connect_sock(where, timeout=5, ssl_context=certs.client_context(),
                                server_hostname="localhost")
        sock.settimeout(5)
        try:
            assert _read_all_late(sock) == _expected()
        finally:
            sock.close()
    finally:
        assert server.close(close_existing_connections=True).wait(5)


def test_a_tls_client_writer_delivers_every_byte_to_a_slow_server(certs: Any) -> None:
    received: list[str] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        digest = hashlib.sha256()
        gevent.sleep(LATE)
        while data := reader.read():
            digest.update(data)
        received.append(digest.hexdigest())

    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0), handler,
                               ssl_context=certs.server_context())
    try:
        where = tcp.WhereToConnect.of_host_and_port("127.0.0.1", server.listening_on)

        def client(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
            for _ in range(COUNT):
                writer.write(CHUNK)
            with gevent.Timeout(10):
                writer.flush()

        tcp.with_connection(where, client, timeout=5, ssl_context=certs.client_context(),
                            server_hostname="localhost")
        with gevent.Timeout(10):
            while not received:
                gevent.sleep(0.01)
        assert received == [_expected()]
    finally:
        assert server.close(close_existing_connections=True).wait(5)


@contextmanager
def _tls_acceptor(certs: Any, sw: Switch, **kw: Any) -> Iterator[tuple[Acceptor, int]]:
    lsock = open_listener(Tcp("127.0.0.1", 0), backlog=16, sw=sw)
    called = Event()

    def handler(sock: Any, peer: Any) -> None:
        called.set()

    acc = make_acceptor([lsock.socket], handler, sw=sw, ssl_context=certs.server_context(),
                        **kw)
    acc.start_accepting()
    yield acc, lsock.address.port
    assert not called.is_set()  # nobody finished a handshake


def _silent_client(acc: Acceptor, port: int) -> gsocket.socket:
    """A client that connects and never sends its ClientHello; returns once the server
    holds it (in its handshake)."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=5)
    with gevent.Timeout(5):
        while acc.active < 1:
            gevent.sleep(0.001)
    gevent.sleep(0)  # let the connection's fiber start its handshake
    return sock


def test_aborting_connections_in_their_tls_handshake_closes_them(certs: Any) -> None:
    with Switch() as sw, _tls_acceptor(certs, sw) as (acc, port):
        clients = [_silent_client(acc, port) for _ in range(3)]
        acc.close(close_listeners=False, close_connections=True)  # raised TypeError
        assert acc.idle.wait(5)
        for c in clients:
            assert recv_all(c) == b""  # end of file, at once
            c.close()
    assert acc.stats["handshake_errors"] == 0 and acc.stats["handler_errors"] == 0


def test_cancelling_the_switch_during_a_tls_handshake_ends_it(certs: Any) -> None:
    with Switch() as sw, _tls_acceptor(certs, sw) as (acc, port):
        client = _silent_client(acc, port)
        sw.cancel()
    assert acc.idle.is_set() and acc.closed  # closed with its switch
    assert recv_all(client) == b""
    client.close()
