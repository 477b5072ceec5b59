"""Unix peers with whatever name the kernel allows, on real sockets in tmp_path: a name
that is not UTF-8, an abstract name of the full 108 bytes, no name at all. Building
their address never raises, so one such local client never stops a listener: through
``net.accept``, ``ListeningSocket.accept``, ``Flow.peer``/``local``, ``accept_fork``,
``run_server`` (a normal client is served after the odd one) and datagram ``recv``.
The same names work as addresses greenserve binds and connects to."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from greenserve import Switch, Tcp, Unix, net, parse_address
from greenserve.flow import Flow

# How long any one exchange may take: these are local sockets, a second is plenty.
WAIT = 5.0


def not_utf8_name(tmp_path: Path) -> bytes:
    return os.fsencode(tmp_path) + b"/c\xff"


def full_abstract_name(tmp_path: Path) -> bytes:
    # The abstract namespace is shared by every process of this network namespace:
    # a unique name, padded with bytes that are not UTF-8 to the whole sun_path.
    unique = f"\0greenserve-{os.getpid()}-{uuid.uuid4().hex}-".encode()
    return unique.ljust(108, b"\xfe")


NAMES: dict[str, Callable[[Path], bytes]] = {
    "not utf-8": not_utf8_name,
    "abstract 108 bytes": full_abstract_name,
}


@pytest.fixture(params=list(NAMES))
def odd_name(request: pytest.FixtureRequest, tmp_path: Path) -> bytes:
    name = NAMES[request.param](tmp_path)
    assert len(name) == 108 or b"\xff" in name
    return name


def listener_path(tmp_path: Path) -> Unix:
    return Unix(str(tmp_path / "s.sock"))


def connect_as(name: bytes | None, target: Tcp | Unix) -> gsocket.socket:
    """A client stream socket bound to ``name`` (``None``: unnamed), connected to
    ``target``."""
    sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if name is not None:
            sock.bind(name)
        sock.connect(target.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def read_to_end(sock: gsocket.socket) -> bytes:
    chunks = []
    with gevent.Timeout(WAIT):
        while data := sock.recv(4096):
            chunks.append(data)
    return b"".join(chunks)


def tell_peer(flow: Flow, addr: Any) -> None:
    """The handler: write the peer's address as the server saw it, then close."""
    assert flow.peer == addr
    flow.write(str(addr).encode())


def test_a_unix_address_holds_what_the_peer_bound(odd_name: bytes) -> None:
    address = Unix(odd_name)
    assert isinstance(address.path, bytes) and address.sockaddr == odd_name
    assert parse_address(str(address)) == address
    assert str(address).isprintable()


# -- stream peers ------------------------------------------------------------------------------


def test_accept_gives_the_peer_its_name(odd_name: bytes, tmp_path: Path) -> None:
    expected = Unix(odd_name)
    with Switch() as sw:
        lsock = net.listen(listener_path(tmp_path), sw=sw)
        with connect_as(odd_name, lsock.address) as csock:
            server, peer = net.accept(lsock, sw=sw)
            assert peer == expected and server.peer == expected
            with Flow(server.socket.dup()) as again:  # peer read from the socket itself
                assert again.peer == expected and again.local == lsock.address
            client = Flow(csock)
            assert client.local == expected and client.peer == lsock.address
            server.write(b"still a working connection")
            assert csock.recv(100) == b"still a working connection"
            server.close()
        with connect_as(None, lsock.address):  # then an unnamed client, as before
            server, peer = lsock.accept(sw=sw)
            assert str(peer) == "unix:" and not server.closed


def test_accept_fork_serves_the_peer_then_the_next_one(odd_name: bytes,
                                                      tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with Switch() as sw:
        lsock = net.listen(listener_path(tmp_path), sw=sw)
        for name, seen in ((odd_name, str(Unix(odd_name))), (None, "unix:")):
            with connect_as(name, lsock.address) as csock:
                net.accept_fork(lsock, sw=sw, on_error=errors.append, handler=tell_peer)
                assert read_to_end(csock).decode() == seen
    assert errors == []


def test_run_server_serves_the_peer_then_a_normal_client(odd_name: bytes,
                                                         tmp_path: Path) -> None:
    # The engine takes the odd peer like any other: its address is built in the
    # accept callback, which must not fail and must not stop accepting.
    errors: list[BaseException] = []
    stop = Event()
    with Switch() as sw:
        lsock = net.listen(listener_path(tmp_path), sw=sw)
        served = sw.fork_promise(net.run_server, lsock, tell_peer, on_error=errors.append,
                                 stop=stop)
        with connect_as(odd_name, lsock.address) as csock:
            assert read_to_end(csock).decode() == str(Unix(odd_name))
        with connect_as(None, lsock.address) as csock:
            assert read_to_end(csock) == b"unix:"
        stop.set()
        served.get(timeout=WAIT)
    assert errors == []


# -- datagram peers ----------------------------------------------------------------------------


def test_datagram_recv_from_the_peer_and_answer_it(odd_name: bytes, tmp_path: Path) -> None:
    expected = Unix(odd_name)
    buf = bytearray(64)
    with Switch() as sw:
        server = net.datagram_socket(Unix(str(tmp_path / "d.sock")), sw=sw)
        assert isinstance(server.address, Unix)
        for name in (odd_name, None):
            with gsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as csock:
                if name is not None:
                    csock.bind(name)
                csock.sendto(b"ping", server.address.sockaddr)
                with gevent.Timeout(WAIT):
                    sender, n = server.recv(buf)
                assert bytes(buf[:n]) == b"ping"
                if name is None:
                    assert str(sender) == "unix:"  # unbound: nothing to answer
                    continue
                assert sender == expected
                server.send(sender, b"pong")
                with gevent.Timeout(WAIT):
                    assert csock.recv(64) == b"pong"


# -- greenserve binding and connecting to such names -------------------------------------------


def test_listen_connect_and_unlink_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    name = not_utf8_name(tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(name)
    stale.close()  # a stale socket file, to be replaced
    with Switch() as sw:
        lsock = net.listen(Unix(name), sw=sw, reuse_addr=True)
        assert lsock.address == Unix(name) and isinstance(lsock.address.path, bytes)
        client = net.connect(parse_address(str(lsock.address)), sw=sw)
        server, _ = lsock.accept(sw=sw)
        client.write(b"x")
        assert server.read() == b"x"
        assert server.local == Unix(name) and client.peer == Unix(name)
    assert not os.path.lexists(name)  # ours: removed at the end


def test_listen_and_bind_datagrams_on_a_full_abstract_name(tmp_path: Path) -> None:
    stream_name, dgram_name = full_abstract_name(tmp_path), full_abstract_name(tmp_path)
    with Switch() as sw:
        lsock = net.listen(Unix(stream_name), sw=sw)
        assert lsock.address == Unix(stream_name) and lsock.address.abstract
        client = net.connect(lsock.address, sw=sw)
        server, _ = lsock.accept(sw=sw)
        assert client.peer == Unix(stream_name) == server.local
        dgram = net.datagram_socket(Unix(dgram_name), sw=sw)
        assert dgram.address == Unix(dgram_name)
        dgram.send(Unix(dgram_name), b"to myself")
        buf = bytearray(16)
        with gevent.Timeout(WAIT):
            sender, n = dgram.recv(buf)
        assert (sender, bytes(buf[:n])) == (Unix(dgram_name), b"to myself")
