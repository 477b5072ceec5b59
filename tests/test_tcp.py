"""greenserve.tcp (Jane Street Async's ``Tcp``) on real loopback TCP and unix sockets:
docs/tcp.md, promise by promise.

Synchronisation is by events, blocking reads bounded by a socket timeout, and bounded
waits on conditions the server makes true (``wait_until``); never by sleeping for a
guessed time. The autouse ``no_leaks`` fixture (conftest) fails a test that leaves an fd
open or a greenlet running: that is how "everything is closed" is checked throughout.

Clients made by ``dial_now`` connect with a blocking stdlib socket: the connection is in
the server's accept queue before the hub (and so the server) runs again. That makes
"connect right after ``create`` returns" and "these clients wait in the backlog"
deterministic.
"""

from __future__ import annotations

import contextvars
import errno
import math
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import getcurrent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from greenserve import (
    Cancelled,
    ConnectInterrupted,
    ConnectionFailure,
    ConnectionReset,
    ConnectTimeout,
    IncompleteRead,
    LineTooLong,
    Refused,
    Switch,
    Tcp,
    Unix,
    stream,
    tcp,
)

from .helpers import closed_by_server, recv_all, shut_down_reading

pytestmark = pytest.mark.timeout(30)

LOCAL = tcp.WhereToListen.bind_to("127.0.0.1", 0)
# Bound on every blocking step of a test: far above what any step needs on loopback.
TIMEOUT = 5.0
# Far more than the kernel holds for a peer that does not read (tcp_wmem's maximum is
# 4 MiB, a unix socket's send buffer about 200 KiB): a writer of this much stalls.
FLOOD = 16 * 1024 * 1024
# A client receive buffer this small keeps the TCP window (and so the kernel's share of
# a flood) small.
SMALL_RCVBUF = 4096


# -- helpers -----------------------------------------------------------------------------------


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait (cooperatively, bounded) for a condition the server makes true."""
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout} s: {cond}")):
        while not cond():
            gevent.sleep(0.001)


def _target(server: tcp.Server) -> tuple[socket.AddressFamily, Any]:
    where = server.listening_on
    if isinstance(where, int):
        return socket.AF_INET, ("127.0.0.1", where)
    return socket.AF_UNIX, where


def dial(server: tcp.Server, *, rcvbuf: int | None = None) -> gsocket.socket:
    """A gevent client socket connected to ``server`` (127.0.0.1 or its unix path)."""
    family, target = _target(server)
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(TIMEOUT)
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def dial_now(server: tcp.Server | None = None, *, port: int | None = None) -> gsocket.socket:
    """Connect with a blocking stdlib socket, without yielding to the hub (so the server
    runs nothing meanwhile); return it as a gevent socket with a timeout."""
    if server is not None:
        family, target = _target(server)
    else:
        family, target = socket.AF_INET, ("127.0.0.1", port)
    raw = socket.socket(family, socket.SOCK_STREAM)
    try:
        raw.settimeout(TIMEOUT)
        raw.connect(target)
    except BaseException:
        raw.close()
        raise
    sock = gsocket.socket(family, socket.SOCK_STREAM, fileno=raw.detach())
    sock.settimeout(TIMEOUT)
    return sock


@contextmanager
def all_closed(socks: list[gsocket.socket]) -> Iterator[list[gsocket.socket]]:
    """Close every socket of ``socks`` on exit (a failing test must not also leak)."""
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def address_of(client: gsocket.socket) -> Tcp:
    host, port = client.getsockname()
    return Tcp(host, port)


def ask(sock: gsocket.socket, line: bytes) -> bytes:
    """Send ``line`` and a newline; return the reply line (without its newline)."""
    sock.sendall(line + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, f"end of file after {got!r}"
        got += chunk
    return got[:-1]


def recv_exactly(sock: gsocket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"end of file after {len(got)} of {n} bytes"
        got += chunk
    return got


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accept_queue_length(lsock: gsocket.socket) -> int:
    # Linux reports a listening socket's accept queue length in tcp_info.tcpi_unacked
    # (offset 24: eight one-byte fields, then rto, ato, snd_mss, rcv_mss as u32).
    info = lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 24)[0])


def wait_queued(lsock: gsocket.socket, n: int) -> None:
    """Wait until ``n`` connections sit in ``lsock``'s accept queue. Blocks the hub on
    purpose (time.sleep): nothing may accept meanwhile."""
    deadline = time.monotonic() + TIMEOUT
    while accept_queue_length(lsock) < n:
        assert time.monotonic() < deadline, f"{accept_queue_length(lsock)} of {n} queued"
        time.sleep(0.001)


@contextmanager
def serving(handler: Callable[..., object], where: object = LOCAL, *, sock: bool = False,
            **kw: Any) -> Iterator[tcp.Server]:
    """A server (``create``, or ``create_sock`` with ``sock=True``); closed with its
    connections, and its handlers waited for, on exit."""
    make = tcp.Server.create_sock if sock else tcp.Server.create
    server = make(where, handler, **kw)
    try:
        yield server
    finally:
        server.close(close_existing_connections=True)
        server.close_finished_and_handlers_determined.wait(TIMEOUT)


def echo_lines(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
    for line in reader:
        writer.write(line + b"\n")


class Errors(list[tuple[Any, BaseException]]):
    """An ``on_handler_error`` callable that collects ``(addr, exc)``."""

    def __call__(self, addr: Any, exc: BaseException) -> None:
        self.append((addr, exc))

    def check(self) -> None:
        if self:
            raise self[0][1]


@pytest.fixture(params=["tcp", "unix"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """Where a server listens: 127.0.0.1 with a port chosen by the OS, or a unix path."""
    if request.param == "tcp":
        return LOCAL
    return tcp.WhereToListen.of_file(str(tmp_path / "s.sock"))


# -- create: where, when, which socket ---------------------------------------------------------


WHERES: dict[str, Callable[[Path], object]] = {
    "of_port_chosen_by_os": lambda d: tcp.WhereToListen.of_port_chosen_by_os(),
    "of_port": lambda d: tcp.WhereToListen.of_port(free_port()),
    "bind_to": lambda d: tcp.WhereToListen.bind_to("127.0.0.1", 0),
    "host:port text": lambda d: "127.0.0.1:0",
    "tcp:// text": lambda d: "tcp://127.0.0.1:0",
    "int port": lambda d: 0,
    "Tcp object": lambda d: Tcp("127.0.0.1", 0),
    "of_file": lambda d: tcp.WhereToListen.of_file(str(d / "s.sock")),
    "unix: text": lambda d: f"unix:{d / 's.sock'}",
}


@pytest.mark.parametrize("kind", list(WHERES))
def test_create_listens_on_every_kind_of_where(kind: str, tmp_path: Path) -> None:
    where = WHERES[kind](tmp_path)
    unix = kind in ("of_file", "unix: text")
    path = str(tmp_path / "s.sock")
    server = tcp.Server.create(where, echo_lines)
    try:
        # No yield since create returned: the socket already listens.
        with dial_now(server) as c:
            assert ask(c, b"hello") == b"hello"
        addr = server.listening_on_address
        if unix:
            assert addr == Unix(path)
            assert server.listening_on == path
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert server.listening_socket.getsockname() == path
        else:
            assert isinstance(addr, Tcp)
            assert isinstance(server.listening_on, int) and server.listening_on > 0
            assert addr.port == server.listening_on
            expected_host = "0.0.0.0" if kind.startswith("of_port") else "127.0.0.1"
            assert addr.host == expected_host
            assert server.listening_socket.getsockname() == (expected_host, addr.port)
            if kind == "of_port":
                assert isinstance(where, Tcp) and addr.port == where.port
    finally:
        server.close()
        assert server.wait(TIMEOUT)
    assert server.listening_socket.fileno() == -1
    if unix:
        assert not os.path.exists(path)  # the path it bound is removed on close


def test_create_on_an_inherited_fd() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    fd = listener.detach()  # the server owns the fd from now on
    with serving(echo_lines, tcp.WhereToListen.of_fd(fd)) as server:
        assert server.listening_on == port
        with dial(server) as c:
            assert ask(c, b"fd") == b"fd"
    # The leak check verifies that closing the server closed the fd.


def test_created_sockets_get_so_reuseaddr_and_rebind_after_connections() -> None:
    def hello(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"hello")

    server = tcp.Server.create(LOCAL, hello)
    port = server.listening_on
    assert server.listening_socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    with dial(server) as c:
        # The server closed first: its side of the connection lingers (TIME_WAIT).
        assert recv_all(c) == b"hello"
    server.close()
    assert server.wait(TIMEOUT)
    # Without SO_REUSEADDR this bind fails with EADDRINUSE.
    with serving(hello, tcp.WhereToListen.bind_to("127.0.0.1", port)) as again, \
            dial(again) as c:
        assert recv_all(c) == b"hello"


def _options(sock: gsocket.socket) -> dict[int, int]:
    names = [socket.SO_REUSEADDR, socket.SO_KEEPALIVE, socket.SO_RCVBUF, socket.SO_SNDBUF]
    if sock.family != socket.AF_UNIX:
        names.append(socket.SO_REUSEPORT)
    return {name: sock.getsockopt(socket.SOL_SOCKET, name) for name in names}


@pytest.mark.parametrize("kind", ["tcp bound", "tcp unbound", "unix unbound"])
def test_a_supplied_socket_is_used_as_is(kind: str, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    family = socket.AF_UNIX if kind.startswith("unix") else socket.AF_INET
    lsock = gsocket.socket(family, socket.SOCK_STREAM)
    if kind == "tcp bound":
        lsock.bind(("127.0.0.1", 0))
    where = tcp.WhereToListen.of_file(path) if family == socket.AF_UNIX else LOCAL
    before = _options(lsock)
    assert before[socket.SO_REUSEADDR] == 0
    with serving(echo_lines, where, socket=lsock) as server:
        assert server.listening_socket is lsock
        assert _options(lsock) == before  # no setsockopt: SO_REUSEADDR still off
        if family == socket.AF_UNIX:
            assert server.listening_on == path
        else:
            assert server.listening_on == lsock.getsockname()[1] > 0
        with dial(server) as c:
            assert ask(c, b"mine") == b"mine"  # the handler runs
    assert lsock.fileno() == -1  # the server owned it once create returned


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: socket.socket(), TypeError, "socket"),  # a stdlib socket
        (lambda: gsocket.socket(socket.AF_INET, socket.SOCK_DGRAM), ValueError, "stream"),
        (lambda: gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM), ValueError, "family"),
    ],
)
def test_a_bad_supplied_socket_is_refused_and_left_to_its_owner(
        make: Callable[[], Any], exc: type, match: str) -> None:
    sock = make()
    try:
        with pytest.raises(exc, match=match):
            tcp.Server.create(LOCAL, echo_lines, socket=sock)
        assert sock.fileno() >= 0  # not ours: not closed
    finally:
        sock.close()


def test_a_closed_supplied_socket_is_refused() -> None:
    sock = gsocket.socket()
    sock.close()
    with pytest.raises(ValueError, match="socket"):
        tcp.Server.create(LOCAL, echo_lines, socket=sock)


# -- the handler and its connection -------------------------------------------------------------


def test_create_handler_gets_the_peer_a_reader_and_a_writer_in_its_own_greenlet() -> None:
    seen: list[tuple[Any, Any, Any, Any, int]] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        seen.append((addr, reader, writer, getcurrent(), server.num_connections))
        line = reader.read_line()
        assert line is not None
        writer.write(line.upper())

    with serving(handler) as server:
        with dial(server) as c1, dial(server) as c2:
            c1.sendall(b"one\n")
            c2.sendall(b"two\n")
            # The handler returned: its connection was closed (the client sees EOF).
            assert recv_all(c1) == b"ONE"
            assert recv_all(c2) == b"TWO"
            peers = {address_of(c1), address_of(c2)}
        wait_until(lambda: server.num_connections == 0)
    assert {s[0] for s in seen} == peers
    assert all(isinstance(s[1], tcp.Reader) and isinstance(s[2], tcp.Writer) for s in seen)
    greenlets = {s[3] for s in seen}
    assert len(greenlets) == 2 and getcurrent() not in greenlets
    assert all(s[4] >= 1 for s in seen)  # counted while the handler runs
    assert all(s[1].closed and s[2].closed for s in seen)


@pytest.mark.parametrize("face", ["create", "create_sock"])
@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_the_connection_is_closed_when_the_handler_ends(face: str, ends: str) -> None:
    conns: list[Any] = []
    errors = Errors()

    def reply(addr: Any, data: bytes) -> None:
        if ends == "raises":
            raise KeyError(f"after replying to {addr}")

    def stream_handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        conns.append((addr, reader, writer))
        writer.write(reader.read(100).upper())
        reply(addr, b"")

    def sock_handler(addr: Any, sock: Any) -> None:
        conns.append((addr, sock))
        sock.sendall(sock.recv(100).upper())
        reply(addr, b"")

    handler = stream_handler if face == "create" else sock_handler
    with serving(handler, sock=face == "create_sock", on_handler_error=errors) as server:
        with dial(server) as c:
            c.sendall(b"abc")
            assert recv_all(c) == b"ABC"  # then end of file
            peer = address_of(c)
        wait_until(lambda: server.num_connections == 0)
        assert not server.is_closed
    assert conns[0][0] == peer
    if face == "create_sock":
        assert isinstance(conns[0][1], gsocket.socket)
        assert conns[0][1].fileno() == -1
    else:
        assert conns[0][1].closed and conns[0][2].closed
    if ends == "raises":
        assert len(errors) == 1 and isinstance(errors[0][1], KeyError)
    else:
        errors.check()


@pytest.mark.parametrize("batch", [1, 10])
def test_the_handler_is_never_called_after_close(batch: int) -> None:
    # Five clients wait in the accept queue; one wake-up may take them all (batch=10)
    # and fork five fibers before any runs. The first handler closes the server: the
    # other four are never handled, only closed.
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    clients = [dial_now(port=port) for _ in range(5)]
    calls: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        calls.append(addr)
        server.close()

    try:
        wait_queued(lsock, 5)
        server = tcp.Server.create(LOCAL, handler, socket=lsock, max_accepts_per_batch=batch)
        for c in clients:
            assert closed_by_server(c)  # end of file (or a reset from the closed backlog)
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)
        assert len(calls) == 1
        if batch == 10:
            assert server.stats()["accepted"] == 5  # accepted, then closed unhandled
        with pytest.raises(Refused):
            tcp.connect_sock(Tcp("127.0.0.1", port), timeout=TIMEOUT)
        assert len(calls) == 1
    finally:
        for c in clients:
            c.close()
        lsock.close()


def test_clients_waiting_in_the_backlog_at_close_are_never_handled() -> None:
    calls: list[Any] = []
    release = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        calls.append(addr)
        release.wait()
        writer.write(b"served")

    with serving(handler, max_connections=1) as server, dial(server) as first:
        wait_until(lambda: len(calls) == 1)
        # In the backlog: the server is at its limit.
        with all_closed([dial_now(server) for _ in range(3)]) as waiting:
            server.close()
            release.set()
            assert recv_all(first) == b"served"
            for c in waiting:
                assert closed_by_server(c)
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)
        assert len(calls) == 1


# -- close ------------------------------------------------------------------------------------


def test_close_with_existing_connections(where: object) -> None:
    started: list[Any] = []
    ended: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        started.append(addr)
        try:
            reader.read_line()  # the clients never send
        finally:
            ended.append(addr)

    with serving(handler, where) as server, \
            all_closed([dial(server) for _ in range(3)]) as clients:
        wait_until(lambda: len(started) == 3)
        assert not server.is_closed and not server.close_finished.is_set()
        done = server.close(close_existing_connections=True)
        assert server.is_closed
        assert done is server.close_finished
        assert server.close() is done
        assert server.close(close_existing_connections=True) is done
        assert done.wait(TIMEOUT)
        # Set once every connection socket is closed.
        assert server.num_connections == 0
        for c in clients:
            assert recv_all(c) == b""
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)
        assert len(ended) == 3
        assert server.listening_socket.fileno() == -1
        server.invariant()


def test_close_leaves_existing_connections_working_until_their_handler_returns(
        where: object) -> None:
    with serving(echo_lines, where) as server, dial(server) as c:
        assert ask(c, b"one") == b"one"
        done = server.close()
        assert server.is_closed
        assert done.wait(TIMEOUT)  # the listening socket is closed
        assert server.listening_socket.fileno() == -1
        assert not server.close_finished_and_handlers_determined.is_set()
        assert server.wait(0.01) is False  # a handler still runs
        assert ask(c, b"two") == b"two"
        assert server.num_connections == 1
        c.shutdown(socket.SHUT_WR)  # the handler's line loop ends; it returns
        assert recv_all(c) == b""
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)
        assert server.num_connections == 0
        assert server.wait(TIMEOUT) is True


def test_new_clients_are_refused_after_close(where: object) -> None:
    with serving(echo_lines, where) as server:
        target = server.listening_on_address
        server.close()
        with pytest.raises(Refused if isinstance(target, Tcp) else OSError):
            tcp.connect_sock(target, timeout=TIMEOUT)


def test_close_with_connections_after_a_plain_close_still_closes_them() -> None:
    with serving(echo_lines) as server, dial(server) as c:
        assert ask(c, b"one") == b"one"
        first = server.close()
        assert ask(c, b"two") == b"two"
        assert server.close(close_existing_connections=True) is first
        assert recv_all(c) == b""
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)


def test_close_with_connections_on_an_idle_server_sets_both_events() -> None:
    with serving(echo_lines) as server:
        assert server.close(close_existing_connections=True).wait(TIMEOUT)
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)


def test_bad_close_argument() -> None:
    with serving(echo_lines) as server, pytest.raises(TypeError, match="close_existing"):
        server.close(close_existing_connections="yes")  # type: ignore[arg-type]


def test_serve_forever_returns_when_closed_from_a_handler() -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"bye")
        server.close()

    with serving(handler) as server:
        forever = gevent.spawn(server.serve_forever)
        with dial(server) as c:
            assert recv_all(c) == b"bye"
        assert forever.get(timeout=TIMEOUT) is None
        assert server.close_finished_and_handlers_determined.is_set()


def test_killing_serve_forever_closes_the_server_and_its_connections() -> None:
    started = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        started.set()
        reader.read_line()

    with serving(handler) as server, dial(server) as c:
        forever = gevent.spawn(server.serve_forever)
        assert started.wait(TIMEOUT)
        forever.kill()
        assert server.is_closed
        assert recv_all(c) == b""
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)


def test_context_manager_exit_closes_and_waits_for_handlers() -> None:
    started, finished = Event(), Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        started.set()
        line = reader.read_line()
        writer.write(b"bye " + (line or b""))
        finished.set()

    def answer_once_closed(c: gsocket.socket) -> None:
        wait_until(lambda: server.is_closed)
        c.sendall(b"now\n")

    with all_closed([]) as clients:
        with tcp.Server.create(LOCAL, handler) as server:
            c = dial(server)
            clients.append(c)
            assert started.wait(TIMEOUT)
            helper = gevent.spawn(answer_once_closed, c)
        # Exit closed the server, then waited until the handler returned.
        assert server.is_closed
        assert finished.is_set()
        assert server.close_finished_and_handlers_determined.is_set()
        helper.get(timeout=TIMEOUT)
        assert recv_all(c) == b"bye now"


def test_context_manager_exit_on_an_error_closes_and_lets_it_through() -> None:
    with pytest.raises(KeyError), tcp.Server.create(LOCAL, echo_lines) as server:
        raise KeyError("body")
    assert server.is_closed
    assert server.close_finished_and_handlers_determined.is_set()


def test_wait_with_a_timeout_returns_false_while_serving() -> None:
    with serving(echo_lines) as server:
        assert server.wait(0.01) is False
        assert not server.is_closed


# -- max_connections, max_accepts_per_batch -----------------------------------------------------


def test_max_connections_is_never_exceeded_and_waiting_clients_are_served_later() -> None:
    limit, clients = 3, 15
    running = 0
    peak = 0
    release = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            server.invariant()
            line = reader.read_line()
            release.wait()
            writer.write((line or b"") + b"\n")
        finally:
            running -= 1

    with serving(handler, max_connections=limit, backlog=clients) as server, \
            all_closed([dial_now(server) for _ in range(clients)]) as socks:
        for i, s in enumerate(socks):
            s.sendall(b"%d\n" % i)
        wait_until(lambda: running == limit)
        # At the limit: the others wait in the backlog, not accepted.
        assert server.num_connections == limit
        assert server.stats()["accepted"] == limit
        server.invariant()
        release.set()
        replies = [g.get() for g in [gevent.spawn(recv_all, s) for s in socks]]
        wait_until(lambda: server.num_connections == 0)
        assert server.stats()["peak_active"] == limit
        server.invariant()
    assert replies == [b"%d\n" % i for i in range(clients)]
    assert peak == limit


def test_one_wake_up_takes_up_to_max_accepts_per_batch_connections() -> None:
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    port = lsock.getsockname()[1]
    clients = [dial_now(port=port) for _ in range(5)]
    accepted_at_first_call: list[int] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        if not accepted_at_first_call:
            accepted_at_first_call.append(server.stats()["accepted"])
        writer.write(b"ok")

    try:
        wait_queued(lsock, 5)
        with serving(handler, socket=lsock, max_accepts_per_batch=5) as server:
            assert [recv_all(c) for c in clients] == [b"ok"] * 5
    finally:
        for c in clients:
            c.close()
        lsock.close()
    # All five were accepted in the hub before the first handler ran.
    assert accepted_at_first_call == [5]


@pytest.mark.parametrize("batch", [1, 2, 64, 10_000])
def test_max_accepts_per_batch_values_serve_everyone(batch: int) -> None:
    with serving(echo_lines, max_accepts_per_batch=batch, max_connections=4) as server, \
            all_closed([dial_now(server) for _ in range(12)]) as socks:

        def one(i: int, s: gsocket.socket) -> bytes:
            with s:
                return ask(s, b"%d" % i)

        replies = [g.get() for g in [gevent.spawn(one, i, s) for i, s in enumerate(socks)]]
    assert replies == [b"%d" % i for i in range(12)]


# -- argument checking ----------------------------------------------------------------------


def test_server_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError, match="create"):
        tcp.Server()
    with pytest.raises(TypeError):
        tcp.Server(LOCAL, echo_lines)


BAD_ARGUMENTS = [
    ({"max_connections": 0}, ValueError, "max_connections"),
    ({"max_connections": -1}, ValueError, "max_connections"),
    ({"max_connections": 1.5}, TypeError, "max_connections"),
    ({"max_accepts_per_batch": 0}, ValueError, "max_accepts_per_batch"),
    ({"max_accepts_per_batch": -2}, ValueError, "max_accepts_per_batch"),
    ({"on_handler_error": "log"}, ValueError, "on_handler_error"),
    ({"on_handler_error": None}, ValueError, "on_handler_error"),
    ({"backlog": -1}, ValueError, "backlog"),
    ({"backlog": "64"}, TypeError, "backlog"),
    ({"drop_incoming_connections": 1}, TypeError, "drop_incoming_connections"),
    ({"sw": "a switch"}, TypeError, "sw"),
    ({"socket": 3}, TypeError, "socket"),
    ({"where": "udp://127.0.0.1:0"}, ValueError, "where"),
    ({"where": "nonsense here"}, ValueError, "address"),
    ({"handler": "not callable"}, TypeError, "handler"),
]


@pytest.mark.parametrize("face", ["create", "create_sock"])
@pytest.mark.parametrize(("kw", "exc", "match"), BAD_ARGUMENTS)
def test_bad_arguments_name_the_argument_and_create_nothing(
        face: str, kw: dict[str, Any], exc: type, match: str, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    args: dict[str, Any] = {"where": tcp.WhereToListen.of_file(path), "handler": echo_lines}
    args.update(kw)
    make = tcp.Server.create if face == "create" else tcp.Server.create_sock
    with pytest.raises(exc, match=match):
        make(args.pop("where"), args.pop("handler"), **args)
    assert not os.path.exists(path)  # nothing was bound (the leak check: no fd either)


@pytest.mark.parametrize(("limit", "error"), [
    (0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (math.inf, ValueError),
    ("120", TypeError), (True, TypeError)])
def test_bad_buffer_age_limit(limit: object, error: type[Exception], tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with pytest.raises(error, match="buffer_age_limit"):
        tcp.Server.create(tcp.WhereToListen.of_file(path), echo_lines,
                          buffer_age_limit=limit)  # type: ignore[arg-type]
    assert not os.path.exists(path)


@pytest.mark.parametrize("limit", [None, 0.5, 120])
def test_good_buffer_age_limits(limit: float | None) -> None:
    with serving(echo_lines, buffer_age_limit=limit) as server, dial(server) as c:
        assert ask(c, b"ok") == b"ok"


def test_a_finished_or_cancelled_switch_takes_no_server() -> None:
    with Switch() as done:
        pass
    with pytest.raises(RuntimeError):
        tcp.Server.create(LOCAL, echo_lines, sw=done)
    with Switch() as sw:
        sw.cancel()
        with pytest.raises(Cancelled):
            tcp.Server.create(LOCAL, echo_lines, sw=sw)


def test_where_constructors_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="port"):
        tcp.WhereToListen.of_port(70000)
    with pytest.raises(TypeError, match="port"):
        tcp.WhereToListen.bind_to("127.0.0.1", "80")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host"):
        tcp.WhereToListen.bind_to("", 80)
    with pytest.raises(ValueError, match="host"):
        tcp.WhereToConnect.of_host_and_port("", 80)
    with pytest.raises(ValueError, match="port"):
        tcp.WhereToConnect.of_host_and_port("localhost", -1)
    assert tcp.WhereToConnect.of_file("/x.sock") == Unix("/x.sock")
    assert tcp.WhereToConnect.of_host_and_port("localhost", 80) == Tcp("localhost", 80)


# -- buffer_age_limit ---------------------------------------------------------------------------


def test_a_client_that_never_reads_is_cut_and_is_not_a_handler_error(where: object) -> None:
    ended = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        try:
            for line in reader:
                if line == b"flood":
                    writer.write(b"x" * FLOOD)
                else:
                    writer.write(line + b"\n")
        finally:
            ended.set()

    # on_handler_error="raise" (the default): a cut connection must not close the server.
    with serving(handler, where, buffer_age_limit=0.2) as server:
        never_reads = dial(server, rcvbuf=SMALL_RCVBUF)
        never_reads.sendall(b"flood\n")
        assert ended.wait(TIMEOUT)
        wait_until(lambda: server.num_connections == 0)  # its slot is free
        assert not server.is_closed
        stats = server.stats()
        assert stats["handler_errors"] == 0 and stats["active"] == 0
        with dial(server) as c:
            assert ask(c, b"still serving") == b"still serving"
        never_reads.close()


# -- drop incoming connections --------------------------------------------------------------------


def test_set_drop_incoming_connections_accepts_and_closes_at_once() -> None:
    calls: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        calls.append(addr)
        echo_lines(addr, reader, writer)

    with serving(handler) as server:
        with dial(server) as kept:
            assert ask(kept, b"before") == b"before"
            server.set_drop_incoming_connections(True)
            assert "dropping" in repr(server)
            for _ in range(3):
                with dial(server) as c:
                    assert closed_by_server(c)  # end of file or reset, at once
            assert server.num_connections == 1  # dropped ones are never counted
            assert server.stats()["dropped"] == 3
            assert len(calls) == 1
            assert ask(kept, b"kept") == b"kept"  # existing connections go on
            server.set_drop_incoming_connections(False)
            with dial(server) as c:
                assert ask(c, b"after") == b"after"
        assert len(calls) == 2
        assert server.stats()["accepted"] == 2
        with pytest.raises(TypeError, match="flag"):
            server.set_drop_incoming_connections(1)  # type: ignore[arg-type]


def test_drop_incoming_connections_at_create() -> None:
    calls: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        calls.append(addr)

    with serving(handler, drop_incoming_connections=True) as server:
        with dial(server) as c:
            assert closed_by_server(c)
        assert server.num_connections == 0
        assert server.stats()["dropped"] == 1
        server.set_drop_incoming_connections(False)
        with dial(server) as c:
            assert recv_all(c) == b""
        wait_until(lambda: len(calls) == 1)


# -- on_handler_error -------------------------------------------------------------------------


def failing_on(word: bytes, error: BaseException) -> Callable[..., None]:
    """An echo-lines handler that raises ``error`` when it reads ``word``."""
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        for line in reader:
            if line == word:
                raise error
            writer.write(line + b"\n")
    return handler


def test_on_handler_error_raise_closes_the_server_and_leaves_connections_alone() -> None:
    boom = ValueError("boom")
    with serving(failing_on(b"fail", boom)) as server, dial(server) as alive:
        assert ask(alive, b"hi") == b"hi"
        with dial(server) as bad:
            bad.sendall(b"fail\n")
            assert closed_by_server(bad)
            bad_addr = address_of(bad)
        assert server.is_closed
        assert "failed" in repr(server)
        server.invariant()
        # The listening socket is closed ...
        assert server.listening_socket.fileno() == -1
        with pytest.raises(Refused):
            tcp.connect_sock(server.listening_on_address, timeout=TIMEOUT)
        # ... the other connection is left alone.
        assert ask(alive, b"still here") == b"still here"
        assert server.num_connections == 1
        alive.shutdown(socket.SHUT_WR)  # its handler returns
        assert recv_all(alive) == b""
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)
        # The error is raised by wait() and serve_forever(), every time.
        for call in (server.wait, server.serve_forever, server.wait):
            with pytest.raises(ValueError) as info:
                call()
            assert info.value is boom
        assert f"handling connection from {bad_addr}" in boom.__notes__
        assert server.stats()["handler_errors"] == 1


def test_serve_forever_raising_the_handler_error_leaves_connections_alone() -> None:
    # serve_forever() (and wait()) raise the error as soon as the listening socket is
    # closed; the connections still running are left alone (docs/tcp.md and
    # Server.wait's docstring), also after the error was raised.
    boom = ValueError("boom")
    with serving(failing_on(b"fail", boom)) as server, dial(server) as alive:
        forever = gevent.spawn(server.serve_forever)
        assert ask(alive, b"hi") == b"hi"
        with dial(server) as bad:
            bad.sendall(b"fail\n")
            assert closed_by_server(bad)
        with pytest.raises(ValueError) as info:
            forever.get(timeout=TIMEOUT)
        assert info.value is boom
        assert ask(alive, b"still here") == b"still here"
        assert server.num_connections == 1
        with pytest.raises(ValueError):
            server.wait(0.01)
        assert ask(alive, b"and here") == b"and here"


def test_on_handler_error_raise_with_a_switch_fails_the_switch() -> None:
    boom = ValueError("boom")
    with pytest.raises(ValueError) as info, Switch() as sw:
        server = tcp.Server.create(LOCAL, failing_on(b"fail", boom), sw=sw)
        with dial(server) as c:
            c.sendall(b"fail\n")
            assert closed_by_server(c)
        # Cancelled here if the failure reached the switch; else a bounded failure.
        assert server.close_finished.wait(TIMEOUT)
    assert info.value is boom
    assert server.is_closed


def test_on_handler_error_ignore_keeps_serving() -> None:
    with serving(failing_on(b"fail", KeyError("x")), on_handler_error="ignore") as server:
        with dial(server) as bad:
            bad.sendall(b"fail\n")
            assert closed_by_server(bad)
        with dial(server) as good:
            assert ask(good, b"fine") == b"fine"
        assert not server.is_closed
        assert server.stats()["handler_errors"] == 1
        assert server.wait(0.01) is False  # no error to raise: still serving


def test_on_handler_error_callable_gets_the_address_and_the_exception() -> None:
    boom = KeyError("x")
    got: AsyncResult = AsyncResult()
    with serving(failing_on(b"fail", boom),
                 on_handler_error=lambda addr, exc: got.set((addr, exc))) as server:
        with dial(server) as bad:
            bad.sendall(b"fail\n")
            assert closed_by_server(bad)
            bad_addr = address_of(bad)
        assert got.get(timeout=TIMEOUT) == (bad_addr, boom)
        assert got.get()[1] is boom
        with dial(server) as good:
            assert ask(good, b"fine") == b"fine"
        assert not server.is_closed


def test_on_handler_error_callable_that_raises_acts_as_raise() -> None:
    boom = KeyError("x")
    raised = RuntimeError("from on_handler_error")

    def on_error(addr: Any, exc: BaseException) -> None:
        assert exc is boom
        raise raised

    with serving(failing_on(b"fail", boom), on_handler_error=on_error) as server, \
            dial(server) as alive:
        assert ask(alive, b"hi") == b"hi"
        with dial(server) as bad:
            bad.sendall(b"fail\n")
            assert closed_by_server(bad)
        assert server.is_closed
        with pytest.raises(Refused):
            tcp.connect_sock(server.listening_on_address, timeout=TIMEOUT)
        assert ask(alive, b"still here") == b"still here"
        alive.shutdown(socket.SHUT_WR)
        assert recv_all(alive) == b""
        with pytest.raises(RuntimeError) as info:
            server.serve_forever()
        assert info.value is raised


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_a_peer_that_resets_is_not_a_handler_error(family: str, tmp_path: Path) -> None:
    # The client closes with data it never read: TCP sends a reset; on a unix socket the
    # kernel reports ECONNRESET to the server's next read. Either way it is the
    # connection's own failure, not the handler's: the default "raise" must not close
    # the server (tcp.py's design rules).
    where = LOCAL if family == "tcp" else tcp.WhereToListen.of_file(str(tmp_path / "s.sock"))
    ended = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        try:
            writer.write(b"hello")
            for line in reader:
                writer.write(line + b"\n")
        finally:
            ended.set()

    with serving(handler, where) as server:
        with dial(server) as c:
            assert c.recv(5, socket.MSG_PEEK) == b"hello"  # arrived; left unread
        assert ended.wait(TIMEOUT)
        wait_until(lambda: server.num_connections == 0)
        assert server.stats()["handler_errors"] == 0
        assert not server.is_closed
        with dial(server) as again:
            assert recv_exactly(again, 5) == b"hello"
            assert ask(again, b"on") == b"on"


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_a_base_exception_escaping_a_handler_fails_the_server(mode: str) -> None:
    # An uncaught gevent.Timeout is no Exception on_handler_error may ignore: the server
    # closes, its other connections are cancelled (its switch fails) and serve_forever
    # raises it, in every mode.
    escaped = gevent.Timeout(None)
    with serving(failing_on(b"fail", escaped), on_handler_error=mode) as server, \
            dial(server) as other:
        forever = gevent.spawn(server.serve_forever)
        assert ask(other, b"hi") == b"hi"
        with dial(server) as bad:
            bad.sendall(b"fail\n")
            assert closed_by_server(bad)
        with pytest.raises(gevent.Timeout) as info:
            forever.get(timeout=TIMEOUT)
        assert info.value is escaped
        assert server.is_closed
        assert server.listening_socket.fileno() == -1
        assert "failed (Timeout)" in repr(server)
        assert closed_by_server(other)
        assert server.close_finished_and_handlers_determined.wait(TIMEOUT)
        server.invariant()


def test_max_connections_none_means_no_limit() -> None:
    release = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"in")
        release.wait()

    with serving(handler, max_connections=None) as server:
        clients = [dial(server) for _ in range(3)]
        with all_closed(clients):
            for c in clients:
                assert recv_exactly(c, 2) == b"in"
            assert server.num_connections == 3
            assert "connections=3/unlimited" in repr(server)
            server.invariant()
            release.set()


# -- sw= ---------------------------------------------------------------------------------------


def test_a_switch_waits_until_its_server_is_closed() -> None:
    made: AsyncResult = AsyncResult()

    def body() -> str:
        with Switch() as sw:
            made.set(tcp.Server.create(LOCAL, echo_lines, sw=sw))
        return "left"

    g = gevent.spawn(body)
    server = made.get(timeout=TIMEOUT)
    with dial(server) as c:
        # body is at its with block's exit since made.set(); this round trip gives the
        # hub turns enough to let it leave, were it not waiting for the server.
        assert ask(c, b"hi") == b"hi"
    assert not g.dead  # the with block waits for the server
    server.close()
    assert g.get(timeout=TIMEOUT) == "left"
    assert server.close_finished_and_handlers_determined.wait(TIMEOUT)


def test_cancelling_the_switch_closes_the_server_and_its_connections() -> None:
    started = Event()
    ended: list[Any] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        started.set()
        try:
            reader.read_line()  # the client never sends
        finally:
            ended.append(addr)

    with all_closed([]) as clients:
        with Switch() as sw:
            server = tcp.Server.create(LOCAL, handler, sw=sw)
            c = dial(server)
            clients.append(c)
            assert started.wait(TIMEOUT)
            sw.cancel()
        assert server.is_closed
        assert server.close_finished.is_set()
        assert server.num_connections == 0
        assert ended == [address_of(c)]
        assert recv_all(c) == b""
    with pytest.raises(Refused):
        tcp.connect_sock(server.listening_on_address, timeout=TIMEOUT)


def test_a_failing_switch_body_closes_the_server() -> None:
    with pytest.raises(KeyError), Switch() as sw:
        server = tcp.Server.create(LOCAL, echo_lines, sw=sw)
        c = sw.attach(dial(server))
        assert ask(c, b"hi") == b"hi"
        raise KeyError("body")
    assert server.is_closed
    assert server.num_connections == 0


# -- state: listening_on, repr, invariant, stats -------------------------------------------------


def test_repr_shows_address_connections_and_state() -> None:
    release = Event()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        release.wait()

    with serving(handler, max_connections=7) as server:
        text = repr(server)
        assert str(server.listening_on_address) in text
        assert "listening" in text and "connections=0" in text
        with dial(server) as c:
            wait_until(lambda: server.num_connections == 1)
            assert "connections=1/7" in repr(server)
            server.close()
            assert "closed" in repr(server)
            release.set()
            assert recv_all(c) == b""


def test_invariant_holds_during_and_after_load(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        server.invariant()
        echo_lines(addr, reader, writer)
        server.invariant()

    with serving(handler, where, max_connections=4, max_accepts_per_batch=3) as server:
        def one(i: int) -> bytes:
            with dial(server) as s:
                server.invariant()
                return ask(s, b"%d" % i)

        workers = [gevent.spawn(one, i) for i in range(20)]

        def all_served() -> bool:
            server.invariant()
            return all(w.dead for w in workers)

        wait_until(all_served)
        assert [w.get() for w in workers] == [b"%d" % i for i in range(20)]
        server.invariant()
        server.close()
        server.invariant()
        assert server.wait(TIMEOUT)
        server.invariant()


def test_stats_count_what_happened() -> None:
    errors = Errors()
    with serving(failing_on(b"fail", KeyError("x")), on_handler_error=errors) as server:
        for _ in range(2):
            with dial(server) as c:
                assert ask(c, b"x") == b"x"
            wait_until(lambda: server.num_connections == 0)
        with dial(server) as c:
            c.sendall(b"fail\n")
            assert closed_by_server(c)
        server.set_drop_incoming_connections(True)
        with dial(server) as c:
            assert closed_by_server(c)
        wait_until(lambda: server.num_connections == 0)
        stats = server.stats()
    assert {"accepted", "active", "dropped", "handler_errors", "accept_errors",
            "peak_active"} <= set(stats)
    assert stats["accepted"] == 3
    assert stats["dropped"] == 1
    assert stats["handler_errors"] == len(errors) == 1
    assert stats["accept_errors"] == 0
    assert stats["active"] == 0
    assert stats["peak_active"] == 1


# -- Reader and Writer through tcp handlers ------------------------------------------------------


def exchange(where: object, handler: Callable[..., None], payload: bytes, **kw: Any) -> bytes:
    """One connection: send ``payload``, end the sending side, return everything the
    server wrote before closing. A handler error fails the test."""
    errors = Errors()
    with serving(handler, where, on_handler_error=errors, **kw) as server, \
            dial(server) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        reply = recv_all(c)
    errors.check()
    return reply


def test_read_line_strips_line_ends_iteration_and_none_at_eof(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"|".join(reader))
        writer.write(b"#%r" % (reader.read_line(),))

    assert exchange(where, handler, b"a\r\nb\n\nc\rd\nlast") == b"a|b||c\rd|last#None"


def test_read_line_max_length_raises_line_too_long_and_consumes_nothing(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        with pytest.raises(LineTooLong) as info:
            reader.read_line(max_length=5)
        assert isinstance(info.value, ValueError)
        writer.write(b"%r %r" % (reader.read_line(max_length=100), reader.read_line(5)))

    assert exchange(where, handler, b"a long line\nshort\n") == b"b'a long line' b'short'"


def test_read_exactly_and_incomplete_read(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(reader.read_exactly(4) + b"," + reader.read_exactly(4))
        with pytest.raises(IncompleteRead) as info:
            reader.read_exactly(4)
        assert isinstance(info.value, EOFError)
        writer.write(b"|" + info.value.partial)

    assert exchange(where, handler, b"0123456789") == b"0123,4567|89"


def test_read_returns_at_most_max_bytes_then_empty_at_eof(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        chunks = []
        while chunk := reader.read(3):
            assert 1 <= len(chunk) <= 3
            chunks.append(chunk)
        assert reader.read() == b""
        writer.write(b"".join(chunks))

    payload = bytes(range(256)) * 40
    assert exchange(where, handler, payload) == payload


def test_read_until(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        head = reader.read_until(b"\r\n\r\n")
        with pytest.raises(LineTooLong):
            reader.read_until(b";", max_length=2)
        body = reader.read_until(b";")
        rest = reader.read_until(b";")
        writer.write(b"%r %r %r %r" % (head, body, rest, reader.read_until(b";")))

    reply = exchange(where, handler, b"GET /\r\nHost: x\r\n\r\nbody;tail")
    assert reply == b"b'GET /\\r\\nHost: x' b'body' b'tail' None"


def test_writes_arrive_without_flush(where: object) -> None:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"hello")
        reader.read_line()  # blocks until the client answers: no flush, no close yet
        writer.write(b" bye")

    with serving(handler, where) as server, dial(server) as c:
        assert recv_exactly(c, 5) == b"hello"
        c.sendall(b"go\n")
        assert recv_all(c) == b" bye"


def test_write_never_blocks_and_flush_waits_for_the_kernel(where: object) -> None:
    wrote: AsyncResult = AsyncResult()
    flushed: AsyncResult = AsyncResult()
    data = b"x" * FLOOD

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        t0 = time.monotonic()
        writer.write(data)
        wrote.set(time.monotonic() - t0)
        writer.flush()
        flushed.set(writer.bytes_pending)

    with serving(handler, where) as server, dial(server, rcvbuf=SMALL_RCVBUF) as c:
        assert wrote.get(timeout=TIMEOUT) < 1.0  # returned while nothing was read
        assert recv_exactly(c, 1) == b"x"
        assert not flushed.ready()  # still waiting: the client has read one byte
        rest = recv_all(c)
        assert flushed.get(timeout=TIMEOUT) == 0
    assert 1 + len(rest) == FLOOD


def test_close_flushes(where: object) -> None:
    data = bytes(range(256)) * (FLOOD // 256 // 4) + b"end"

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(data)  # then return at once: the server's close must flush

    with serving(handler, where) as server, dial(server, rcvbuf=SMALL_RCVBUF) as c:
        assert recv_all(c) == data


def test_consumer_left_is_set_when_the_peer_goes_away(where: object) -> None:
    gone = Event()
    result: AsyncResult = AsyncResult()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"hello")
        assert not writer.consumer_left.is_set()
        gone.wait()
        # A departed peer is noticed when data is sent to it.
        while not writer.consumer_left.wait(0.01):
            writer.write(b"more")
        try:
            writer.write(b"late")
        except ConnectionReset as exc:
            result.set(exc)
        else:
            result.set(None)

    with serving(handler, where) as server:
        with dial(server) as c:
            assert recv_exactly(c, 5) == b"hello"
        gone.set()
        assert isinstance(result.get(timeout=TIMEOUT), ConnectionReset)
        wait_until(lambda: server.num_connections == 0)
        assert server.stats()["handler_errors"] == 0


def test_a_handler_ending_with_its_own_writers_reset_is_not_a_handler_error(
        where: object) -> None:
    gone = Event()
    raised: list[BaseException] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        writer.write(b"hello")
        gone.wait()
        try:
            for _ in range(1000):  # the first send to a departed peer may still succeed
                writer.write(b"more")
                writer.flush()
        except BaseException as exc:
            raised.append(exc)
            raise  # the connection's own failure: must not count as the handler's

    # on_handler_error="raise" (the default): it would close the server.
    with serving(handler, where) as server:
        with dial(server) as c:
            assert recv_exactly(c, 5) == b"hello"
        gone.set()
        wait_until(lambda: server.num_connections == 0)
        assert len(raised) == 1 and isinstance(raised[0], ConnectionReset)
        assert server.stats()["handler_errors"] == 0
        assert not server.is_closed
        with dial(server) as c:
            assert recv_exactly(c, 5) == b"hello"


def test_reader_and_writer_are_the_stream_classes() -> None:
    assert tcp.Reader is stream.Reader
    assert tcp.Writer is stream.Writer


# -- the client ---------------------------------------------------------------------------------


def test_connect_sock_by_host_and_port_by_name_and_by_text() -> None:
    with serving(echo_lines) as server:
        port = server.listening_on
        for where in (tcp.WhereToConnect.of_host_and_port("127.0.0.1", port),
                      tcp.WhereToConnect.of_host_and_port("localhost", port),
                      f"127.0.0.1:{port}", Tcp("127.0.0.1", port)):
            sock = tcp.connect_sock(where, timeout=TIMEOUT)
            try:
                assert isinstance(sock, gsocket.socket)
                assert sock.getpeername() == ("127.0.0.1", port)
                sock.settimeout(TIMEOUT)
                assert ask(sock, b"hi") == b"hi"
            finally:
                sock.close()


def test_connect_sock_of_file(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with serving(echo_lines, tcp.WhereToListen.of_file(path)):
        for where in (tcp.WhereToConnect.of_file(path), f"unix:{path}"):
            with tcp.connect_sock(where, timeout=TIMEOUT) as sock:
                assert sock.family == socket.AF_UNIX
                sock.settimeout(TIMEOUT)
                assert ask(sock, b"unix") == b"unix"


def test_connect_gives_a_socket_reader_and_writer(where: object) -> None:
    with serving(echo_lines, where) as server:
        sock, reader, writer = tcp.connect(server.listening_on_address, timeout=TIMEOUT)
        try:
            assert isinstance(reader, tcp.Reader) and isinstance(writer, tcp.Writer)
            writer.write(b"one\ntwo\n")
            assert reader.read_line() == b"one"
            assert reader.read_line() == b"two"
        finally:
            writer.close()
            reader.close()
        assert sock.fileno() == -1


def test_with_connection_returns_fns_value_and_closes_everything(where: object) -> None:
    kept: list[Any] = []

    def fn(sock: Any, reader: tcp.Reader, writer: tcp.Writer) -> bytes | None:
        kept.extend([sock, reader, writer])
        writer.write(b"ping\n")
        return reader.read_line()

    with serving(echo_lines, where) as server:
        assert tcp.with_connection(server.listening_on_address, fn, timeout=TIMEOUT) == b"ping"
        sock, reader, writer = kept
        assert sock.fileno() == -1 and reader.closed and writer.closed
        # The server sees the end of the connection.
        wait_until(lambda: server.num_connections == 0)


def test_with_connection_closes_everything_when_fn_raises() -> None:
    kept: list[Any] = []

    def fn(sock: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        kept.extend([sock, reader, writer])
        writer.write(b"unsent?\n")
        raise KeyError("fn")

    with serving(echo_lines) as server:
        with pytest.raises(KeyError):
            tcp.with_connection(server.listening_on_address, fn, timeout=TIMEOUT)
        sock, reader, writer = kept
        assert sock.fileno() == -1 and reader.closed and writer.closed


CONNECTORS: dict[str, Callable[..., Any]] = {
    "connect_sock": tcp.connect_sock,
    "connect": tcp.connect,
    "with_connection": lambda where, **kw: tcp.with_connection(where, _never_called, **kw),
}


def _never_called(*args: Any) -> None:
    raise AssertionError("fn called without a connection")


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_refused_on_a_closed_port(name: str) -> None:
    port = free_port()
    with pytest.raises(Refused) as info:
        CONNECTORS[name](tcp.WhereToConnect.of_host_and_port("127.0.0.1", port),
                         timeout=TIMEOUT)
    assert isinstance(info.value, ConnectionRefusedError)
    assert isinstance(info.value, ConnectionFailure)
    assert f"connecting to tcp:127.0.0.1:{port}" in info.value.__notes__


def test_refused_on_a_unix_path_nobody_listens_on(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the socket file stays; nothing listens on it
    with pytest.raises(Refused) as info:
        tcp.connect_sock(tcp.WhereToConnect.of_file(path), timeout=TIMEOUT)
    assert f"connecting to unix:{path}" in info.value.__notes__


@contextmanager
def hanging_target() -> Iterator[Tcp]:
    """An address whose connects hang: a listener with backlog 0 that never accepts,
    its queue filled (the kernel then drops SYNs)."""
    listener = gsocket.socket()
    fillers: list[Any] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        target = Tcp("127.0.0.1", listener.getsockname()[1])
        with pytest.raises(TimeoutError):
            for _ in range(8):
                filler = gsocket.socket()
                fillers.append(filler)
                filler.settimeout(0.2)
                filler.connect(target.sockaddr)
        yield target
    finally:
        for f in fillers:
            f.close()
        listener.close()


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_connect_timeout(name: str) -> None:
    with hanging_target() as target:
        t0 = time.monotonic()
        with gevent.Timeout(TIMEOUT, AssertionError("the connect's timeout never fired")), \
                pytest.raises(ConnectTimeout) as info:
            CONNECTORS[name](target, timeout=0.1)
        elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 2.0
    assert isinstance(info.value, TimeoutError)
    assert f"connecting to {target}" in info.value.__notes__


def test_the_timeout_ends_with_the_connect() -> None:
    with serving(echo_lines) as server:
        sock = tcp.connect_sock(server.listening_on_address, timeout=0.05)
        try:
            gevent.sleep(0.1)  # outlive the connect's deadline: nothing may fire now
            sock.settimeout(TIMEOUT)
            assert ask(sock, b"after") == b"after"
        finally:
            sock.close()


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_interrupt_set_before_connecting(name: str) -> None:
    listener = gsocket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        target = Tcp("127.0.0.1", listener.getsockname()[1])
        interrupt = Event()
        interrupt.set()
        with pytest.raises(ConnectInterrupted) as info:
            CONNECTORS[name](target, timeout=TIMEOUT, interrupt=interrupt)
        assert isinstance(info.value, ConnectionFailure)
        assert f"connecting to {target}" in info.value.__notes__
        assert accept_queue_length(listener) == 0  # no connection was made
    finally:
        listener.close()


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_interrupt_set_while_connecting(name: str) -> None:
    interrupt = Event()
    with hanging_target() as target:
        setter = gevent.spawn_later(0.05, interrupt.set)
        t0 = time.monotonic()
        with pytest.raises(ConnectInterrupted) as info:
            CONNECTORS[name](target, timeout=TIMEOUT, interrupt=interrupt)
        elapsed = time.monotonic() - t0
        setter.join()
    assert elapsed < TIMEOUT / 2
    assert f"connecting to {target}" in info.value.__notes__


def test_an_interrupt_set_after_connecting_changes_nothing() -> None:
    interrupt = Event()
    with serving(echo_lines) as server:
        sock = tcp.connect_sock(server.listening_on_address, timeout=TIMEOUT,
                                interrupt=interrupt)
        try:
            interrupt.set()
            sock.settimeout(TIMEOUT)
            assert ask(sock, b"still") == b"still"
        finally:
            sock.close()


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": -1.0}, ValueError, "timeout"),
        ({"timeout": "5"}, TypeError, "timeout"),
        ({"interrupt": "stop"}, TypeError, "interrupt"),
        ({"where": "udp://127.0.0.1:9"}, ValueError, "where"),
    ],
)
@pytest.mark.parametrize("name", list(CONNECTORS))
def test_client_bad_arguments(name: str, kw: dict[str, Any], exc: type, match: str) -> None:
    args: dict[str, Any] = {"where": Tcp("127.0.0.1", 9), **kw}
    with pytest.raises(exc, match=match):
        CONNECTORS[name](args.pop("where"), **args)


def test_with_connection_needs_a_callable() -> None:
    with pytest.raises(TypeError, match="fn"):
        tcp.with_connection(Tcp("127.0.0.1", 9), "fn")  # type: ignore[arg-type]


def test_the_client_speaks_tls_to_a_tls_server_and_checks_the_host_name(certs: Any) -> None:
    import ssl

    with serving(echo_lines, ssl_context=certs.server_context()) as server:
        where = tcp.WhereToConnect.of_host_and_port("127.0.0.1", server.listening_on)
        def talk(sock: Any, reader: tcp.Reader, writer: tcp.Writer) -> bytes:
            assert sock.version() is not None  # a TLS socket
            writer.write(b"secret\n")
            return reader.read_line()

        line = tcp.with_connection(where, talk, timeout=TIMEOUT,
                                   ssl_context=certs.client_context(),
                                   server_hostname="localhost")
        assert line == b"secret"
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            tcp.connect_sock(where, timeout=TIMEOUT, ssl_context=certs.client_context(),
                             server_hostname="not-this-host")
        assert any(f"connecting to {where}" in note
                   for note in getattr(info.value, "__notes__", []))
        wait_until(lambda: server.stats()["handshake_errors"] == 1)
        assert not server.is_closed


@pytest.mark.parametrize("mode", ["raise", "ignore"])
def test_a_broken_listening_socket_closes_the_server_and_is_raised(mode: str) -> None:
    # accept() failing with EINVAL (the listening socket was shut down) ends the server
    # in every on_handler_error mode: serve_forever() raises it instead of waiting.
    server = tcp.Server.create_sock(tcp.WhereToListen.bind_to("127.0.0.1", 0),
                                   lambda addr, sock: None, on_handler_error=mode)
    runner = gevent.spawn(server.serve_forever)
    gevent.idle()
    shut_down_reading(server.listening_socket)
    with pytest.raises(OSError) as info:
        runner.get(timeout=5)
    assert info.value.errno == errno.EINVAL
    assert server.is_closed and server.close_finished.is_set()
    assert server.listening_socket.fileno() == -1



def test_a_broken_listening_socket_fails_the_servers_switch() -> None:
    with pytest.raises(OSError) as info, Switch() as sw:
        server = tcp.Server.create_sock(tcp.WhereToListen.bind_to("127.0.0.1", 0),
                                        lambda addr, sock: None, sw=sw)
        shut_down_reading(server.listening_socket)
        server.close_finished.wait(TIMEOUT)  # cancelled here once the switch failed
    assert info.value.errno == errno.EINVAL
    assert server.is_closed


TAG: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="-")


def test_handlers_see_a_copy_of_the_context_that_created_the_server() -> None:
    seen: list[str] = []

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        seen.append(TAG.get())
        TAG.set("changed by a handler")  # its own copy: the next connection does not see it
        writer.write(b"ok")

    def make() -> tcp.Server:
        TAG.set("set by the creator")
        return tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0), handler)

    server = gevent.spawn(make).get()
    with server:
        for _ in range(2):
            with gsocket.create_connection(("127.0.0.1", server.listening_on)) as c:
                assert recv_all(c) == b"ok"
    assert seen == ["set by the creator"] * 2
