"""``greenserve.server.StreamServer``: what it adds to (and fixes in) gevent's server.

gevent's own test-suite runs against it in ``test_gevent_server_suite.py``; here are
restart, Group/Pool/int/None/callable spawn, unix and fd listeners, ``stop(timeout)``,
``max_connections``, ``num_connections``, ``stats()``, TLS, PROXY, idle timeout and
argument checking. Real loopback sockets; waits are on conditions, bounded.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event
from gevent.pool import Group, Pool

from greenserve import Cancelled, Tcp, Unix
from greenserve.server import ABORT_GRACE, StreamServer

from .helpers import client, closed_by_server, recv_all, shut_down_reading, tls_over


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (cooperatively, bounded) for a condition the server makes true."""
    with gevent.Timeout(timeout):
        while not cond():
            gevent.sleep(0.001)


def echo(sock: Any, address: Any) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


def hello(sock: Any, address: Any) -> None:
    sock.sendall(b"hello")


@contextmanager
def running(server: StreamServer) -> Iterator[StreamServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


def port_of(server: StreamServer) -> int:
    port = server.server_port
    assert port is not None
    return port


def request(server: StreamServer, data: bytes = b"") -> bytes:
    """Send ``data`` (if any), end the request, and read until the server closes."""
    with client(port_of(server)) as c:
        if data:
            c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        return recv_all(c)


def tls_client(server: StreamServer, ctx: ssl.SSLContext) -> Any:
    return tls_over(client(port_of(server)), ctx)


# -- lifecycle -------------------------------------------------------------------------------


def test_restart_after_stop_serves_on_the_same_port() -> None:
    server = StreamServer(("127.0.0.1", 0), echo)
    server.start()
    port = server.server_port
    assert request(server, b"ping") == b"ping"
    server.stop()
    assert not server.started and server.closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    server.start()
    try:
        assert server.started and server.server_port == port
        assert request(server, b"again") == b"again"
        assert server.stats()["accepted"] == 1  # the new run's counters
    finally:
        server.stop()


def test_restart_after_close_and_with_a_passed_socket() -> None:
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    server = StreamServer(lsock, echo)
    server.start()
    server.close()  # closes the socket it was given, as gevent does
    assert lsock.fileno() == -1
    server.start()  # binds the same address again
    try:
        assert request(server, b"ping") == b"ping"
    finally:
        server.stop()


def test_start_on_a_started_server_and_stop_are_idempotent() -> None:
    server = StreamServer(("127.0.0.1", 0), echo)
    with running(server):
        server.start()
        assert request(server, b"ping") == b"ping"
    server.stop()
    server.close()
    assert not server.started


def test_context_manager_stops() -> None:
    with StreamServer(("127.0.0.1", 0), echo) as server:
        server.start()
        assert request(server, b"ping") == b"ping"
    assert server.closed and not server.started


def test_serve_forever_stops_when_its_greenlet_is_killed() -> None:
    server = StreamServer(("127.0.0.1", 0), echo)
    g = gevent.spawn(server.serve_forever)
    wait_until(lambda: server.started)
    assert request(server, b"ping") == b"ping"
    g.kill()
    assert not server.started and server.closed


def _spawn_returning_nothing(fn: Any, *args: Any) -> None:
    gevent.spawn(fn, *args)


@pytest.mark.parametrize("spawn", ["default", "hub", "pool", "gevent.spawn", "spawn_raw",
                                   "returns nothing"])
def test_stop_from_inside_a_handler(spawn: str) -> None:
    # stop() sees it runs in a handler (it must not wait for itself), whatever runs them.
    chosen: Any = {"default": "default", "hub": None, "pool": Pool(4),
                   "gevent.spawn": gevent.spawn, "spawn_raw": gevent.spawn_raw,
                   "returns nothing": _spawn_returning_nothing}[spawn]

    def handler(sock: Any, address: Any) -> None:
        server.stop()
        sock.sendall(b"bye")

    server = StreamServer(("127.0.0.1", 0), handler, spawn=chosen)
    server.start()
    assert request(server) == b"bye"
    wait_until(lambda: server.num_connections == 0)
    assert not server.started


def test_stop_accepting_keeps_clients_in_the_backlog() -> None:
    server = StreamServer(("127.0.0.1", 0), hello)
    with running(server):
        server.stop_accepting()
        c = client(port_of(server))
        server.start_accepting()
        assert recv_all(c) == b"hello"
        c.close()


# -- stop(timeout) -------------------------------------------------------------------------


def test_stop_lets_handlers_finish_within_the_grace_period() -> None:
    release = Event()
    started = Event()

    def handler(sock: Any, address: Any) -> None:
        started.set()
        release.wait()
        sock.sendall(b"finished")

    server = StreamServer(("127.0.0.1", 0), handler)
    server.start()
    c = client(port_of(server))
    started.wait()
    stopper = gevent.spawn(server.stop, 30)
    wait_until(lambda: server.closed)
    assert server.num_connections == 1
    t0 = time.monotonic()
    release.set()
    stopper.get(timeout=5)
    assert time.monotonic() - t0 < 5
    assert recv_all(c) == b"finished"
    c.close()


def test_stop_closes_connections_still_open_after_the_grace_period() -> None:
    cancelled: list[Any] = []
    started = Event()

    def handler(sock: Any, address: Any) -> None:
        started.set()
        try:
            sock.recv(10)  # the client never sends
        except Cancelled:
            cancelled.append(address)
            raise

    server = StreamServer(("127.0.0.1", 0), handler)
    server.start()
    c = client(port_of(server))
    started.wait()
    t0 = time.monotonic()
    server.stop(timeout=0.2)
    took = time.monotonic() - t0
    assert 0.2 <= took < 0.2 + ABORT_GRACE
    assert recv_all(c) == b""  # the client sees end of file
    c.close()
    assert len(cancelled) == 1 and server.num_connections == 0


@pytest.mark.parametrize("spawn", ["default", "gevent.spawn", "pool", "spawn_raw"])
def test_stop_timeout_cancels_handlers_of_every_spawn_kind(spawn: str) -> None:
    chosen: Any = {"default": "default", "gevent.spawn": gevent.spawn, "pool": Pool(4),
                   "spawn_raw": gevent.spawn_raw}[spawn]
    started = Event()

    def handler(sock: Any, address: Any) -> None:
        started.set()
        Event().wait()

    server = StreamServer(("127.0.0.1", 0), handler, spawn=chosen)
    server.start()
    c = client(port_of(server))
    started.wait()
    server.stop(timeout=0.05)
    assert recv_all(c) == b""
    c.close()
    assert server.num_connections == 0


# -- limits ----------------------------------------------------------------------------------


def _limit_run(server: StreamServer, n_clients: int) -> int:
    """Serve ``n_clients`` that each hold their connection; return the peak concurrency."""
    running_now = peak = 0
    gates: list[Event] = []

    def handler(sock: Any, address: Any) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        gate = Event()
        gates.append(gate)
        try:
            gate.wait()
            sock.sendall(b"done")
        finally:
            running_now -= 1

    server.set_handle(handler)
    with running(server):
        clients = [client(port_of(server)) for _ in range(n_clients)]
        for served in range(n_clients):
            wait_until(lambda n=served: len(gates) > n)
            gates[served].set()
        for c in clients:
            assert recv_all(c) == b"done"
            c.close()
    return peak


def test_max_connections_is_never_exceeded() -> None:
    server = StreamServer(("127.0.0.1", 0), max_connections=3, max_accepts_per_batch=16,
                          handle=echo)
    assert _limit_run(server, 12) <= 3
    assert server.stats()["peak_active"] == 3 and server.stats()["accepted"] == 12


def test_an_int_spawn_is_a_pool_and_its_size_the_limit() -> None:
    server = StreamServer(("127.0.0.1", 0), echo, spawn=2)
    assert isinstance(server.pool, Pool) and server.pool.size == 2
    assert _limit_run(server, 6) == 2


def test_an_unbounded_pool_leaves_the_limit_to_max_connections() -> None:
    server = StreamServer(("127.0.0.1", 0), echo, spawn=Pool(None), max_connections=3,
                          max_accepts_per_batch=16)
    assert _limit_run(server, 6) == 3


def test_max_connections_and_a_pool_the_smaller_limit_wins() -> None:
    server = StreamServer(("127.0.0.1", 0), echo, spawn=Pool(5), max_connections=2)
    assert _limit_run(server, 5) == 2


def test_a_pool_shared_by_two_servers_is_never_exceeded() -> None:
    pool = Pool(2)
    gate = Event()
    served: list[Any] = []

    def handler(sock: Any, address: Any) -> None:
        served.append(address)
        sock.sendall(b"hi")
        gate.wait()

    a = StreamServer(("127.0.0.1", 0), handler, spawn=pool)
    b = StreamServer(("127.0.0.1", 0), handler, spawn=pool)
    with running(a), running(b):
        held = [client(port_of(a)) for _ in range(2)]
        for c in held:
            assert c.recv(2) == b"hi"
        assert pool.full()
        waiting = client(port_of(b))
        wait_until(lambda: b.num_connections == 1)  # accepted, waiting for room
        assert len(served) == 2 and len(pool) == 2
        gate.set()
        assert waiting.recv(2) == b"hi"
        for c in [*held, waiting]:
            c.close()
        wait_until(lambda: len(pool) == 0)
    assert len(served) == 3


def test_group_spawn_tracks_the_handlers() -> None:
    group = Group()
    inside = Event()
    release = Event()

    def handler(sock: Any, address: Any) -> None:
        assert gevent.getcurrent() in group
        inside.set()
        release.wait()

    server = StreamServer(("127.0.0.1", 0), handler, spawn=group)
    assert server.pool is group
    with running(server):
        c = client(port_of(server))
        inside.wait()
        assert len(group) == 1 and server.num_connections == 1
        release.set()
        assert recv_all(c) == b""
        c.close()
        group.join(timeout=5)
    assert len(group) == 0


def test_spawn_none_runs_the_handler_in_the_hub() -> None:
    where: list[Any] = []

    def handler(sock: Any, address: Any) -> None:
        where.append(gevent.getcurrent())
        sock.sendall(b"hub")

    server = StreamServer(("127.0.0.1", 0), handler, spawn=None)
    with running(server):
        assert request(server) == b"hub"
    assert where == [gevent.get_hub()]


def test_a_custom_spawn_callable_is_used() -> None:
    calls: list[Any] = []

    def spawn(fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        calls.append(args[1])
        return gevent.spawn(fn, *args)

    server = StreamServer(("127.0.0.1", 0), echo, spawn=spawn)
    with running(server):
        assert request(server, b"ping") == b"ping"
    assert len(calls) == 1 and isinstance(calls[0], Tcp)


def test_a_failing_spawn_closes_that_connection_and_the_server_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(gevent.get_hub(), "handle_error",
                        lambda where, t, v, tb: reported.append(v))
    fail = [True]

    def spawn(fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        if fail[0]:
            raise RuntimeError("no greenlet for you")
        return gevent.spawn(fn, *args)

    server = StreamServer(("127.0.0.1", 0), hello, spawn=spawn)
    with running(server):
        assert request(server) == b""
        assert [str(e) for e in reported] == ["no greenlet for you"]
        fail[0] = False
        assert request(server) == b"hello"
        assert server.stats()["accepted"] == 2 and server.stats()["handler_errors"] == 0


# -- connections, errors, stats ----------------------------------------------------------------


def test_num_connections_and_stats() -> None:
    assert StreamServer(("127.0.0.1", 0), echo).stats() == {
        "accepted": 0, "active": 0, "dropped": 0, "handler_errors": 0, "accept_errors": 0,
        "peak_active": 0}
    server = StreamServer(("127.0.0.1", 0), echo)
    with running(server):
        assert server.num_connections == 0
        a = client(port_of(server))
        b = client(port_of(server))
        wait_until(lambda: server.num_connections == 2)
        a.close()
        wait_until(lambda: server.num_connections == 1)
        stats = server.stats()
        assert stats["accepted"] == 2 and stats["active"] == 1 and stats["peak_active"] == 2
        stats["accepted"] = 99  # a copy
        assert server.stats()["accepted"] == 2
        b.close()
        wait_until(lambda: server.num_connections == 0)
    assert "connections=0" in repr(server)


def test_handler_error_goes_to_the_hub_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[tuple[Any, Any]] = []
    monkeypatch.setattr(gevent.get_hub(), "handle_error",
                        lambda where, t, v, tb: reported.append((where, v)))

    def handler(sock: Any, address: Any) -> None:
        raise KeyError("broken")

    server = StreamServer(("127.0.0.1", 0), handler)
    with running(server):
        c = client(port_of(server))
        host, port = c.getsockname()
        assert recv_all(c) == b""
        c.close()
        wait_until(lambda: bool(reported))
        assert request(server) == b""  # still serving
    where, exc = reported[0]
    assert isinstance(where, gevent.Greenlet) and isinstance(exc, KeyError)
    assert exc.__notes__ == [f"handling connection from tcp:{host}:{port}"]
    assert server.stats()["handler_errors"] == 2


def test_handler_gets_gevent_style_arguments() -> None:
    got: list[Any] = []

    def handler(sock: Any, address: Any) -> None:
        got.append((type(sock), address))

    server = StreamServer(("127.0.0.1", 0), handler)
    with running(server):
        c = client(port_of(server))
        local = c.getsockname()
        assert recv_all(c) == b""
        c.close()
    # A gevent socket (the engine's subclass, whose waits keep a shallower stack).
    assert len(got) == 1 and issubclass(got[0][0], gsocket.socket) and got[0][1] == local


# -- listeners -------------------------------------------------------------------------------


def test_unix_listener(tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")
    server = StreamServer(f"unix:{path}", hello)
    assert server.family == socket.AF_UNIX and server.server_port is None
    for _ in range(2):  # and again after a restart
        server.start()
        try:
            assert server.address == path and os.path.exists(path)
            with gsocket.socket(socket.AF_UNIX) as c:
                c.settimeout(5)
                c.connect(path)
                assert recv_all(c) == b"hello"
        finally:
            server.stop()
        assert not os.path.exists(path)


def test_address_forms() -> None:
    for listener, host in [(("127.0.0.1", 0), "127.0.0.1"), ("127.0.0.1:0", "127.0.0.1"),
                           (":0", "0.0.0.0"), (Tcp("127.0.0.1", 0), "127.0.0.1"),
                           ("tcp://127.0.0.1:0", "127.0.0.1")]:
        server = StreamServer(listener, echo)
        with running(server):
            assert server.server_host == host, listener
            assert request(server, b"ping") == b"ping"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_a_bare_port_listens_on_every_interface_as_in_gevent() -> None:
    addresses: list[Any] = []

    def handler(sock: Any, address: Any) -> None:
        addresses.append(address)
        echo(sock, address)

    server = StreamServer("0", handler)
    with running(server):
        assert server.family == socket.AF_INET6 and server.server_host == "::"
        assert request(server, b"ping") == b"ping"  # over IPv4 (127.0.0.1)
        with client(port_of(server), "::1") as c:
            c.sendall(b"v6")
            assert c.recv(2) == b"v6"
            assert addresses[-1] == c.getsockname()  # accept()'s 4-tuple, as in gevent


def test_fd_listener() -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    server = StreamServer(f"fd://{lsock.detach()}", echo)
    with running(server):
        assert request(server, b"ping") == b"ping"


def test_a_stdlib_socket_is_taken_over() -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    server = StreamServer(lsock, echo)
    assert lsock.fileno() == -1  # detached: the server owns the fd now
    with running(server):
        assert request(server, b"ping") == b"ping"


def test_a_unix_address_object(tmp_path: Any) -> None:
    server = StreamServer(Unix(str(tmp_path / "u.sock")), hello)
    with running(server):
        assert server.family == socket.AF_UNIX


# -- TLS, PROXY, idle timeout ---------------------------------------------------------------


def test_tls_with_ssl_context(certs: Any) -> None:
    assert not StreamServer(("127.0.0.1", 0), echo, ssl_context=None).ssl_enabled
    server = StreamServer(("127.0.0.1", 0), echo, ssl_context=certs.server_context(),
                          server_side=True, do_handshake_on_connect=False)
    assert server.ssl_enabled
    assert server.ssl_args == {"server_side": True, "do_handshake_on_connect": False}
    with running(server), tls_client(server, certs.client_context()) as tls:
        tls.sendall(b"secret")
        assert tls.recv(10) == b"secret"


def test_tls_with_gevent_certfile_keyfile(certs: Any) -> None:
    server = StreamServer(("127.0.0.1", 0), echo, certfile=str(certs.cert),
                          keyfile=str(certs.key))
    assert isinstance(server.ssl_context, ssl.SSLContext)
    with running(server), tls_client(server, certs.client_context()) as tls:
        tls.sendall(b"x")
        assert tls.recv(10) == b"x"


def test_failed_tls_handshake_closes_only_that_connection(certs: Any) -> None:
    # What gevent's test_wrap_socket_and_handle_wrap_failure protects (issue #1236).
    called: list[Any] = []

    def handler(sock: Any, address: Any) -> None:
        called.append(address)
        echo(sock, address)

    server = StreamServer(("127.0.0.1", 0), handler, ssl_context=certs.server_context())
    with running(server):
        bad = client(port_of(server))
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not TLS
        assert closed_by_server(bad)  # after a TLS alert at most
        bad.close()
        wait_until(lambda: server.stats()["handshake_errors"] == 1)
        assert called == []
        with tls_client(server, certs.client_context()) as tls:
            tls.sendall(b"ok")
            assert tls.recv(10) == b"ok"
    assert len(called) == 1


def test_proxy_protocol_gives_the_original_client() -> None:
    got: list[Any] = []
    server = StreamServer(("127.0.0.1", 0), lambda s, a: got.append(a), proxy_protocol=True)
    with running(server):
        c = client(port_of(server))
        c.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n")
        assert recv_all(c) == b""
        c.close()
        wait_until(lambda: bool(got))
    assert got == [("192.0.2.7", 40000)]


def test_idle_timeout_closes_a_silent_connection() -> None:
    server = StreamServer(("127.0.0.1", 0), echo, idle_timeout=0.1)
    with running(server):
        c = client(port_of(server))
        assert recv_all(c) == b""
        c.close()
        wait_until(lambda: server.stats()["idle_timeouts"] == 1)


# -- arguments -------------------------------------------------------------------------------


def test_bad_arguments_fail_before_any_socket_and_leave_a_passed_socket_alone() -> None:
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    try:
        with pytest.raises(TypeError, match="backlog must be None"):
            StreamServer(lsock, echo, backlog=5)
        assert lsock.fileno() != -1
    finally:
        lsock.close()
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"spawn": "other"}, ValueError, "spawn"),
        ({"spawn": 0}, ValueError, "spawn"),
        ({"spawn": 1.5}, TypeError, "spawn"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_accepts_per_batch": 0}, ValueError, "max_accepts_per_batch"),
        ({"backlog": -1}, ValueError, "backlog"),
        ({"bogus": 1}, TypeError, "bogus"),
        ({"suppress_ragged_eofs": False, "certfile": "x"}, ValueError, "suppress_ragged_eofs"),
        ({"ssl_context": ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "certfile": "x"},
         TypeError, "certfile"),
        ({"ssl_context": "ctx"}, TypeError, "ssl_context"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
    ]
    for kw, exc, word in cases:
        with pytest.raises(exc, match=word):
            StreamServer(("127.0.0.1", 0), echo, **kw)
    with pytest.raises(TypeError, match="handle"):
        StreamServer(("127.0.0.1", 0))
    with pytest.raises(TypeError, match="handle"):
        StreamServer(("127.0.0.1", 0), handle="nope")
    with pytest.raises(TypeError, match="listener"):
        StreamServer(object(), echo)


def test_a_tls_socket_is_not_a_listener(certs: Any) -> None:
    with socket.socket() as raw:
        tls = certs.server_context().wrap_socket(raw, server_side=True,
                                                 do_handshake_on_connect=False)
        with tls, pytest.raises(TypeError, match="SSLSocket"):
            StreamServer(tls, echo)


def test_spawn_and_listener_cannot_change_while_started() -> None:
    server = StreamServer(("127.0.0.1", 0), echo)
    with running(server):
        with pytest.raises(RuntimeError, match="set_spawn"):
            server.set_spawn(4)
        with pytest.raises(RuntimeError, match="set_listener"):
            server.set_listener(("127.0.0.1", 0))


# -- gevent's hooks and helpers ---------------------------------------------------------------


def test_do_close_is_called_after_each_handler() -> None:
    closed: list[Any] = []

    class Server(StreamServer):
        def handle(self, sock: Any, address: Any) -> None:
            sock.sendall(b"x")

        def do_close(self, sock: Any, *args: Any) -> None:
            closed.append(args)
            super().do_close(sock, *args)

    server = Server(("127.0.0.1", 0))
    with running(server):
        assert request(server) == b"x"
        assert request(server) == b"x"
        wait_until(lambda: len(closed) == 2)
    assert all(len(args) == 1 and isinstance(args[0], tuple) for args in closed)


def test_full_at_the_limit() -> None:
    inside = Event()
    release = Event()

    def handler(sock: Any, address: Any) -> None:
        inside.set()
        release.wait()

    server = StreamServer(("127.0.0.1", 0), handler, max_connections=1)
    with running(server):
        assert not server.full()
        c = client(port_of(server))
        inside.wait()
        assert server.full()
        release.set()
        assert recv_all(c) == b""
        c.close()
        wait_until(lambda: not server.full())


def test_wrap_socket_and_handle(certs: Any) -> None:
    got: list[Any] = []
    server = StreamServer(("127.0.0.1", 0), lambda s, a: got.append((type(s), s.recv(2), a)),
                          ssl_context=certs.server_context())
    left, right = gsocket.socketpair()

    def talk() -> None:
        with tls_over(right, certs.client_context()) as tls:
            tls.sendall(b"hi")
            tls.recv(1)  # until the server closes

    g = gevent.spawn(talk)
    server.wrap_socket_and_handle(left, "peer")
    g.get(timeout=5)
    assert got == [(gssl.SSLSocket, b"hi", "peer")]
    with pytest.raises(ValueError, match="no TLS"):
        StreamServer(("127.0.0.1", 0), echo).wrap_socket_and_handle(left, "peer")


def test_tls_client_certificates_from_gevent_arguments(certs: Any) -> None:
    called: list[Any] = []
    server = StreamServer(("127.0.0.1", 0), lambda s, a: called.append(a),
                          certfile=str(certs.cert), keyfile=str(certs.key),
                          ca_certs=str(certs.ca), cert_reqs=ssl.CERT_REQUIRED,
                          ssl_version=ssl.PROTOCOL_TLS, ciphers="HIGH")
    assert server.ssl_context is not None
    assert server.ssl_context.verify_mode == ssl.CERT_REQUIRED
    with running(server):
        try:
            with tls_client(server, certs.client_context()) as tls:  # no client certificate
                tls.recv(10)
        except (ssl.SSLError, OSError):
            pass  # the server's alert, or its close
        wait_until(lambda: server.stats()["handshake_errors"] == 1)
    assert called == []


def test_handlers_ignoring_cancellation_do_not_hang_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import greenserve.server

    monkeypatch.setattr(greenserve.server, "ABORT_GRACE", 0.05)
    inside = Event()
    let_go = Event()

    def stubborn(sock: Any, address: Any) -> None:
        inside.set()
        while not let_go.is_set():
            try:
                let_go.wait()
            except Cancelled:
                pass  # ignores it (bad style, but it happens)

    server = StreamServer(("127.0.0.1", 0), stubborn)
    server.start()
    c = client(port_of(server))
    inside.wait()
    t0 = time.monotonic()
    server.stop(timeout=0.01)
    assert time.monotonic() - t0 < 1
    assert server.num_connections == 1
    let_go.set()
    wait_until(lambda: server.num_connections == 0)
    c.close()


def test_a_stale_unix_socket_file_is_replaced_but_never_another_file(tmp_path: Any) -> None:
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # a crashed server leaves its socket file behind
    server = StreamServer(f"unix:{path}", hello)
    with running(server):
        assert server.address == path
    other = tmp_path / "file"
    other.write_text("keep me")
    with pytest.raises(FileExistsError):
        StreamServer(f"unix:{other}", hello).start()
    assert other.read_text() == "keep me"


def test_repr_and_str() -> None:
    server = StreamServer(("127.0.0.1", 0), echo)
    assert "address=127.0.0.1:0" in str(server) and "handle=<function echo" in repr(server)
    with running(server):
        assert f"address=127.0.0.1:{server.server_port}" in repr(server)
        assert "fileno=" in repr(server)


@pytest.mark.parametrize("spawn", ["default", "gevent.spawn"])
def test_system_exit_in_a_handler_goes_to_the_hub_and_ends_only_its_connection(
        spawn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(gevent.get_hub(), "handle_error",
                        lambda where, t, v, tb: reported.append(v))
    other_inside = Event()
    release = Event()

    def handler(sock: Any, address: Any) -> None:
        if sock.recv(4) == b"exit":
            raise SystemExit(3)
        other_inside.set()
        release.wait()
        sock.sendall(b"still here")

    server = StreamServer(("127.0.0.1", 0), handler,
                          spawn="default" if spawn == "default" else gevent.spawn)
    with running(server):
        other = client(port_of(server))
        other.sendall(b"wait")
        other_inside.wait()
        assert request(server, b"exit") == b""
        wait_until(lambda: bool(reported))
        release.set()
        assert recv_all(other) == b"still here"
        other.close()
    assert [type(e) for e in reported] == [SystemExit]
    assert reported[0].__notes__[0].startswith("handling connection from tcp:127.0.0.1:")


def test_set_listener_before_start_replaces_and_closes_the_previous_socket() -> None:
    lsock = gsocket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    server = StreamServer(lsock, echo)
    server.set_listener(("127.0.0.1", 0))
    assert lsock.fileno() == -1 and server.closed
    with running(server):
        assert request(server, b"ping") == b"ping"


def test_a_broken_listening_socket_stops_serve_forever() -> None:
    # As gevent's server does: accept() failing with EINVAL (the listening socket was
    # shut down) closes the server and serve_forever() returns.
    server = StreamServer(("127.0.0.1", 0), lambda sock, addr: None)
    runner = gevent.spawn(server.serve_forever)
    gevent.idle()
    shut_down_reading(server.socket)
    runner.get(timeout=5)
    assert server.closed
