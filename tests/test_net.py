"""greenserve.net (Eio's Net) on real loopback TCP, UDP and unix sockets: docs/net.md,
promise by promise."""

from __future__ import annotations

import contextvars
import errno
import os
import resource
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from greenserve import (
    AddressLookupFailed,
    Cancelled,
    ConnectTimeout,
    NoMatchingAddresses,
    Refused,
    Switch,
    Tcp,
    Udp,
    Unix,
    _connect,
    net,
)
from greenserve.flow import Flow

from .helpers import client, recv_all, shut_down_reading

# -- listen ------------------------------------------------------------------------------------


def test_listen_tcp_port_zero_is_resolved() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        assert lsock.address.port != 0
        assert lsock.fileno() >= 0 and lsock.socket is not None
        c = client(lsock.address.port)
        flow, addr = net.accept(lsock, sw=sw)
        assert addr == flow.peer and isinstance(addr, Tcp)
        c.close()
    assert lsock.closed and flow.closed


def test_listen_accepts_text_and_ipv6() -> None:
    with Switch() as sw:
        lsock = net.listen("127.0.0.1:0", sw=sw)
        assert isinstance(lsock.address, Tcp)
        if socket.has_ipv6:
            v6 = net.listen("[::1]:0", sw=sw)
            assert v6.address.host == "::1"


def test_listen_port_in_use_names_address() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with pytest.raises(OSError) as info:
            net.listen(lsock.address, sw=sw)
        assert info.value.errno == errno.EADDRINUSE
        assert str(lsock.address) in info.value.__notes__[0]


def test_listen_bad_arguments_create_nothing() -> None:
    with Switch() as sw:
        with pytest.raises(TypeError, match="sw"):
            net.listen(Tcp("127.0.0.1", 0), sw=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="backlog"):
            net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=-1)
        with pytest.raises(TypeError, match="reuse_addr"):
            net.listen(Tcp("127.0.0.1", 0), sw=sw, reuse_addr="yes")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="stream address"):
            net.listen(Udp("127.0.0.1", 0), sw=sw)


def test_unix_listen_unlinks_path_at_switch_end(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with Switch() as sw:
        lsock = net.listen(Unix(path), sw=sw)
        assert lsock.address == Unix(path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        flow = net.connect(f"unix:{path}", sw=sw)
        server, peer = lsock.accept(sw=sw)
        flow.write(b"x")
        assert server.read() == b"x"
        assert str(peer) == "unix:"  # an unbound client has no name
    assert not os.path.exists(path)


def test_unix_stale_socket_needs_reuse_addr(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays behind
    with Switch() as sw:
        with pytest.raises(OSError) as info:
            net.listen(Unix(path), sw=sw)
        assert info.value.errno == errno.EADDRINUSE
        lsock = net.listen(Unix(path), sw=sw, reuse_addr=True)
        assert not lsock.closed
    assert not os.path.exists(path)


def test_unix_never_removes_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("precious")
    with Switch() as sw, pytest.raises(FileExistsError, match="not a socket"):
        net.listen(Unix(str(path)), sw=sw, reuse_addr=True)
    assert path.read_text() == "precious"


def test_unix_path_rebound_by_someone_else_is_not_unlinked(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with Switch() as sw:
        net.listen(Unix(path), sw=sw)
        os.unlink(path)  # someone else removes it and binds their own socket there
        theirs = socket.socket(socket.AF_UNIX)
        theirs.bind(path)
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        theirs.close()


def test_listen_on_inherited_fd() -> None:
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen(8)
    port = raw.getsockname()[1]
    fd = raw.detach()
    with Switch() as sw:
        lsock = net.listen(f"fd://{fd}", sw=sw)
        assert lsock.address == Tcp("127.0.0.1", port)
        c = client(port)
        flow, _ = lsock.accept(sw=sw)
        c.sendall(b"hi")
        assert flow.read() == b"hi"
        c.close()


def test_listen_on_an_fd_that_is_no_socket_names_it(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "plain-file", os.O_CREAT | os.O_RDWR)
    try:
        with Switch() as sw, pytest.raises(OSError) as info:
            net.listen(f"fd://{fd}", sw=sw)
        assert info.value.errno == errno.ENOTSOCK
        assert info.value.__notes__ == [f"listening on fd://{fd}"]
        os.fstat(fd)  # still open: not ours to close
    finally:
        os.close(fd)
    closed = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1  # the highest fd: not open
    with Switch() as sw, pytest.raises(OSError) as info:
        net.listen(f"fd://{closed}", sw=sw)
    assert info.value.errno == errno.EBADF
    assert info.value.__notes__ == [f"listening on fd://{closed}"]


def test_listen_on_fd_that_is_not_listening() -> None:
    a, b = socket.socketpair()
    try:
        with Switch() as sw, pytest.raises(ValueError, match="not a listening"):
            net.listen(f"fd://{a.fileno()}", sw=sw)
        a.send(b"still usable")  # the fd was not taken over or closed
        assert b.recv(100) == b"still usable"
    finally:
        a.close()
        b.close()


# -- connect -----------------------------------------------------------------------------------


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def test_connect_refused_has_note() -> None:
    port = _free_port()
    with Switch() as sw, pytest.raises(Refused) as info:
        net.connect(Tcp("127.0.0.1", port), sw=sw)
    assert f"connecting to tcp:127.0.0.1:{port}" in info.value.__notes__
    assert isinstance(info.value, ConnectionRefusedError)


def test_connect_timeout() -> None:
    # A listener with backlog 0 that never accepts: once its queue is full the kernel
    # drops SYNs, so the next connect hangs until our timeout.
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=0)
        with pytest.raises(ConnectTimeout) as info:
            for _ in range(8):
                net.connect(lsock.address, sw=sw, timeout=0.2)
        assert isinstance(info.value, TimeoutError)
        assert str(lsock.address) in info.value.__notes__[0]


def test_connect_bad_timeout() -> None:
    with Switch() as sw:
        with pytest.raises(ValueError, match="timeout"):
            net.connect(Tcp("127.0.0.1", 1), sw=sw, timeout=0)
        with pytest.raises(TypeError, match="timeout"):
            net.connect(Tcp("127.0.0.1", 1), sw=sw, timeout="1")  # type: ignore[arg-type]


def test_connect_by_name() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        flow = net.connect(f"localhost:{lsock.address.port}", sw=sw)
        assert flow.peer == Tcp("127.0.0.1", lsock.address.port)


def _targets(monkeypatch: pytest.MonkeyPatch, addrs: list[Tcp]) -> None:
    # Name resolution is the only thing replaced: the attempts are real connects.
    monkeypatch.setattr(_connect, "resolve", lambda host, service=None: list(addrs))


def test_with_tcp_connect_tries_addresses_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    dead1, dead2 = _free_port(), _free_port()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        _targets(monkeypatch, [Tcp("127.0.0.1", dead1), Tcp("127.0.0.1", dead2), lsock.address])
        with net.with_tcp_connect("example", "x") as flow:
            assert flow.peer == lsock.address
        assert flow.closed


@pytest.mark.parametrize("happy_eyeballs_delay", [None, 0.05])
def test_with_tcp_connect_moves_on_after_any_error_of_an_address(
        monkeypatch: pytest.MonkeyPatch, happy_eyeballs_delay: float | None) -> None:
    # A link-local IPv6 address without its interface fails at once with EINVAL (no
    # packet is sent), an error that is no ConnectionFailure: like an IPv6 "localhost"
    # on a host without IPv6 (EADDRNOTAVAIL, EAFNOSUPPORT), it must not stop the
    # attempts; the next address is tried and connects.
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        _targets(monkeypatch, [Tcp("fe80::1", lsock.address.port), lsock.address])
        with net.with_tcp_connect("example", "x", timeout=5,
                                  happy_eyeballs_delay=happy_eyeballs_delay) as flow:
            assert flow.peer == lsock.address
    _targets(monkeypatch, [Tcp("fe80::1", 9)])
    with pytest.raises(OSError) as info, net.with_tcp_connect("example", "x"):
        pass
    assert info.value.errno == errno.EINVAL
    assert "connecting to tcp:[fe80::1]:9" in info.value.__notes__


def test_with_tcp_connect_raises_last_failure_with_earlier_in_notes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dead1, dead2 = _free_port(), _free_port()
    _targets(monkeypatch, [Tcp("127.0.0.1", dead1), Tcp("127.0.0.1", dead2)])
    with pytest.raises(Refused) as info, net.with_tcp_connect("example", "x"):
        pass
    notes = "\n".join(info.value.__notes__)
    assert f"tcp:127.0.0.1:{dead2}" in notes and f"tcp:127.0.0.1:{dead1}" in notes


def test_with_tcp_connect_nothing_to_try(monkeypatch: pytest.MonkeyPatch) -> None:
    _targets(monkeypatch, [])
    with pytest.raises(NoMatchingAddresses), net.with_tcp_connect("example", 80):
        pass


def test_with_tcp_connect_real_resolution() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with net.with_tcp_connect("localhost", str(lsock.address.port), timeout=5) as flow:
            flow.write(b"x")
            server, _ = lsock.accept(sw=sw)
            assert server.read() == b"x"


def test_happy_eyeballs_first_to_connect_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first address hangs (a full backlog); after the delay the second is tried
    # in parallel and wins long before the first attempt's timeout.
    with Switch() as sw:
        full = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=0)
        fillers = []
        for _ in range(4):
            try:
                fillers.append(net.connect(full.address, sw=sw, timeout=0.2))
            except ConnectTimeout:
                break
        good = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        _targets(monkeypatch, [full.address, good.address])
        with net.with_tcp_connect("example", "x", timeout=30,
                                  happy_eyeballs_delay=0.05) as flow:
            assert flow.peer == good.address


def test_happy_eyeballs_failure_moves_on_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = _free_port()
    with Switch() as sw:
        good = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        _targets(monkeypatch, [Tcp("127.0.0.1", dead), good.address])
        with net.with_tcp_connect("example", "x", happy_eyeballs_delay=30) as flow:
            assert flow.peer == good.address


def test_happy_eyeballs_all_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    _targets(monkeypatch, [Tcp("127.0.0.1", _free_port()), Tcp("127.0.0.1", _free_port())])
    with pytest.raises(Refused), net.with_tcp_connect("example", "x", happy_eyeballs_delay=1):
        pass


def test_interleave_families() -> None:
    a4, b4, c4 = Tcp("127.0.0.1", 1), Tcp("127.0.0.2", 1), Tcp("127.0.0.3", 1)
    a6, b6 = Tcp("::1", 1), Tcp("::2", 1)
    assert net.interleave_families([a6, b6, a4, b4, c4]) == [a6, a4, b6, b4, c4]
    assert net.interleave_families([a4, b4]) == [a4, b4]


# -- accept_fork -------------------------------------------------------------------------------


def test_accept_gives_tcp_flows_with_nodelay() -> None:
    # net.listen sets TCP_NODELAY on the listener; Linux copies it to accepted sockets.
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        c = client(lsock.address.port)
        flow, _ = net.accept(lsock, sw=sw)
        assert flow.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        c.close()


def test_accept_fork_runs_handler_and_closes_flow() -> None:
    flows: list[Flow] = []

    def handler(flow: Flow, addr: Any) -> None:
        flows.append(flow)
        flow.write(flow.read())

    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        c = client(lsock.address.port)
        c.sendall(b"echo")
        net.accept_fork(lsock, sw=sw, on_error=pytest.fail, handler=handler)
        assert c.recv(10) == b"echo"
        assert c.recv(10) == b""  # closed when the handler returned
        c.close()
    assert flows[0].closed


def test_accept_fork_error_goes_to_on_error_with_note() -> None:
    errors: list[Exception] = []
    boom = ValueError("handler broke")

    def handler(flow: Flow, addr: Any) -> None:
        raise boom

    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        c = client(lsock.address.port)
        peer = c.getsockname()
        net.accept_fork(lsock, sw=sw, on_error=errors.append, handler=handler)
        assert c.recv(10) == b""
        c.close()
    assert errors == [boom]
    assert boom.__notes__ == [f"handling connection from tcp:{peer[0]}:{peer[1]}"]


def test_accept_fork_on_error_raising_fails_switch() -> None:
    def on_error(exc: Exception) -> None:
        raise RuntimeError("give up") from exc

    with pytest.raises(RuntimeError, match="give up"), Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        c = client(lsock.address.port)
        sw.on_release(c.close)
        net.accept_fork(lsock, sw=sw, on_error=on_error,
                        handler=lambda f, a: 1 / 0)
        Event().wait()  # cancelled by the failure


# -- run_server --------------------------------------------------------------------------------


def echo(flow: Flow, addr: Any) -> None:
    while data := flow.read():
        flow.write(data)


def test_run_server_echo_until_stop() -> None:
    stop: AsyncResult = AsyncResult()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        result = sw.fork_promise(net.run_server, lsock, echo, on_error=pytest.fail, stop=stop)
        for i in range(5):
            c = client(lsock.address.port)
            c.sendall(b"ping %d" % i)
            assert c.recv(100) == b"ping %d" % i
            c.close()
        stop.set("done")
        assert result.get() == "done"


def test_run_server_flow_socket_is_a_gevent_socket_of_the_same_connection() -> None:
    # The flow runs on a lean connection object; .socket makes gevent's on demand.
    seen: list[Any] = []

    def handler(flow: Flow, addr: Any) -> None:
        first = flow.read()
        sock = flow.socket
        seen.append((isinstance(sock, gsocket.socket), sock.fileno() == flow.fileno(),
                     sock is flow.socket))
        sock.sendall(first.upper())  # gevent's socket writes ...
        flow.write(flow.read())      # ... and the flow still reads and writes after it

    stop: AsyncResult = AsyncResult()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        result = sw.fork_promise(net.run_server, lsock, handler, on_error=pytest.fail,
                                 stop=stop)
        c = client(lsock.address.port)
        c.sendall(b"one")
        assert c.recv(100) == b"ONE"
        c.sendall(b"two")
        assert c.recv(100) == b"two"
        assert c.recv(100) == b""  # the server closed both (one connection)
        c.close()
        stop.set(None)
        result.get()
    assert seen == [(True, True, True)]


def _read_once(flow: Flow) -> None:
    flow.read()


def _write_forever(flow: Flow) -> None:
    while True:
        flow.write(b"x" * 65536)


@pytest.mark.parametrize("wait", [_read_once, _write_forever])
def test_run_server_flow_socket_settimeout_bounds_the_flows_reads_and_writes(
        wait: Any) -> None:
    # As docs/net.md says: flow.socket.settimeout(t) makes a read or a write that waits
    # longer raise TimeoutError (the flow waits on the lean connection: it follows).
    # The client sends nothing and reads nothing.
    raised: AsyncResult = AsyncResult()

    def handler(flow: Flow, addr: Any) -> None:
        flow.socket.settimeout(0.05)
        try:
            wait(flow)
        except TimeoutError as exc:
            raised.set(exc)

    stop: AsyncResult = AsyncResult()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        result = sw.fork_promise(net.run_server, lsock, handler, on_error=pytest.fail,
                                 stop=stop)
        c = client(lsock.address.port)
        assert isinstance(raised.get(timeout=5), TimeoutError)
        c.close()
        stop.set(None)
        result.get()


def test_run_server_limit_never_exceeded() -> None:
    limit, clients = 4, 40
    running = 0
    peak = 0
    served: list[int] = []

    def handler(flow: Flow, addr: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            data = flow.read()
            gevent.sleep(0.001)  # hold the slot across a hub iteration
            flow.write(data)
            served.append(1)
        finally:
            running -= 1

    stop = Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=clients)
        sw.fork(net.run_server, lsock, handler, on_error=pytest.fail,
                max_connections=limit, stop=stop)

        def one(i: int) -> bytes:
            c = client(lsock.address.port)
            try:
                c.sendall(b"%d" % i)
                return recv_all(c)
            finally:
                c.close()

        replies = [g.get() for g in [gevent.spawn(one, i) for i in range(clients)]]
        stop.set()
    assert replies == [b"%d" % i for i in range(clients)]
    assert peak == limit and len(served) == clients


def test_run_server_stop_lets_in_flight_handler_finish() -> None:
    in_handler, may_finish = Event(), Event()
    stop = Event()

    def handler(flow: Flow, addr: Any) -> None:
        flow.read()
        in_handler.set()
        may_finish.wait()
        flow.write(b"finished")

    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        server = sw.fork(net.run_server, lsock, handler, on_error=pytest.fail, stop=stop)
        c = client(lsock.address.port)
        c.sendall(b"go")
        in_handler.wait()
        stop.set()
        gevent.sleep(0)
        assert not server.dead  # waits for the handler
        late = socket.create_connection(lsock.address.sockaddr)  # backlog only: not served
        may_finish.set()
        assert recv_all(c) == b"finished"
        server.join()
        late.close()
        c.close()


@pytest.mark.parametrize("with_stop", [False, True])
def test_run_server_raises_when_its_listening_socket_breaks(with_stop: bool) -> None:
    # A listening socket shut down under the server (accept fails with EINVAL) ends
    # run_server with that error, once the running handler has finished; it does not
    # leave run_server waiting for connections that can never come.
    in_handler, may_finish = Event(), Event()

    def handler(flow: Flow, addr: Any) -> None:
        in_handler.set()
        may_finish.wait()
        flow.write(b"finished")

    outcome: list[BaseException] = []

    def serve(lsock: Any) -> None:
        try:
            net.run_server(lsock, handler, on_error=pytest.fail,
                           stop=Event() if with_stop else None)
        except OSError as exc:
            outcome.append(exc)

    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        server = sw.fork(serve, lsock)
        c = client(lsock.address.port)
        in_handler.wait()
        shut_down_reading(lsock.socket)  # the kernel: accept() -> EINVAL
        gevent.idle()  # the hub saw the listener readable, accept failed
        assert not server.dead and not outcome  # the handler is still running
        may_finish.set()
        assert recv_all(c) == b"finished"
        server.join()
        c.close()
    assert len(outcome) == 1 and outcome[0].errno == errno.EINVAL
    assert outcome[0].__notes__ == [f"accepting connections for run_server {lsock.address}"]


REQUEST_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="-")


def test_run_server_handlers_see_a_copy_of_the_callers_context() -> None:
    seen: list[str] = []

    def handler(flow: Flow, addr: Any) -> None:
        seen.append(REQUEST_TAG.get())
        REQUEST_TAG.set("changed by a handler")  # its own copy: no other connection sees it
        flow.write(b"ok")

    def serve(lsock: Any, stop: Event) -> None:
        REQUEST_TAG.set("set by the caller")
        net.run_server(lsock, handler, on_error=pytest.fail, stop=stop)

    stop = Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        sw.fork(serve, lsock, stop)
        for _ in range(2):
            with client(lsock.address.port) as c:
                assert recv_all(c) == b"ok"
        stop.set()
    assert seen == ["set by the caller"] * 2
    assert REQUEST_TAG.get() == "-"


def test_run_server_handler_error_reaches_on_error_with_address() -> None:
    got: AsyncResult = AsyncResult()

    def handler(flow: Flow, addr: Any) -> None:
        raise KeyError("bad request")

    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        sw.fork_daemon(net.run_server, lsock, handler, on_error=got.set)
        c = client(lsock.address.port)
        exc = got.get()
        local = c.getsockname()
        c.close()
        sw.cancel()
    assert isinstance(exc, KeyError)
    assert exc.__notes__ == [f"handling connection from tcp:{local[0]}:{local[1]}"]


def test_run_server_cancelled_cancels_handlers() -> None:
    cancelled = Event()
    started = Event()

    def handler(flow: Flow, addr: Any) -> None:
        started.set()
        try:
            Event().wait()
        except Cancelled:
            cancelled.set()
            raise

    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        sw.fork(net.run_server, lsock, handler, on_error=pytest.fail)
        c = client(lsock.address.port)
        started.wait()
        sw.cancel()
    assert cancelled.is_set()
    assert c.recv(10) == b""
    c.close()


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_connections": -3}, ValueError, "max_connections"),
        ({"additional_processes": -1}, ValueError, "additional_processes"),
        ({"stop": "soon"}, TypeError, "stop"),
    ],
)
def test_run_server_bad_arguments(kw: dict[str, Any], exc: type, match: str) -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with pytest.raises(exc, match=match):
            net.run_server(lsock, echo, on_error=pytest.fail, **kw)


# -- datagrams ---------------------------------------------------------------------------------


def test_udp_send_recv() -> None:
    with Switch() as sw:
        server = net.datagram_socket(Udp("127.0.0.1", 0), sw=sw)
        assert isinstance(server.address, Udp) and server.address.port
        cl = net.datagram_socket("udp4", sw=sw)
        net.send(cl, server.address, b"ping")
        buf = bytearray(100)
        sender, n = net.recv(server, buf)
        assert bytes(buf[:n]) == b"ping" and isinstance(sender, Udp)
        server.send(sender, b"pong")
        addr, n = cl.recv(buf)
        assert (addr, bytes(buf[:n])) == (server.address, b"pong")


def test_udp6() -> None:
    with Switch() as sw:
        server = net.datagram_socket("udp://[::1]:0", sw=sw)
        cl = net.datagram_socket("udp6", sw=sw)
        cl.send(server.address, b"six")
        buf = bytearray(10)
        _, n = server.recv(buf)
        assert bytes(buf[:n]) == b"six"


def test_unix_datagram(tmp_path: Path) -> None:
    spath, cpath = str(tmp_path / "srv.sock"), str(tmp_path / "cli.sock")
    with Switch() as sw:
        server = net.datagram_socket(Unix(spath), sw=sw)
        cl = net.datagram_socket(Unix(cpath), sw=sw)
        cl.send(Unix(spath), b"hello")
        buf = bytearray(10)
        sender, n = server.recv(buf)
        assert (sender, bytes(buf[:n])) == (Unix(cpath), b"hello")
    assert not os.path.exists(spath) and not os.path.exists(cpath)


def test_datagram_socket_bad_address() -> None:
    with Switch() as sw:
        with pytest.raises(ValueError, match="udp"):
            net.datagram_socket(Tcp("127.0.0.1", 0), sw=sw)
        with pytest.raises(TypeError, match="sw"):
            net.datagram_socket("udp4", sw=object())  # type: ignore[arg-type]
        s = net.datagram_socket("udp4", sw=sw)
        with pytest.raises(TypeError, match="addr"):
            s.send(("127.0.0.1", 1), b"x")  # type: ignore[arg-type]


# -- names -------------------------------------------------------------------------------------


def test_getaddrinfo_localhost() -> None:
    addrs = net.getaddrinfo("localhost", 80)
    assert Tcp("127.0.0.1", 80) in addrs and Udp("127.0.0.1", 80) in addrs
    assert all(isinstance(a, Tcp) for a in net.getaddrinfo_stream("localhost", 80))
    assert all(isinstance(a, Udp) for a in net.getaddrinfo_datagram("localhost", 80))
    assert net.getaddrinfo("127.0.0.1", "http")[0].port == 80


def test_getaddrinfo_failure() -> None:
    # An unknown service fails locally, without asking any name server.
    with pytest.raises(AddressLookupFailed) as info:
        net.getaddrinfo("127.0.0.1", "no-such-service-greenserve")
    assert isinstance(info.value, socket.gaierror)
    with pytest.raises(ValueError, match="host"):
        net.getaddrinfo("")


def test_getnameinfo() -> None:
    host, service = net.getnameinfo(Tcp("127.0.0.1", 80))
    assert host in ("localhost", "127.0.0.1") and service in ("http", "80")
    assert net.getnameinfo(Udp("127.0.0.1", 53))[1] in ("domain", "53")
    with pytest.raises(TypeError, match="addr"):
        net.getnameinfo(Unix("/x"))  # type: ignore[arg-type]


# -- processes: fd exhaustion and additional_processes ------------------------------------------

SCRIPTS = Path(__file__).parent / "scripts"


def _start(script: str, *args: str) -> tuple[Any, int]:
    from gevent import subprocess

    env = {**os.environ, "PYTHONPATH": str(SCRIPTS.parent.parent)}
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise AssertionError(proc.stderr.read().decode())
    return proc, int(line)


@pytest.mark.no_leak_check
def test_run_server_survives_fd_exhaustion() -> None:
    proc, port = _start("emfile_server.py", "40")
    release = Event()
    served: list[int] = []
    try:
        def one(i: int) -> None:
            c = client(port)
            try:
                c.sendall(b"%d" % i)
                assert c.recv(100) == b"%d" % i
                served.append(i)
                release.wait()
            finally:
                c.close()

        clients = [gevent.spawn(one, i) for i in range(80)]
        # wait for the server to report that it ran out of fds
        log_lines = []
        while not any("Too many open files" in line for line in log_lines):
            log_lines.append(proc.stderr.readline().decode())
            assert log_lines[-1], "server exited"
        assert 0 < len(served) < 80
        # the connections it has are still served while it is out of fds
        c = client(port)  # waits in the backlog
        release.set()
        c.sendall(b"late")
        assert c.recv(100) == b"late"
        c.close()
        gevent.joinall(clients, raise_error=True)
        assert sorted(served) == list(range(80))
    finally:
        proc.terminate()
        _, err = proc.communicate()
    # rate limited: one line (plus at most a count), not a traceback per failed accept
    lines = [line for line in (log_lines + err.decode().splitlines()) if "accept failed" in line]
    assert 1 <= len(lines) <= 2, lines
    assert "Traceback" not in err.decode()


@pytest.mark.no_leak_check
def test_run_server_additional_processes_spread_and_stop() -> None:
    proc, port = _start("multiprocess_server.py", "2")
    held = []
    try:
        pids = set()
        for _ in range(3):  # each process holds at most one connection
            c = client(port)
            held.append(c)
            pids.add(int(c.recv(100)))
        assert len(pids) == 3 and proc.pid in pids
        children = pids - {proc.pid}
        victim = children.pop()
        os.kill(victim, 9)  # a child that dies is logged; the others keep serving
        while b"killed by SIGKILL" not in (line := proc.stderr.readline()):
            assert line, "server exited"
        for c in held:
            c.close()
        held = []
        c = client(port)
        held.append(c)
        assert int(c.recv(100)) in (proc.pid, *children)
        c.close()
        proc.terminate()  # SIGTERM: stop -> children stop -> parent returns
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out.strip() == b"stopped"
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for c in held:
            c.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.no_leak_check
def test_run_server_children_stop_at_once_not_after_the_parent_drained() -> None:
    # stop reaches the additional processes when it is set: a child whose connection
    # ends exits while the parent is still waiting for its own handler.
    proc, port = _start("multiprocess_server.py", "1")
    held: dict[int, Any] = {}
    try:
        for _ in range(2):  # each process holds at most one connection
            c = client(port)
            held[int(c.recv(100))] = c
        assert proc.pid in held and len(held) == 2
        (child,) = set(held) - {proc.pid}
        proc.terminate()  # SIGTERM: the parent sets stop
        held.pop(child).close()  # the child's handler ends
        with gevent.Timeout(10, AssertionError("the child did not stop with the parent")):
            while not _gone(child):  # reaped by the parent's watcher
                gevent.sleep(0.01)
        assert proc.poll() is None  # the parent still waits for its handler
        held.pop(proc.pid).close()
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out.strip() == b"stopped"
    finally:
        for c in held.values():
            c.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def test_listening_socket_context_manager_and_repr() -> None:
    with Switch() as sw:
        with net.listen(Tcp("127.0.0.1", 0), sw=sw) as lsock:
            assert str(lsock.address) in repr(lsock)
        assert lsock.closed
        lsock.close()  # idempotent


# -- with_tcp_connect over TLS ------------------------------------------------------------------


def test_with_tcp_connect_speaks_tls_and_checks_the_host_name(certs: Any) -> None:
    import ssl

    from greenserve import StreamServer

    def handle(sock: Any, addr: Any) -> None:
        sock.sendall(sock.recv(100).upper())

    server = StreamServer(("127.0.0.1", 0), handle, ssl_context=certs.server_context())
    server.start()
    try:
        port = server.server_port
        with net.with_tcp_connect("127.0.0.1", port, timeout=5,
                                  ssl_context=certs.client_context(),
                                  server_hostname="localhost") as flow:
            flow.write(b"secret")
            assert flow.read() == b"SECRET"
            assert flow.socket.version() is not None  # a TLS socket
        wrong_name = net.with_tcp_connect("127.0.0.1", port, timeout=5,
                                          ssl_context=certs.client_context(),
                                          server_hostname="not-this-host")
        with pytest.raises(ssl.SSLCertVerificationError), wrong_name:
            pass
        not_a_context = net.with_tcp_connect("127.0.0.1", port,
                                             ssl_context=object())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ssl_context"), not_a_context:
            pass
    finally:
        server.stop()
