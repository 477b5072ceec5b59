"""greenserve._gevent: each gevent (or stdlib) internal greenserve relies on, checked
against the installed gevent. A gevent release that changes one of them fails here,
by name, instead of somewhere deep in a server."""

from __future__ import annotations

import _socket
import errno
import socket
import ssl
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl

from greenserve import _gevent

pytestmark = pytest.mark.timeout(10)


def test_raw_socket_is_the_stdlib_socket_until_closed() -> None:
    a, b = gsocket.socketpair()
    try:
        raw = _gevent.raw_socket(a)
        # A subclass of the C socket (gevent's weak-referenceable one): its methods are
        # the kernel's, never gevent's waiting ones.
        assert isinstance(raw, _socket.socket) and type(raw).send is _socket.socket.send
        assert raw.gettimeout() == 0.0  # non-blocking at the OS level
        assert raw is not None and raw.fileno() == a.fileno()
    finally:
        a.close()
        b.close()
    assert _gevent.raw_socket(a) is None


def test_kernel_shutdown_wakes_a_blocked_reader_with_end_of_file() -> None:
    a, b = gsocket.socketpair()
    try:
        reader = gevent.spawn(a.recv, 10)
        gevent.sleep(0)
        _gevent.kernel_shutdown(a)
        assert reader.get(timeout=5) == b""  # gevent's own shutdown would raise EBADF
        assert b.recv(10) == b""  # the peer sees end of file too
    finally:
        a.close()
        b.close()
    _gevent.kernel_shutdown(a)  # closed: nothing to do, no error


def test_wait_readable_returns_once_data_arrives() -> None:
    a, b = gsocket.socketpair()
    try:
        waiter = gevent.spawn(_gevent.wait_readable, a)
        gevent.sleep(0)
        assert not waiter.dead
        b.sendall(b"x")
        waiter.get(timeout=5)
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()


def test_raw_accept_returns_an_fd_and_a_sockaddr() -> None:
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accept = _gevent.raw_accept(listener)
    assert accept is not None
    try:
        with pytest.raises(BlockingIOError):
            accept()  # non-blocking: nobody is waiting
        client = socket.create_connection(listener.getsockname())
        fd, addr = accept()
        try:
            assert isinstance(fd, int) and addr == client.getsockname()
        finally:
            socket.socket(fileno=fd).close()
            client.close()
    finally:
        listener.close()
    assert _gevent.raw_accept(listener) is None  # closed: nothing to accept from


def _tls_pair(certs: Any) -> tuple[gssl.SSLSocket, gssl.SSLSocket]:
    a, b = gsocket.socketpair()
    server = _gevent.tls_wrap(a, certs.server_context(), server_side=True, server_hostname=None)
    client = _gevent.tls_wrap(b, certs.client_context(), server_side=False,
                              server_hostname="localhost")
    assert _gevent.raw_socket(a) is None  # the wrapper took the fd over
    handshake = gevent.spawn(server.do_handshake)
    client.do_handshake()
    handshake.get(timeout=5)
    return server, client


def test_tls_wrap_takes_a_stdlib_context_and_tls_send_nowait_never_waits(certs: Any) -> None:
    server, client = _tls_pair(certs)
    try:
        assert _gevent.tls_send_nowait(server, b"hello") == (5, 0)
        assert client.recv(5) == b"hello"
        # Nobody reads: the kernel buffers fill and the write asks to wait for WRITE,
        # in this greenlet, without blocking (a blocking send would raise here).
        chunk = b"x" * 65536
        with gevent.Timeout(5):
            while _gevent.tls_send_nowait(server, chunk) != (0, _gevent.WRITE):
                pass
    finally:
        server.close()
        client.close()
    with pytest.raises(OSError) as info:
        _gevent.tls_send_nowait(server, b"late")
    assert info.value.errno == errno.EBADF


def test_event_masks_are_libevs() -> None:
    loop = gevent.get_hub().loop
    a, b = gsocket.socketpair()
    try:
        read = loop.io(a.fileno(), _gevent.READ)
        write = loop.io(a.fileno(), _gevent.WRITE)
        mask = _gevent.READ | _gevent.WRITE  # libev adds flags of its own above these
        assert (read.events & mask, write.events & mask) == (1, 2)
        read.close()
        write.close()
    finally:
        a.close()
        b.close()


def test_the_tls_error_classes_are_the_stdlibs() -> None:
    # tls_send_nowait catches the stdlib's classes: gevent must raise those.
    assert gssl.SSLWantWriteError is ssl.SSLWantWriteError
    assert gssl.SSLWantReadError is ssl.SSLWantReadError


def test_holds_tells_whether_gevent_closed_or_detached_the_socket(certs: Any) -> None:
    a, b = gsocket.socketpair()
    raw = _gevent.raw_socket(a)
    assert raw is not None and _gevent.holds(a, raw)
    a.close()
    assert not _gevent.holds(a, raw)
    c, d = gsocket.socketpair()
    raw = _gevent.raw_socket(c)
    assert raw is not None
    tls = _gevent.tls_wrap(c, certs.server_context(), server_side=True, server_hostname=None)
    assert not _gevent.holds(c, raw)  # the TLS wrapper took the fd
    for s in (tls, b, d):
        s.close()


def test_peer_gone_asks_the_connections_state_not_its_queue() -> None:
    a, b = gsocket.socketpair()
    try:
        assert not _gevent.peer_gone(a)  # alive, nothing to read
        b.sendall(b"x")
        assert not _gevent.peer_gone(a)  # alive, data waiting
        b.shutdown(socket.SHUT_WR)       # the peer finished sending, still reads
        assert not _gevent.peer_gone(a)
        assert _gevent.peer_gone(a, sending_ended=True)
        b.close()
        assert _gevent.peer_gone(a)      # gone, whatever is still queued ("x")
        assert a.recv(1) == b"x"
    finally:
        a.close()
        b.close()
    assert not _gevent.peer_gone(a)      # closed: nothing to ask


def test_receive_waits_for_readability_and_raw_send_never_waits() -> None:
    a, b = gsocket.socketpair()
    try:
        reader = gevent.spawn(_gevent.receive, a, "recv", 10, True)
        gevent.sleep(0)
        assert not reader.dead  # waiting for readability, not failing with EAGAIN
        assert _gevent.raw_send(b, b"ping") == 4
        assert reader.get(timeout=5) == b"ping"
        buf = bytearray(4)
        b.sendall(b"pong")
        assert _gevent.receive(a, "recv_into", buf, False) == 4 and buf == b"pong"
        with pytest.raises(BlockingIOError):
            while True:  # nobody reads b's peer: the kernel fills up, never a wait
                _gevent.raw_send(b, b"x" * 65536)
    finally:
        a.close()
        b.close()
    with pytest.raises(OSError) as info:
        _gevent.raw_send(b, b"late")
    assert info.value.errno == errno.EBADF


def test_kernel_shutdown_raises_when_asked_to() -> None:
    a, b = gsocket.socketpair()
    a.close()
    b.close()
    _gevent.kernel_shutdown(a)  # quiet: nothing to do
    with pytest.raises(OSError) as info:
        _gevent.kernel_shutdown(a, quiet=False)
    assert info.value.errno == errno.EBADF


def test_has_unread_sees_bytes_and_end_of_file_without_waiting() -> None:
    # What decides whether a keep-alive connection is idle (a stop, a reclaim) or has a
    # request (or its end) to read.
    server, client = gsocket.socketpair()
    with server, client:
        assert not _gevent.has_unread(server)
        client.sendall(b"GET / HTTP/1.1\r\n")
        assert _gevent.has_unread(server)
        server.recv(100)
        assert not _gevent.has_unread(server)
        client.shutdown(socket.SHUT_WR)
        assert _gevent.has_unread(server)  # end of file: the reader wakes up to it at once
    assert not _gevent.has_unread(server)  # closed


def test_bytes_received_counts_what_a_tcp_connection_received(certs: Any) -> None:
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = gsocket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    with listener, client, server:
        assert _gevent.bytes_received(server) == 0
        client.sendall(b"hello")
        assert server.recv(5) == b"hello"
        assert _gevent.bytes_received(server) == 5  # read or not, counted
        a, b = gsocket.socketpair()
        with a, b:
            assert _gevent.bytes_received(a) is None  # not TCP: unknown
    assert _gevent.bytes_received(server) is None  # closed


def test_tls_wrap_of_a_reset_connection_closes_the_fd_it_took(certs: Any) -> None:
    # gevent's SSLSocket takes the fd over, then finds the peer gone and raises: the fd
    # must be closed now, not left to the garbage collector.
    import os
    import struct

    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = gsocket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    with listener:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # a reset
        with gevent.Timeout(5):
            while True:  # until the reset arrived (without consuming its error)
                try:
                    server.getpeername()
                except OSError:
                    break
                gevent.sleep(0.001)
        fd = server.fileno()
        with pytest.raises(OSError):
            _gevent.tls_wrap(server, certs.server_context(), server_side=True,
                             server_hostname=None)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed at once
        server.close()
