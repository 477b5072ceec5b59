"""A peer that goes away is not an error: a reset, a broken pipe or end of file escaping
a handler because its own peer left is one DEBUG line with the peer's address (counted
in ``stats["peer_gone"]``), never a handler error or a traceback at ERROR; the same
exception from something else the handler talked to still is a handler error."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from greenserve import Switch, Tcp, net, tcp
from greenserve._acceptor import Acceptor
from greenserve.flow import open_listener

from .helpers import make_acceptor, reset

pytestmark = pytest.mark.timeout(20)


@contextmanager
def engine(handler: Callable[[Any, Any], None], errors: list[BaseException]
           ) -> Iterator[tuple[Acceptor, int]]:
    with Switch() as sw:
        lsock = open_listener(Tcp("127.0.0.1", 0), backlog=16, sw=sw)
        acc = make_acceptor([lsock.socket], handler, sw=sw,
                       on_error=lambda exc, peer: errors.append(exc))
        acc.start_accepting()
        try:
            yield acc, lsock.address.port
        finally:
            acc.close(close_listeners=False, close_connections=True)


def _reset_after_hello(port: int, hello: Event) -> str:
    """Connect, send a line, wait until the server read it, reset; the client's address."""
    c = gsocket.create_connection(("127.0.0.1", port), timeout=5)
    name = f"tcp:127.0.0.1:{c.getsockname()[1]}"
    c.sendall(b"hello\n")
    assert hello.wait(5)
    reset(c)
    return name


def _write_until_it_fails(sock: Any) -> None:
    while True:
        sock.sendall(b"x" * 65536)


def test_a_reset_peer_is_one_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    hello, gone = Event(), Event()

    def handler(sock: Any, peer: Any) -> None:
        assert sock.recv(6) == b"hello\n"
        hello.set()
        assert gone.wait(5)
        _write_until_it_fails(sock)  # ECONNRESET or EPIPE escapes

    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG, logger="greenserve")
    with engine(handler, errors) as (acc, port):
        name = _reset_after_hello(port, hello)
        gone.set()
        assert acc.idle.wait(5)
    assert errors == [] and acc.stats["handler_errors"] == 0
    assert acc.stats["peer_gone"] == 1
    lines = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG
    assert name in lines[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_reset_of_something_else_is_still_a_handler_error() -> None:
    def handler(sock: Any, peer: Any) -> None:
        # The handler's own client is alive: this reset is not its peer leaving.
        raise ConnectionResetError(104, "the backend reset")

    errors: list[BaseException] = []
    with engine(handler, errors) as (acc, port):
        c = gsocket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            with gevent.Timeout(5):
                while not errors:
                    gevent.sleep(0.001)
        finally:
            c.close()
    assert len(errors) == 1 and "backend" in str(errors[0])
    assert acc.stats["peer_gone"] == 0 and acc.stats["handler_errors"] == 1


def test_end_of_file_mid_message_ends_a_tcp_server_connection_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    # tcp.Server's default on_handler_error is "raise": a peer that leaves in the middle
    # of a message (IncompleteRead) must not close the server.
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        reader.read_exactly(100)

    caplog.set_level(logging.DEBUG, logger="greenserve")
    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0), handler)
    try:
        for _ in range(2):
            c = gsocket.create_connection(("127.0.0.1", server.listening_on), timeout=5)
            c.sendall(b"only ten b")
            c.close()
        with gevent.Timeout(5):
            while server.stats()["peer_gone"] < 2:
                gevent.sleep(0.001)
        assert not server.is_closed
        assert server.stats()["handler_errors"] == 0
    finally:
        server.close()
        assert server.close_finished.wait(5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_run_server_logs_a_reset_peer_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    hello, gone = Event(), Event()
    errors: list[BaseException] = []

    def handler(flow: Any, addr: Any) -> None:
        assert flow.read() == b"hello\n"
        hello.set()
        assert gone.wait(5)
        while True:
            flow.write(b"x" * 65536)  # greenserve's ConnectionReset escapes

    caplog.set_level(logging.DEBUG, logger="greenserve")
    stop = Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        server = sw.fork(net.run_server, lsock, handler, on_error=errors.append, stop=stop)
        name = _reset_after_hello(lsock.address.port, hello)
        gone.set()
        with gevent.Timeout(5):
            while not [r for r in caplog.records if "went away" in r.getMessage()]:
                gevent.sleep(0.001)
        stop.set()
        server.join(5)
    assert errors == []
    lines = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.DEBUG and name in lines[0].getMessage()
