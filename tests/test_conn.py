"""greenserve._gevent.Conn, the servers' lean connection, against real sockets: it must
behave as the gevent socket it stands in for (waits in the calling greenlet, timeouts,
a close from another greenlet, a stray switch caught), and make a gevent socket over
the same connection when asked.

These also pin the gevent internals it waits with: an io watcher or timer started with a
greenlet's ``switch``, the hub switched to directly, ``watcher.callback.__self__`` to
find the greenlet waiting.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import pytest
from gevent import socket as gsocket
from gevent._socket3 import _closedsocket
from gevent.exceptions import BlockingSwitchOutError, ConcurrentObjectUseError, InvalidSwitchError

from greenserve import _gevent

pytestmark = pytest.mark.timeout(10)

Pair = tuple[_gevent.Conn, socket.socket]


def _connected(kind: str) -> tuple[socket.socket, socket.socket]:
    """A connected pair of stdlib sockets, unix or TCP on loopback: ours, the peer."""
    if kind == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return ours, peer


@pytest.fixture(params=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A Conn and its blocking stdlib peer (the peer never blocks the hub: tests use it
    only for what the kernel takes at once, or from a thread-free path with data ready)."""
    a, b = _connected(request.param)
    conn = _gevent.Conn(a.detach(), b.family)
    try:
        yield conn, b
    finally:
        conn.close()
        b.close()


def test_recv_waits_in_the_calling_greenlet_until_data_arrives(pair: Pair) -> None:
    conn, peer = pair
    reader = gevent.spawn(conn.recv, 100)
    gevent.sleep(0)
    assert not reader.dead  # waiting, and the hub runs on
    peer.sendall(b"hello")
    assert reader.get(timeout=5) == b"hello"
    buf = bytearray(10)
    peer.sendall(b"again")
    assert conn.recv_into(buf) == 5 and buf[:5] == b"again"
    peer.shutdown(socket.SHUT_WR)
    assert conn.recv(10) == b""  # end of file


def test_send_and_sendall_reach_the_peer(pair: Pair) -> None:
    conn, peer = pair
    assert conn.send(b"abc") == 3
    conn.sendall(bytearray(b"defg"))
    conn.sendall(memoryview(b"hij"))
    got = b""
    while len(got) < 10:
        got += peer.recv(100)
    assert got == b"abcdefghij"


def test_sendall_waits_for_room_then_sends_everything(pair: Pair) -> None:
    conn, peer = pair
    data = os.urandom(4 << 20)  # far more than the kernel buffers hold
    writer = gevent.spawn(conn.sendall, data)
    got = bytearray()
    peer.setblocking(False)
    while len(got) < len(data):
        gevent.sleep(0.001)  # the writer runs in between
        try:
            got += peer.recv(1 << 20)
        except BlockingIOError:
            pass
    writer.get(timeout=5)
    assert bytes(got) == data


def test_timeouts_are_gevents(pair: Pair) -> None:
    conn, _ = pair
    assert conn.gettimeout() is None
    conn.settimeout(0.05)
    with pytest.raises(TimeoutError):
        conn.recv(10)
    conn.settimeout(0.0)  # non-blocking, as socket.settimeout(0.0)
    with pytest.raises(BlockingIOError):
        conn.recv(10)
    with pytest.raises(BlockingIOError):
        conn.sendall(b"x" * (8 << 20))
    conn.settimeout(0.05)
    with pytest.raises(TimeoutError):  # the peer never reads: the whole call is bounded
        conn.sendall(b"x" * (8 << 20))
    assert conn.gettimeout() == 0.05


def test_close_from_another_greenlet_raises_ebadf_in_the_waiter(pair: Pair) -> None:
    conn, _ = pair
    reader = gevent.spawn(conn.recv, 10)
    gevent.sleep(0)
    conn.close()
    with pytest.raises(OSError) as caught:
        reader.get(timeout=5)
    assert caught.value.errno == errno.EBADF
    assert conn.fileno() == -1
    conn.close()  # idempotent


def test_a_second_greenlet_waiting_for_the_same_event_is_refused(pair: Pair) -> None:
    conn, peer = pair
    first = gevent.spawn(conn.recv, 10)
    gevent.sleep(0)
    second = gevent.spawn(conn.recv, 10)
    with pytest.raises(ConcurrentObjectUseError):
        second.get(timeout=5)
    peer.sendall(b"x")
    assert first.get(timeout=5) == b"x"  # the first wait was not disturbed


def test_waiting_in_the_hub_is_refused(pair: Pair) -> None:
    conn, _ = pair
    result = gevent.event.AsyncResult()

    def in_hub() -> None:
        try:
            conn.recv(10)
        except BaseException as exc:  # handed to the test
            result.set(exc)

    gevent.get_hub().loop.run_callback(in_hub)
    assert isinstance(result.get(timeout=5), BlockingSwitchOutError)


def test_a_killed_waiter_leaves_the_connection_usable(pair: Pair) -> None:
    conn, peer = pair
    reader = gevent.spawn(conn.recv, 10)
    gevent.sleep(0)
    reader.kill(timeout=5)  # thrown in while waiting: the watcher must stop
    peer.sendall(b"x")
    assert gevent.spawn(conn.recv, 10).get(timeout=5) == b"x"


def test_a_stray_switch_into_a_waiter_is_caught(pair: Pair) -> None:
    conn, _ = pair
    reader = gevent.spawn(conn.recv, 10)
    gevent.sleep(0)
    gevent.get_hub().loop.run_callback(reader.switch, "stray")
    with pytest.raises(InvalidSwitchError):
        reader.get(timeout=5)


def test_gevent_socket_is_the_same_connection(pair: Pair) -> None:
    conn, peer = pair
    conn.settimeout(3.0)
    gsock = conn.gevent_socket()
    assert isinstance(gsock, gsocket.socket)
    assert conn.gevent_socket() is gsock  # made once
    assert gsock.fileno() == conn.fileno() and gsock.gettimeout() == 3.0
    peer.sendall(b"one")
    assert gsock.recv(10) == b"one"
    peer.sendall(b"two")
    assert conn.recv(10) == b"two"  # both read the same connection
    gsock.sendall(b"3")
    conn.sendall(b"4")
    got = b""
    while len(got) < 2:
        got += peer.recv(2)
    assert got == b"34"
    conn.close()
    assert gsock.fileno() == -1  # closing the connection closes gevent's socket too


def test_closing_the_gevent_socket_ends_a_wait_on_the_connection(pair: Pair) -> None:
    # gevent's close (its _drop_events_and_close) cancels only its own watchers; the
    # socket a Conn makes also ends the waits on the Conn's.
    conn, _ = pair
    gsock = conn.gevent_socket()
    reader = gevent.spawn(conn.recv, 10)
    gevent.sleep(0)
    gsock.close()
    with pytest.raises(OSError) as caught:
        reader.get(timeout=5)
    assert caught.value.errno == errno.EBADF


def test_the_gevent_sockets_timeout_governs_the_connections_waits(pair: Pair) -> None:
    conn, _ = pair
    gsock = conn.gevent_socket()
    gsock.settimeout(0.05)  # by code that holds gevent's socket
    assert conn.gettimeout() == 0.05
    with pytest.raises(TimeoutError):
        conn.recv(10)
    gsock.setblocking(False)
    with pytest.raises(BlockingIOError):
        conn.recv(10)
    conn.settimeout(None)
    assert gsock.gettimeout() is None


def test_a_closed_connection_makes_no_gevent_socket(pair: Pair) -> None:
    conn, _ = pair
    conn.close()
    with pytest.raises(OSError) as caught:
        conn.gevent_socket()
    assert caught.value.errno == errno.EBADF


def test_a_failed_start_closes_the_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "not-a-socket", os.O_CREAT | os.O_RDWR)
    with pytest.raises(OSError):
        _gevent.Conn(fd, socket.AF_INET)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: nothing leaks


# -- ServedSocket: gevent's socket with the shallow wait ----------------------------------


@pytest.fixture(params=["unix", "tcp"])
def served(request: pytest.FixtureRequest
           ) -> Iterator[tuple[_gevent.ServedSocket, socket.socket]]:
    a, b = _connected(request.param)
    sock = _gevent.ServedSocket(a.family, socket.SOCK_STREAM, 0, fileno=a.detach())
    try:
        yield sock, b
    finally:
        sock.close()
        b.close()


def test_served_socket_waits_in_the_greenlet_and_times_out_as_gevents(
        served: tuple[_gevent.ServedSocket, socket.socket]) -> None:
    sock, peer = served
    assert isinstance(sock, gsocket.socket)
    reader = gevent.spawn(sock.recv, 10)
    gevent.sleep(0)
    assert not reader.dead
    peer.sendall(b"hi")
    assert reader.get(timeout=5) == b"hi"
    sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        sock.recv(10)
    with pytest.raises(ConcurrentObjectUseError):
        sock.settimeout(None)
        first = gevent.spawn(sock.recv, 10)
        gevent.sleep(0)
        try:
            sock.recv(10)
        finally:
            first.kill()


def test_served_socket_close_from_another_greenlet_wakes_the_waiter_with_ebadf(
        served: tuple[_gevent.ServedSocket, socket.socket]) -> None:
    # gevent's close finds the waiter as its watcher callback's __self__.
    sock, _ = served
    reader = gevent.spawn(sock.recv, 10)
    gevent.sleep(0)
    sock.close()
    with pytest.raises(OSError) as caught:
        reader.get(timeout=5)
    assert caught.value.errno == errno.EBADF


def test_served_socket_close_is_gevents_close(
        served: tuple[_gevent.ServedSocket, socket.socket]) -> None:
    # ServedSocket.close is gevent's close in one call: the same checks of gevent's
    # internals (_io_refs, the _closedsocket placeholder) that gevent's own makes.
    sock, peer = served
    stream = sock.makefile("rb")
    sock.close()  # a file is open on it: the fd stays open until the file closes
    peer.sendall(b"still here\n")
    assert stream.readline() == b"still here\n"
    stream.close()  # the last reference: now the socket closes
    peer.settimeout(5)
    assert peer.recv(10) == b""
    assert sock._sock.__class__ is _closedsocket  # what close() checks, as gevent's does
    sock.close()  # again: nothing happens
    with pytest.raises(OSError) as caught:
        sock.recv(10)
    assert caught.value.errno == errno.EBADF
