"""Every duration argument of every public function is checked the same way: a finite
number of seconds > 0 (or ``None`` where documented); ``TypeError`` for anything that
is not a number (``bool`` included), ``ValueError`` for NaN, infinity, 0 and negative
values; the message names the argument. Nothing is bound or connected for a bad one
(the autouse leak check sees no fd)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from gevent import socket as gsocket

from greenserve import StreamServer, Switch, Tcp, net, tcp
from greenserve._proxy import read_proxy_header
from greenserve.stream import Writer

pytestmark = pytest.mark.timeout(10)

BAD = [(True, TypeError), ("1", TypeError), (0, ValueError), (-1, ValueError),
       (math.nan, ValueError), (math.inf, ValueError)]

NOWHERE = tcp.WhereToConnect.of_host_and_port("127.0.0.1", 9)
HERE = tcp.WhereToListen.bind_to("127.0.0.1", 0)


def _handler(*args: Any) -> None:
    pass


def _run_server(**kw: Any) -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        try:
            net.run_server(lsock, _handler, on_error=print, **kw)
        finally:
            lsock.close()


def _serve_listeners(**kw: Any) -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        try:
            net.serve_listeners([lsock], _handler, on_error=print, **kw)
        finally:
            lsock.close()


def _net_connect(**kw: Any) -> None:
    with Switch() as sw:
        net.connect(Tcp("127.0.0.1", 9), sw=sw, **kw)


def _with_tcp_connect(**kw: Any) -> None:
    with net.with_tcp_connect("127.0.0.1", 9, **kw):
        pass


def _writer(**kw: Any) -> None:
    a, b = gsocket.socketpair()
    try:
        Writer(a, **kw).close()
    finally:
        a.close()
        b.close()


def _proxy_header(**kw: Any) -> None:
    a, b = gsocket.socketpair()
    try:
        read_proxy_header(a, **kw)
    finally:
        a.close()
        b.close()


def _stream_server(**kw: Any) -> None:
    StreamServer(("127.0.0.1", 0), _handler, **kw).close()


# (what, call, argument name)
CASES: list[tuple[str, Callable[..., object], str]] = [
    ("run_server", _run_server, "drain_timeout"),
    ("run_server", _run_server, "handshake_timeout"),
    ("run_server", _run_server, "idle_timeout"),
    ("serve_listeners", _serve_listeners, "drain_timeout"),
    ("serve_listeners", _serve_listeners, "handshake_timeout"),
    ("serve_listeners", _serve_listeners, "idle_timeout"),
    ("net.connect", _net_connect, "timeout"),
    ("net.with_tcp_connect", _with_tcp_connect, "timeout"),
    ("net.with_tcp_connect", _with_tcp_connect, "happy_eyeballs_delay"),
    ("tcp.Server.create", lambda **kw: tcp.Server.create(HERE, _handler, **kw),
     "buffer_age_limit"),
    ("tcp.Server.create", lambda **kw: tcp.Server.create(HERE, _handler, **kw),
     "handshake_timeout"),
    ("tcp.Server.create", lambda **kw: tcp.Server.create(HERE, _handler, **kw), "idle_timeout"),
    ("tcp.Server.create_sock", lambda **kw: tcp.Server.create_sock(HERE, _handler, **kw),
     "handshake_timeout"),
    ("tcp.Server.create_sock", lambda **kw: tcp.Server.create_sock(HERE, _handler, **kw),
     "idle_timeout"),
    ("tcp.connect", lambda **kw: tcp.connect(NOWHERE, **kw), "timeout"),
    ("tcp.connect", lambda **kw: tcp.connect(NOWHERE, **kw), "buffer_age_limit"),
    ("tcp.connect_sock", lambda **kw: tcp.connect_sock(NOWHERE, **kw), "timeout"),
    ("tcp.with_connection", lambda **kw: tcp.with_connection(NOWHERE, _handler, **kw),
     "timeout"),
    ("Writer", _writer, "buffer_age_limit"),
    ("read_proxy_header", _proxy_header, "timeout"),
    ("StreamServer", _stream_server, "handshake_timeout"),
    ("StreamServer", _stream_server, "idle_timeout"),
]


@pytest.mark.parametrize(("what", "call", "name"), CASES,
                         ids=[f"{what}-{name}" for what, _, name in CASES])
@pytest.mark.parametrize(("value", "error"), BAD, ids=[repr(v) for v, _ in BAD])
def test_a_bad_duration_is_refused_naming_the_argument(
        what: str, call: Callable[..., object], name: str, value: object,
        error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        call(**{name: value})
    assert name in str(info.value), f"{what}: {info.value}"
