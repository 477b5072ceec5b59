"""Fourth attack: the per-connection hot paths cut down (the accept loop inside
``_accept_batch`` with ``_admit``, ``_release`` skipping ``_update``,
StreamServer's spawn-first ``_spawn_connection`` and ``_pool_full`` fast path,
``ServedSocket.close``/``Conn.close`` in one step, Flow/Reader/Writer on a ``Conn``
directly). Real clients on loopback (127.0.0.1, unix sockets in a tmp dir), every wait
bounded.

Each test pins behaviour users rely on; one bug it found (a flow used after
``flow.socket.close()`` with a writer waiting on the fd hung) is fixed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event
from gevent.pool import Group, Pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenserve import Flow, StreamServer, Switch, Writer, net, tcp

from ..contract.faces import HAS_IPV6
from ..helpers import reset
from .support import Gauge, wait_until
from .test_attack import closing_server, connect_to

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0


# -- servers and clients ---------------------------------------------------------------------


@contextmanager
def run_server(handler: Callable[[Flow, Any], object], *, where: str = "127.0.0.1:0",
               **kw: Any) -> Iterator[tuple[Any, list[Exception]]]:
    """``net.run_server`` in a greenlet; yields (address to connect to, handler errors).
    Stopped (drained, then aborted) on exit."""
    stop = Event()
    errors: list[Exception] = []
    address: AsyncResult = AsyncResult()

    def run() -> None:
        with Switch() as sw:
            lsock = net.listen(where, sw=sw, backlog=128)
            a = lsock.address
            address.set(str(a.path) if where.startswith("unix:") else ("127.0.0.1", a.port))
            net.run_server(lsock, handler, on_error=errors.append, stop=stop,
                           drain_timeout=1.0, **kw)

    g = gevent.spawn(run)
    try:
        yield address.get(timeout=TIMEOUT), errors
    finally:
        stop.set()
        g.join(TIMEOUT)
        assert g.dead
        g.get()


def addr_of(server: tcp.Server) -> Any:
    where = server.listening_on
    return where if isinstance(where, str) else ("127.0.0.1", where)


def eof_or_reset(sock: Any) -> bool:
    """True if the server ended the connection (end of file or a reset) within TIMEOUT;
    data before it is read and dropped."""
    sock.settimeout(TIMEOUT)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def ask(sock: Any, line: bytes = b"ping") -> bytes:
    """Send a line, read one line back (b"" if the server closed)."""
    sock.sendall(line + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return got
        got += chunk
    return got


def quiet_hub_errors(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Collect what reaches the hub's handle_error instead of printing it."""
    seen: list[Any] = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error",
                        lambda context, type_, value, tb: seen.append((context, value)))
    return seen


# -- 1. the limit and batches -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_tcp_server_never_exceeds_the_limit_and_serves_every_waiting_client(
        batch: int, family: str, tmp_path: Path) -> None:
    """``tcp.Server.create`` with ``max_connections=3`` and a batch of 1 or 16: with
    twelve clients connected at once, exactly three are accepted while their handlers
    are held (the rest wait in the backlog, even in the middle of a batch), and once
    the handlers go on every client is served; the counters say so exactly."""
    gate = Event()
    gauge = Gauge()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        with gauge.inside():
            line = reader.read_line()
            gate.wait()
            writer.write(b"ok " + (line or b"") + b"\n")
            writer.flush()
            reader.read_line()  # until the client closes

    where = f"unix:{tmp_path}/s.sock" if family == "unix" else "127.0.0.1:0"
    server = tcp.Server.create(where, handler, max_connections=3,
                               max_accepts_per_batch=batch, backlog=64)
    with closing_server(server):
        clients = [connect_to(addr_of(server)) for _ in range(12)]
        try:
            for i, c in enumerate(clients):
                c.sendall(b"%d\n" % i)
            wait_until(lambda: server.stats()["accepted"] == 3, what="three accepted")
            for _ in range(5):
                gevent.sleep(0.01)  # some loop iterations with nine clients waiting
            assert server.stats()["accepted"] == 3
            assert server.num_connections == 3
            gate.set()
            replies = gevent.pool.Pool(12).map(
                lambda ic: (ic[1].settimeout(TIMEOUT), _read_line(ic[1]), ic[1].close()),
                list(enumerate(clients)))
            assert [r[1] for r in replies] == [b"ok %d\n" % i for i in range(12)]
            wait_until(lambda: server.num_connections == 0, what="all released")
            stats = server.stats()
            assert stats["accepted"] == 12
            assert stats["active"] == 0
            assert stats["peak_active"] == 3
            assert gauge.peak == 3
            assert stats["dropped"] == 0
            server.invariant()
            # Not deaf afterwards.
            with connect_to(addr_of(server)) as last:
                last.sendall(b"last\n")
                assert _read_line(last) == b"ok last\n"
        finally:
            for c in clients:
                c.close()


def _read_line(sock: Any) -> bytes:
    """One line (b"" or what came if the server ended the connection first)."""
    got = b""
    while not got.endswith(b"\n"):
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("batch", [1, 16])
def test_drop_incoming_toggled_while_clients_arrive_counts_each_client_once(
        batch: int) -> None:
    """With ``drop_incoming_connections`` switched on and off while clients keep
    connecting, each client is either served or dropped (it sees end of file), and
    ``accepted + dropped`` is the number of clients: none lost, none counted twice."""

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        line = reader.read_line()
        if line is not None:
            writer.write(b"ok\n")

    server = tcp.Server.create("127.0.0.1:0", handler, max_connections=4,
                               max_accepts_per_batch=batch, backlog=64)
    outcomes: list[str] = []
    with closing_server(server):
        for round_ in range(6):
            server.set_drop_incoming_connections(round_ % 2 == 1)
            clients = [connect_to(addr_of(server)) for _ in range(5)]
            try:
                for c in clients:
                    try:
                        got = ask(c, b"x")
                    except (ConnectionResetError, BrokenPipeError):
                        got = b""
                    outcomes.append("served" if got == b"ok\n" else "dropped")
            finally:
                for c in clients:
                    c.close()
            expected = "dropped" if round_ % 2 == 1 else "served"
            assert outcomes[-5:] == [expected] * 5, (round_, outcomes[-5:])
        wait_until(lambda: server.num_connections == 0)
        stats = server.stats()
        assert stats["accepted"] == outcomes.count("served") == 15
        assert stats["dropped"] == outcomes.count("dropped") == 15
        assert stats["active"] == 0
        server.invariant()


# -- 2. StreamServer spawning -----------------------------------------------------------------


def _echo_line(sock: Any, address: Any) -> None:
    f = sock.makefile("rb")
    try:
        line = f.readline()
        if line:
            sock.sendall(b"ok " + line)
    finally:
        f.close()


@contextmanager
def started(server: StreamServer) -> Iterator[Any]:
    server.start()
    try:
        yield ("127.0.0.1", server.server_port)
    finally:
        server.stop(timeout=2)


def test_stream_server_shared_pool_filled_by_others_waits_then_serves() -> None:
    """A gevent ``Pool(2)`` shared with other code and full of its greenlets: the
    server's connections wait for room (none is handled while the pool is full), are
    never more than the pool allows, and are all served once the others finish."""
    pool = Pool(2)
    release = Event()
    others = [pool.spawn(release.wait) for _ in range(2)]
    in_handler = Gauge()
    peak_pool = [0]

    def handle(sock: Any, address: Any) -> None:
        with in_handler.inside():
            peak_pool[0] = max(peak_pool[0], len(pool))
            _echo_line(sock, address)

    server = StreamServer(("127.0.0.1", 0), handle, spawn=pool)
    with started(server) as addr:
        clients = [connect_to(addr) for _ in range(4)]
        try:
            for c in clients:
                c.sendall(b"hi\n")
            for _ in range(5):
                gevent.sleep(0.01)
            assert in_handler.running == 0 and len(pool) == 2
            release.set()
            gevent.joinall(others, timeout=TIMEOUT)
            for c in clients:
                assert _read_line(c) == b"ok hi\n"
            wait_until(lambda: server.num_connections == 0)
            assert in_handler.peak <= 2 and peak_pool[0] <= 2
            assert server.stats()["accepted"] == 4
        finally:
            for c in clients:
                c.close()


@pytest.mark.parametrize("kind", ["pool-none", "group", "pool-3"])
def test_stream_server_pool_kinds_respect_max_connections(kind: str) -> None:
    """``spawn`` = ``Pool(None)`` (unbounded), a ``Group`` or a ``Pool(3)``, with
    ``max_connections=2``: at most two handlers at once, every client served, the
    pool empty afterwards."""
    pool: Any = {"pool-none": Pool(None), "group": Group(), "pool-3": Pool(3)}[kind]
    gate = Event()
    gauge = Gauge()

    def handle(sock: Any, address: Any) -> None:
        with gauge.inside():
            gate.wait()
            _echo_line(sock, address)

    server = StreamServer(("127.0.0.1", 0), handle, spawn=pool, max_connections=2)
    with started(server) as addr:
        clients = [connect_to(addr) for _ in range(6)]
        try:
            for c in clients:
                c.sendall(b"x\n")
            wait_until(lambda: gauge.running == 2)
            for _ in range(5):
                gevent.sleep(0.01)
            assert gauge.running == 2 and server.num_connections == 2
            gate.set()
            for c in clients:
                assert _read_line(c) == b"ok x\n"
            wait_until(lambda: server.num_connections == 0 and len(pool) == 0)
            stats = server.stats()
            assert stats["accepted"] == 6 and stats["peak_active"] == 2 and gauge.peak == 2
        finally:
            for c in clients:
                c.close()


def test_stream_server_custom_spawn_that_raises_closes_the_client_and_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom ``spawn`` callable that raises for every other connection: that client
    sees end of file, the error goes to the hub, and the server keeps serving (no fd
    kept, counts back to 0, never calls ``handle`` for a rejected connection)."""
    seen = quiet_hub_errors(monkeypatch)
    calls = [0]
    handled: list[Any] = []

    def spawn(fn: Any, *args: Any) -> Any:
        calls[0] += 1
        if calls[0] % 2 == 0:
            raise RuntimeError(f"no fiber for call {calls[0]}")
        return gevent.spawn(fn, *args)

    def handle(sock: Any, address: Any) -> None:
        handled.append(address)
        _echo_line(sock, address)

    server = StreamServer(("127.0.0.1", 0), handle, spawn=spawn)
    with started(server) as addr:
        for i in range(6):
            with connect_to(addr) as c:
                c.sendall(b"q\n")
                got = _read_line(c)
                assert got == (b"ok q\n" if i % 2 == 0 else b""), (i, got)
        wait_until(lambda: server.num_connections == 0)
        assert len(handled) == 3
        assert [type(v) for _, v in seen] == [RuntimeError] * 3
        assert server.stats()["accepted"] == 6


@pytest.mark.parametrize("returns", ["none", "raw-greenlet", "object"])
def test_stream_server_custom_spawn_returning_no_greenlet(returns: str) -> None:
    """A custom ``spawn`` that starts the fiber itself but returns ``None``, a raw
    greenlet or some other object: every client is served, and ``stop`` still ends a
    connection whose handler blocks (its socket is shut down)."""
    block = Event()

    def spawn(fn: Any, *args: Any) -> Any:
        if returns == "raw-greenlet":
            return gevent.spawn_raw(fn, *args)
        gevent.spawn(fn, *args)
        return None if returns == "none" else object()

    def handle(sock: Any, address: Any) -> None:
        f = sock.makefile("rb")
        try:
            line = f.readline()
            if line == b"block\n":
                try:
                    sock.recv(10)  # until stop() shuts the socket down (or kills us)
                finally:
                    block.set()
                return
            sock.sendall(b"ok " + line)
        finally:
            f.close()

    server = StreamServer(("127.0.0.1", 0), handle, spawn=spawn)
    server.start()
    try:
        addr = ("127.0.0.1", server.server_port)
        for _ in range(3):
            with connect_to(addr) as c:
                assert ask(c, b"a") == b"ok a\n"
        blocked = connect_to(addr)
        blocked.sendall(b"block\n")
        wait_until(lambda: server.num_connections == 1)
        server.stop(timeout=0.2)
        assert eof_or_reset(blocked)
        blocked.close()
        assert block.wait(TIMEOUT)
    finally:
        server.stop(timeout=0.2)
    wait_until(lambda: server.num_connections == 0)


# -- 3. stopping while connections arrive -----------------------------------------------------


@pytest.mark.parametrize("face", ["stream-default", "stream-pool", "tcp-create", "net"])
def test_stopping_while_clients_keep_arriving_leaks_nothing(face: str) -> None:
    """Clients keep connecting (and sending a line) while the server is stopped: every
    client either gets its answer or sees its connection end (end of file, a reset, a
    refusal), none hangs; afterwards nothing is open (the leak check) and the counts
    are back to 0."""
    stop_after = 8
    served = Event()
    count = [0]

    def on_served() -> None:
        count[0] += 1
        if count[0] == stop_after:
            served.set()

    def flow_handler(flow: Flow, addr: Any) -> None:
        data = flow.read()
        if data:
            flow.write(b"ok\n")
            on_served()
            flow.read()

    def rw_handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        if reader.read_line() is not None:
            writer.write(b"ok\n")
            writer.flush()
            on_served()
            reader.read_line()

    def handle(sock: Any, address: Any) -> None:
        if sock.recv(100):
            sock.sendall(b"ok\n")
            on_served()
            sock.recv(100)

    outcomes: list[str] = []
    stop_client = Event()

    def clients(addr: Any) -> None:
        while not stop_client.is_set() and len(outcomes) < 200:
            try:
                c = connect_to(addr, timeout=TIMEOUT)
            except ConnectionRefusedError:
                outcomes.append("refused")
                continue
            try:
                got = ask(c, b"x")
                outcomes.append("served" if got == b"ok\n" else "ended")
            except (ConnectionResetError, BrokenPipeError):
                outcomes.append("ended")
            except TimeoutError:
                outcomes.append("HUNG")
            finally:
                c.close()

    if face == "net":
        with run_server(flow_handler, max_connections=4) as (addr, errors):
            g = gevent.spawn(clients, addr)
            assert served.wait(TIMEOUT)
        stop_client.set()
        g.join(TIMEOUT)
        assert not errors
    elif face == "tcp-create":
        server = tcp.Server.create("127.0.0.1:0", rw_handler, max_connections=4,
                                   max_accepts_per_batch=16)
        g = gevent.spawn(clients, addr_of(server))
        assert served.wait(TIMEOUT)
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(TIMEOUT)
        stop_client.set()
        g.join(TIMEOUT)
        assert server.num_connections == 0
        server.invariant()
    else:
        spawn = Pool(3) if face == "stream-pool" else "default"
        server = StreamServer(("127.0.0.1", 0), handle, spawn=spawn, max_connections=4)
        server.start()
        g = gevent.spawn(clients, ("127.0.0.1", server.server_port))
        assert served.wait(TIMEOUT)
        server.stop(timeout=0.2)
        stop_client.set()
        g.join(TIMEOUT)
        assert server.num_connections == 0
        stats = server.stats()
        assert stats["active"] == 0 and stats["peak_active"] <= 4
    assert g.dead
    g.get()
    assert "HUNG" not in outcomes, outcomes
    assert outcomes.count("served") >= stop_after


# -- 4. closing twice, and fds reused in between ----------------------------------------------


def _fd_reused_after_close(close: Callable[[], object], fileno: int) -> tuple[Any, Any]:
    """Close a connection, then open a socket pair while its fd number is free: the
    pair (usually) takes that number. Returns the pair."""
    close()
    a, b = socket.socketpair()
    return a, b


def _assert_reuser_survived(pairs: list[Any], reused: bool) -> None:
    """The first socket pair took the fd number a connection freed; the server's later
    closes must have left it alone (the other pairs are closed here)."""
    fd, a, b = pairs[0]
    for _, x, y in pairs[1:]:
        x.close()
        y.close()
    assert reused, "the pair did not take the freed fd number: inconclusive"
    assert _pair_still_works(a, b), f"fd {fd} reused by a socket pair was closed by the server"


def _pair_still_works(a: socket.socket, b: socket.socket) -> bool:
    try:
        a.sendall(b"alive")
        b.settimeout(TIMEOUT)
        return b.recv(10) == b"alive"
    except OSError:
        return False
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["flow.close", "flow.socket.close", "both-twice"])
def test_net_closing_a_flow_twice_never_closes_a_reused_fd(how: str) -> None:
    """A ``run_server`` handler closes its flow (or ``flow.socket``, or both, twice),
    then opens a socket pair that takes the freed fd number, and returns: the engine's
    own close of the connection (and the switch's) must not close the pair's fd."""
    outcome: AsyncResult = AsyncResult()
    pairs: list[Any] = []
    done = Event()

    def handler(flow: Flow, addr: Any) -> None:
        fd = flow.fileno()

        def close() -> None:
            if how == "flow.close":
                flow.close()
            elif how == "flow.socket.close":
                flow.socket.close()
            else:
                s = flow.socket
                s.close()
                flow.close()
                s.close()
                flow.close()

        a, b = _fd_reused_after_close(close, fd)
        pairs.append((fd, a, b))
        outcome.set(fd in (a.fileno(), b.fileno()))

    with run_server(handler) as (addr, errors):
        with connect_to(addr) as c:
            reused = outcome.get(timeout=TIMEOUT)
            assert eof_or_reset(c)
        # The next connection's fiber runs after the first one's release.
        with connect_to(addr) as c2:
            c2.settimeout(TIMEOUT)
            assert eof_or_reset(c2)
        assert not errors, errors
    _assert_reuser_survived(pairs, reused)
    done.set()


@pytest.mark.parametrize("face", ["stream", "stream-makefile", "create_sock", "create"])
def test_closing_the_connection_in_the_handler_never_closes_a_reused_fd(face: str) -> None:
    """As above for StreamServer's ``handle(sock)`` (then ``do_close`` and the engine
    close it again; also with a ``makefile`` open at the socket's close, which keeps
    the fd until the file closes: ``ServedSocket.close`` and ``_io_refs``),
    ``tcp.Server.create_sock`` and ``tcp.Server.create`` (the writer closed, then
    reader and writer closed again by the server)."""
    outcome: AsyncResult = AsyncResult()
    pairs: list[Any] = []

    def after(close: Callable[[], object], fd: int) -> None:
        a, b = _fd_reused_after_close(close, fd)
        pairs.append((fd, a, b))
        outcome.set(fd in (a.fileno(), b.fileno()))

    def handle(sock: Any, address: Any) -> None:
        if face == "stream-makefile":
            f = sock.makefile("rb")

            def close() -> None:
                sock.close()  # the file still holds the fd (as the stdlib's socket)
                f.close()  # the last reference: the fd closes now

            after(close, sock._sock.fileno())
        else:
            after(sock.close, sock.fileno())

    def handle_sock(addr: Any, sock: Any) -> None:
        after(sock.close, sock.fileno())

    def handle_rw(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        fd = writer._sock.fileno()

        def close() -> None:
            writer.close()
            reader.close()

        after(close, fd)

    if face.startswith("stream"):
        server: Any = StreamServer(("127.0.0.1", 0), handle)
        server.start()
        addr = ("127.0.0.1", server.server_port)
    elif face == "create_sock":
        server = tcp.Server.create_sock("127.0.0.1:0", handle_sock)
        addr = addr_of(server)
    else:
        server = tcp.Server.create("127.0.0.1:0", handle_rw)
        addr = addr_of(server)
    try:
        with connect_to(addr) as c:
            reused = outcome.get(timeout=TIMEOUT)
            assert eof_or_reset(c)
        wait_until(lambda: server.num_connections == 0)
        with connect_to(addr) as c2:
            assert eof_or_reset(c2)  # a second connection: the first one fully released
        wait_until(lambda: server.num_connections == 0)
    finally:
        if face.startswith("stream"):
            server.stop(timeout=1)
        else:
            server.close(close_existing_connections=True)
            assert server.close_finished.wait(TIMEOUT)
    _assert_reuser_survived(pairs, reused)


# -- 5. reclaiming idle connections at the limit ----------------------------------------------


def _idle_echo(flow: Flow, addr: Any) -> None:
    """A keep-alive line protocol on a Flow, waiting for each request inside idle()."""
    while True:
        with flow.idle():
            data = flow.read()
        if not data:
            return
        flow.write(b"ok\n")


def _idle_lines(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
    while True:
        with reader.idle():
            line = reader.read_line()
        if line is None:
            return
        writer.write(b"ok\n")


def test_net_reclaims_the_oldest_idle_flow_for_a_waiting_client() -> None:
    """``run_server(max_connections=2)`` with two idle keep-alive flows: a third client
    is admitted by closing the oldest idle one (its client sees end of file), the
    other stays usable, and a fourth client reclaims the next oldest."""
    with run_server(_idle_echo, max_connections=2) as (addr, errors):
        c1, c2 = connect_to(addr), connect_to(addr)
        try:
            assert ask(c1) == b"ok\n"
            assert ask(c2) == b"ok\n"
            with connect_to(addr) as c3:
                assert ask(c3) == b"ok\n"
                assert eof_or_reset(c1)
                assert ask(c2) == b"ok\n"  # c2 used again: now younger than c3
                with connect_to(addr) as c4:
                    assert ask(c4) == b"ok\n"
                    assert ask(c2) == b"ok\n"  # c3 was the oldest idle one, not c2
                    assert eof_or_reset(c3)
        finally:
            c1.close()
            c2.close()
        assert not errors, errors


@pytest.mark.parametrize("batch", [1, 16])
def test_tcp_reclaim_admits_a_burst_of_waiting_clients_one_for_one(batch: int) -> None:
    """``tcp.Server.create(max_connections=2)`` with two idle connections and four new
    clients at once, each asking one question then staying idle: every new client is
    served, each by reclaiming one idle connection (reclaimed == 4), never more than
    two connections at once, and the server is not deaf afterwards."""
    server = tcp.Server.create("127.0.0.1:0", _idle_lines, max_connections=2,
                               max_accepts_per_batch=batch)
    with closing_server(server):
        old = [connect_to(addr_of(server)) for _ in range(2)]
        new: list[Any] = []
        try:
            for c in old:
                assert ask(c) == b"ok\n"
            new = [connect_to(addr_of(server)) for _ in range(4)]
            answers = gevent.pool.Pool(4).map(ask, new)
            assert answers == [b"ok\n"] * 4
            for c in old:
                assert eof_or_reset(c)
            stats = server.stats()
            assert stats["reclaimed"] == 4, stats
            assert stats["peak_active"] == 2
            assert stats["accepted"] == 6
            assert server.num_connections == 2
            server.invariant()
        finally:
            for c in old + new:
                c.close()
        wait_until(lambda: server.num_connections == 0)
        with connect_to(addr_of(server)) as c:
            assert ask(c) == b"ok\n"


def test_a_new_connection_that_has_sent_nothing_is_never_reclaimed() -> None:
    """At the limit with only connections that have sent nothing yet (their first
    request may be on its way), a waiting client is not admitted by closing one of
    them: it waits until one ends by itself."""
    server = tcp.Server.create("127.0.0.1:0", _idle_lines, max_connections=2)
    with closing_server(server):
        silent = [connect_to(addr_of(server)) for _ in range(2)]
        try:
            wait_until(lambda: server.num_connections == 2)
            waiting = connect_to(addr_of(server))
            try:
                waiting.sendall(b"hello\n")
                for _ in range(5):
                    gevent.sleep(0.01)
                assert server.stats()["reclaimed"] == 0
                assert server.stats()["accepted"] == 2
                silent[0].close()
                waiting.settimeout(TIMEOUT)
                assert _read_line(waiting) == b"ok\n"
                assert ask(silent[1]) == b"ok\n"  # never closed under it
            finally:
                waiting.close()
        finally:
            for c in silent:
                c.close()


# -- 6. flow.socket closed while a Flow, Reader or Writer still uses it ----------------------


def _outcome(handler_body: Callable[[Flow], Any],
             client: Callable[[Any], object] | None = None, limit: float = 1.5,
             where: str = "127.0.0.1:0") -> Any:
    """Run ``handler_body(flow)`` in a run_server handler listening on ``where``
    (bounded by a ``limit`` s ``gevent.Timeout``: "HUNG" if it fires); return what it
    returned or raised."""
    outcome: AsyncResult = AsyncResult()

    def handler(flow: Flow, addr: Any) -> None:
        try:
            with gevent.Timeout(limit):
                outcome.set(handler_body(flow))
        except gevent.Timeout:
            outcome.set("HUNG")
        except BaseException as exc:
            outcome.set(exc)

    with run_server(handler, where=where) as (addr, errors), connect_to(addr) as c:
        if client is not None:
            client(c)
        got = outcome.get(timeout=TIMEOUT)
    assert not errors, errors
    return got


def _fill_kernel_buffer(flow: Flow) -> Writer:
    """A Writer over ``flow.socket`` with data stuck in it (the client reads nothing)."""
    w = Writer(flow.socket, buffer_age_limit=None)
    chunk = b"x" * 65536
    for _ in range(200):
        w.write(chunk)
        gevent.sleep(0)
        if w.bytes_pending > 4 * len(chunk):
            return w
    raise AssertionError("the kernel took everything: cannot stall the writer")


def test_flow_write_after_flow_socket_close_raises_at_once() -> None:
    """``flow.socket.close()`` closes the connection ("the same connection", net.md):
    a later ``flow.write`` must raise ``OSError`` at once, not send."""

    def body(flow: Flow) -> Any:
        flow.socket.close()
        try:
            flow.write(b"late\n")
        except OSError as exc:
            return exc
        return "sent after close"

    got = _outcome(body)
    assert isinstance(got, OSError), got


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("op", ["write", "read"])
def test_flow_use_after_flow_socket_close_with_a_stalled_writer_on_it(
        op: str, transport: str, tmp_path: Path) -> None:
    """``flow.socket.close()`` while a ``Writer`` over ``flow.socket`` waits for the
    kernel: that writer's io watcher on the fd makes gevent close the fd a moment later
    (after the watcher ran). The ``Conn`` under the flow is closed at once all the same
    (``_SharedSocket._drop_events_and_close``): a ``flow.write``/``flow.read`` right
    after raises ``OSError`` (``EBADF``), as without the writer, and the writer's flush
    fails. (It used to get ``EAGAIN``, wait on the fd about to close, and hang until a
    later connection reused the fd number.)"""

    def body(flow: Flow) -> Any:
        w = _fill_kernel_buffer(flow)
        flow.socket.close()
        result: list[Any] = []
        try:
            if op == "write":
                flow.write(b"y" * 100000)
            else:
                flow.read()
            result.append(f"flow.{op} returned")
        except OSError as exc:
            result.append(type(exc).__name__)
        try:
            w.flush()
            result.append("flush returned")
        except OSError as exc:
            result.append(type(exc).__name__)
        w.close()
        return result

    where = f"unix:{tmp_path}/w.sock" if transport == "unix" else "127.0.0.1:0"
    got = _outcome(body, where=where)
    assert isinstance(got, list), f"flow.{op} after flow.socket.close(): {got}"
    assert f"flow.{op} returned" not in got and "flush returned" not in got, got


@pytest.mark.parametrize("closer", ["flow.socket.close", "flow.close"])
def test_a_reader_over_flow_socket_is_woken_by_a_close_from_another_greenlet(
        closer: str) -> None:
    """A ``Reader`` over ``flow.socket`` blocked in ``read_line`` in one greenlet, the
    connection closed from another (by ``flow.socket.close()`` or ``flow.close()``):
    the read raises ``OSError`` instead of hanging."""

    def body(flow: Flow) -> Any:
        reader = tcp.Reader(flow.socket)
        parked = Event()

        def close() -> None:
            parked.wait()
            gevent.sleep(0)
            if closer == "flow.close":
                flow.close()
            else:
                flow.socket.close()

        g = gevent.spawn(close)
        try:
            parked.set()
            return reader.read_line()
        except OSError as exc:
            return exc
        finally:
            g.join(TIMEOUT)

    got = _outcome(body)
    assert isinstance(got, OSError), got


def test_flow_read_while_writer_over_flow_socket_fails_on_close() -> None:
    """A handler reading on its flow in one greenlet while a ``Writer`` over
    ``flow.socket`` is stalled; ``flow.close()`` from a third greenlet: the read raises
    ``OSError``, the writer's flush raises, nothing hangs."""

    def body(flow: Flow) -> Any:
        w = _fill_kernel_buffer(flow)
        results: dict[str, Any] = {}

        def flusher() -> None:
            try:
                w.flush()
                results["flush"] = "returned"
            except OSError as exc:
                results["flush"] = exc

        f = gevent.spawn(flusher)
        c = gevent.spawn_later(0.02, flow.close)
        try:
            flow.read()
            results["read"] = "returned"
        except OSError as exc:
            results["read"] = exc
        gevent.joinall([f, c], timeout=TIMEOUT)
        w.close()
        return results

    got = _outcome(body)
    assert isinstance(got, dict), got
    assert isinstance(got.get("read"), OSError), got
    assert isinstance(got.get("flush"), OSError), got


def test_tcp_writer_after_close_and_reader_after_writer_close() -> None:
    """``tcp.Server.create``: after ``writer.close()`` (which closes the connection)
    ``writer.write`` raises ``ValueError`` and ``reader.read_line`` raises ``OSError``;
    what was written before the close reaches the client, then end of file."""
    outcome: AsyncResult = AsyncResult()

    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        reader.read_line()
        writer.write(b"before\n" * 1000)
        writer.close()
        got: list[str] = []
        try:
            writer.write(b"after\n")
            got.append("write after close accepted")
        except ValueError:
            got.append("ValueError")
        try:
            reader.read_line()
            got.append("read after close returned")
        except OSError:
            got.append("OSError")
        outcome.set(got)

    server = tcp.Server.create("127.0.0.1:0", handler)
    with closing_server(server), connect_to(addr_of(server)) as c:
        c.sendall(b"go\n")
        data = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data == b"before\n" * 1000
        assert outcome.get(timeout=TIMEOUT) == ["ValueError", "OSError"]


# -- 7. no spinning while accepting is paused -------------------------------------------------


def _cpu_while(seconds: float) -> float:
    import time
    start = time.process_time()
    gevent.sleep(seconds)
    return time.process_time() - start


@pytest.mark.parametrize("state", ["limit", "limit-drop", "shared-pool-full"])
def test_no_busy_loop_while_a_client_waits_and_nothing_can_be_accepted(state: str) -> None:
    """A client waits in the backlog while the server cannot take it (at the limit,
    at the limit with drop-incoming on, a shared pool full of other greenlets): the
    process must sleep, not spin on the readable listener (CPU well under the wall
    time), and the client is served once room is made."""
    release = Event()
    if state == "shared-pool-full":
        pool = Pool(1)
        other = pool.spawn(release.wait)
        server: Any = StreamServer(("127.0.0.1", 0), _echo_line, spawn=pool)
        server.start()
        addr = ("127.0.0.1", server.server_port)
        holders: list[Any] = []
    else:
        def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
            line = reader.read_line()
            if line == b"hold\n"[:-1]:
                release.wait()
            writer.write(b"ok\n")

        server = tcp.Server.create("127.0.0.1:0", handler, max_connections=1,
                                   max_accepts_per_batch=16)
        addr = addr_of(server)
        holders = [connect_to(addr)]
        holders[0].sendall(b"hold\n")
        wait_until(lambda: server.num_connections == 1)
        if state == "limit-drop":
            server.set_drop_incoming_connections(True)
    try:
        waiting = connect_to(addr)
        waiting.sendall(b"w\n")
        gevent.sleep(0.05)  # the listener is readable from now on
        cpu = _cpu_while(0.4)
        assert cpu < 0.2, f"{cpu:.2f} s of CPU in 0.4 s while nothing can be accepted"
        if state == "limit-drop":
            server.set_drop_incoming_connections(False)
        release.set()
        waiting.settimeout(TIMEOUT)
        got = _read_line(waiting)
        assert got in ((b"ok w\n",) if state == "shared-pool-full" else (b"ok\n",)), got
        waiting.close()
        for h in holders:
            assert _read_line(h) == b"ok\n"
            h.close()
    finally:
        release.set()
        if state == "shared-pool-full":
            server.stop(timeout=1)
            other.join(TIMEOUT)
        else:
            server.close(close_existing_connections=True)
            assert server.close_finished.wait(TIMEOUT)


# -- 8. handlers in the hub (spawn=None): release in the middle of a batch -------------------


@pytest.mark.parametrize("batch", [1, 100])
@pytest.mark.parametrize("limit", [None, 1, 2])
def test_stream_server_spawn_none_serves_a_burst_within_batches(batch: int,
                                                                limit: int | None) -> None:
    """``spawn=None`` runs ``handle`` in the accept callback itself: each connection is
    admitted, served and released inside the batch (with a limit of 1 the watcher is
    stopped and restarted per connection). Every client of a burst gets its greeting,
    the counters are exact, nothing stays open."""
    def handle(sock: Any, address: Any) -> None:
        sock.send(b"hi\n")  # never blocks: a fresh socket's buffer is empty

    server = StreamServer(("127.0.0.1", 0), handle, spawn=None, max_connections=limit,
                          max_accepts_per_batch=batch)
    with started(server) as addr:
        clients = [connect_to(addr) for _ in range(20)]
        try:
            for c in clients:
                assert _read_line(c) == b"hi\n"
                assert eof_or_reset(c)
        finally:
            for c in clients:
                c.close()
        stats = server.stats()
        assert stats["accepted"] == 20 and stats["active"] == 0
        assert stats["peak_active"] == 1
        assert server.num_connections == 0


# -- 9. random client programs ---------------------------------------------------------------

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("burst"), st.integers(1, 5)),  # n clients connect, each asks
        st.tuples(st.just("ask"), st.integers(0, 20)),   # a kept client asks again
        st.tuples(st.just("close"), st.integers(0, 20)),
        st.tuples(st.just("reset"), st.integers(0, 20)),
        st.tuples(st.just("drop"), st.booleans()),
    ),
    min_size=1, max_size=8)


@settings(derandomize=True, max_examples=12, deadline=None,
          suppress_health_check=list(HealthCheck))
@given(program=_ACTIONS, limit=st.integers(1, 3), batch=st.sampled_from([1, 16]))
def test_random_client_programs_keep_the_counts_exact(program: list[tuple[str, Any]],
                                                      limit: int, batch: int) -> None:
    """Random programs of clients against ``tcp.Server.create`` with a limit, a batch
    of 1 or 16, reclaiming and drop-incoming toggled: every question gets its answer
    or (reclaimed or dropped) end of file, never a hang; never more than ``limit``
    connections; ``accepted + dropped`` is the number of clients; end-of-files seen on
    kept clients are at most the reclaims; the server ends with no connection and is
    not deaf."""
    server = tcp.Server.create("127.0.0.1:0", _idle_lines, max_connections=limit,
                               max_accepts_per_batch=batch)
    kept: list[Any] = []
    clients = 0
    eofs = 0
    dropping = False
    try:
        for action, arg in program:
            if action == "drop":
                dropping = arg
                server.set_drop_incoming_connections(arg)
            elif action == "burst":
                new = [connect_to(addr_of(server)) for _ in range(arg)]
                clients += arg
                with gevent.Timeout(TIMEOUT, AssertionError("a burst hung")):
                    answers = gevent.pool.Pool(arg).map(
                        lambda c: _safe_ask(c), new)
                for c, a in zip(new, answers, strict=True):
                    if dropping:
                        assert a == b"", a
                        c.close()
                    else:
                        assert a == b"ok\n", a
                        kept.append(c)
            elif kept:
                c = kept[arg % len(kept)]
                if action == "ask":
                    with gevent.Timeout(TIMEOUT, AssertionError("an ask hung")):
                        a = _safe_ask(c)
                    if a != b"ok\n":
                        assert a == b""
                        eofs += 1
                        kept.remove(c)
                        c.close()
                else:
                    kept.remove(c)
                    if action == "reset":
                        reset(c)
                    else:
                        c.close()
            server.invariant()
            stats = server.stats()
            assert stats["peak_active"] <= limit
            assert stats["active"] == server.num_connections <= limit
        for c in kept:
            c.close()
        kept.clear()
        wait_until(lambda: server.num_connections == 0)
        stats = server.stats()
        assert stats["accepted"] + stats["dropped"] == clients, (stats, clients)
        assert eofs <= stats["reclaimed"], (eofs, stats)
        server.set_drop_incoming_connections(False)
        with connect_to(addr_of(server)) as c:
            assert ask(c) == b"ok\n"
        assert server.stats()["handler_errors"] == 0
        server.invariant()
    finally:
        for c in kept:
            c.close()
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(TIMEOUT)


def _safe_ask(c: Any) -> bytes:
    try:
        return ask(c)
    except (ConnectionResetError, BrokenPipeError):
        return b""


# -- 10. other families: ::1 and unix ---------------------------------------------------------


def _connect_any(addr: Any) -> gsocket.socket:
    if isinstance(addr, tuple) and ":" in addr[0]:
        sock = gsocket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock
    return connect_to(addr)


@pytest.mark.parametrize("family", ["ipv6", "unix"])
def test_reclaim_and_limit_on_ipv6_and_unix(family: str, tmp_path: Path) -> None:
    """The limit and reclaiming on ``[::1]`` and on a unix socket (no TCP byte
    counts there: reclaim goes by the reads the Reader reports): an idle connection
    is reclaimed for a waiting client, counts are exact, nothing leaks."""
    assert family != "ipv6" or HAS_IPV6, "this host has no ::1"
    where = f"unix:{tmp_path}/r.sock" if family == "unix" else "[::1]:0"
    server = tcp.Server.create(where, _idle_lines, max_connections=1,
                               max_accepts_per_batch=16)
    with closing_server(server):
        addr = server.listening_on if family == "unix" else ("::1", server.listening_on)
        first = _connect_any(addr)
        try:
            assert ask(first) == b"ok\n"
            with _connect_any(addr) as second:
                assert ask(second) == b"ok\n"
                assert eof_or_reset(first)
            wait_until(lambda: server.num_connections == 0)
            stats = server.stats()
            assert stats["reclaimed"] == 1 and stats["accepted"] == 2
            assert stats["peak_active"] == 1
        finally:
            first.close()


@pytest.mark.parametrize("family", ["ipv6", "unix"])
def test_stream_server_with_a_pool_on_ipv6_and_unix(family: str, tmp_path: Path) -> None:
    """StreamServer with ``spawn=Pool(2)`` on ``[::1]`` and on a unix path: a burst of
    clients all served, never more than two at once."""
    assert family != "ipv6" or HAS_IPV6, "this host has no ::1"
    gauge = Gauge()

    def handle(sock: Any, address: Any) -> None:
        with gauge.inside():
            _echo_line(sock, address)

    listener: Any = f"unix:{tmp_path}/p.sock" if family == "unix" else ("::1", 0)
    server = StreamServer(listener, handle, spawn=Pool(2))
    server.start()
    try:
        addr = server.address if family == "unix" else ("::1", server.server_port)
        clients = [_connect_any(addr) for _ in range(8)]
        try:
            for c in clients:
                c.sendall(b"u\n")
            for c in clients:
                assert _read_line(c) == b"ok u\n"
        finally:
            for c in clients:
                c.close()
        wait_until(lambda: server.num_connections == 0)
        assert gauge.peak <= 2 and server.stats()["accepted"] == 8
    finally:
        server.stop(timeout=1)
