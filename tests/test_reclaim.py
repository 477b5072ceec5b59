"""Idle keep-alive connections never starve new clients: at ``max_connections``, with a
client waiting in the backlog, the engine closes the connection idle the longest (one
whose handler waits inside ``idle()`` for the next message) and admits the client — one
for one, never above the limit, never a connection whose next message has begun.

Every scenario is a line protocol: a request is one line; the handler takes its time
(``WORK``), answers, and waits for the next line inside ``idle()``. Clients send one
request each and keep their connection, as HTTP keep-alive clients do."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent.event import Event

from greenserve import Switch, Tcp, net, tcp

from .stress.support import Gauge

pytestmark = pytest.mark.timeout(60)

LIMIT = 3
CLIENTS = 15
WORK = 0.05  # each request's handler time: 15 requests, 3 at a time, take >= 0.25 s
TIMEOUT = 10.0


def flow_handler(gauge: Gauge) -> Callable[[Any, Any], None]:
    def handler(flow: Any, addr: Any) -> None:
        with gauge.inside():
            buf = b""
            while True:
                with flow.idle():
                    data = flow.read()
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    gevent.sleep(WORK)
                    flow.write(b"ok " + line + b"\n")
    return handler


def reader_handler(gauge: Gauge) -> Callable[[Any, Any, Any], None]:
    def handler(addr: Any, reader: tcp.Reader, writer: tcp.Writer) -> None:
        with gauge.inside():
            while True:
                with reader.idle():
                    line = reader.read_line()
                if line is None:
                    return
                gevent.sleep(WORK)
                writer.write(b"ok " + line + b"\n")
    return handler


def keep_alive_client(port: int, i: int, answered: list[int], ended: list[int]) -> None:
    """One request, then keep the connection until the server ends it (or the test)."""
    sock = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        sock.sendall(b"req%d\n" % i)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(100)
            assert chunk, f"client {i}: end of file before its answer"
            reply += chunk
        assert reply == b"ok req%d\n" % i
        answered.append(i)
        assert sock.recv(100) == b""  # reclaimed: a clean end of file, no reset
        ended.append(i)
    finally:
        sock.close()


def run_clients(port: int) -> tuple[list[int], list[int]]:
    answered: list[int] = []
    ended: list[int] = []
    clients = [gevent.spawn(keep_alive_client, port, i, answered, ended)
               for i in range(CLIENTS)]
    with gevent.Timeout(TIMEOUT, AssertionError(f"answered only {answered}")):
        while len(answered) < CLIENTS:
            gevent.sleep(0.01)
    # Every client was answered; all but the last LIMIT were reclaimed to make room.
    with gevent.Timeout(TIMEOUT, AssertionError(f"ended only {ended}")):
        while len(ended) < CLIENTS - LIMIT:
            gevent.sleep(0.01)
    gevent.killall(clients)
    return answered, ended


def test_run_server_reclaims_idle_connections_for_waiting_clients() -> None:
    gauge = Gauge()
    stop = Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        sw.fork(net.run_server, lsock, flow_handler(gauge), on_error=print,
                max_connections=LIMIT, stop=stop, drain_timeout=1)
        answered, ended = run_clients(lsock.address.port)
        stop.set()
    assert sorted(answered) == list(range(CLIENTS))
    assert len(ended) >= CLIENTS - LIMIT
    assert gauge.peak == LIMIT  # never above the limit, not even while reclaiming


def test_tcp_server_reclaims_idle_connections_for_waiting_clients() -> None:
    gauge = Gauge()
    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0),
                               reader_handler(gauge), max_connections=LIMIT)
    try:
        answered, _ = run_clients(server.listening_on)  # type: ignore[arg-type]
        stats = server.stats()
    finally:
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(5)
    assert sorted(answered) == list(range(CLIENTS))
    assert gauge.peak == stats["peak_active"] == LIMIT
    assert stats["reclaimed"] >= CLIENTS - LIMIT
    assert stats["handler_errors"] == 0


def test_reclaim_idle_false_keeps_idle_connections() -> None:
    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0),
                               reader_handler(Gauge()), max_connections=1,
                               reclaim_idle=False)
    try:
        port = server.listening_on
        first = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        first.sendall(b"a\n")
        assert first.recv(100) == b"ok a\n"
        waiting = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        waiting.sendall(b"b\n")  # in the backlog
        # A round trip on the idle connection after the new client arrived: had the
        # engine reclaimed it, this would see end of file.
        first.sendall(b"a2\n")
        assert first.recv(100) == b"ok a2\n"
        assert server.stats()["accepted"] == 1
        first.close()  # the idle one leaves by itself: now the other is served
        assert waiting.recv(100) == b"ok b\n"
        assert server.stats()["reclaimed"] == 0
        waiting.close()
    finally:
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(5)


def test_a_connection_in_the_middle_of_a_request_is_never_reclaimed() -> None:
    gauge = Gauge()
    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0),
                               reader_handler(gauge), max_connections=2)
    try:
        port = server.listening_on
        # `half` sends half a line: its handler reads it inside idle() and waits for the
        # rest; `idle` is answered and waits for its next line.
        half = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        half.sendall(b"first")
        idle = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        idle.sendall(b"x\n")
        assert idle.recv(100) == b"ok x\n"
        with gevent.Timeout(TIMEOUT):
            while server.stats()["accepted"] < 2:
                gevent.sleep(0.001)
        # A third client: the engine must take the idle one, never the half request.
        third = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        third.sendall(b"y\n")
        assert idle.recv(100) == b""  # reclaimed
        assert third.recv(100) == b"ok y\n"
        # A fourth waits: the only other connection is mid-request.
        fourth = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        fourth.sendall(b"z\n")
        half.sendall(b" half\n")  # the request completes and is answered
        assert half.recv(100) == b"ok first half\n"
        # Now `half` and `third` are idle: the fourth is admitted by reclaiming one.
        assert fourth.recv(100) == b"ok z\n"
        assert server.stats()["reclaimed"] == 2 and gauge.peak == 2
        for s in (half, idle, third, fourth):
            s.close()
    finally:
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(5)


@pytest.mark.no_leak_check
@pytest.mark.timeout(60)
def test_gunicorn_worker_answers_every_keep_alive_client(tmp_path: Any) -> None:
    # The scenario through a real arbiter: --worker-connections 3, keep-alive
    # 60 s, 15 clients that each send one request and keep the connection; the handler
    # takes 1 s. Without reclaiming, 12 of them wait until keep-alive expires.
    from .test_gunicorn import gunicorn

    with gunicorn("wsgi_app:app", "--worker-connections", "3", "--keep-alive", "60") as g:
        port = g.ports[0]
        answered: list[float] = []
        start = gevent.get_hub().loop.now()

        def client(i: int) -> None:
            sock = gsocket.create_connection(("127.0.0.1", port), timeout=30)
            try:
                sock.sendall(b"GET /sleep?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
                head = sock.recv(65536)
                assert head.startswith(b"HTTP/1.1 200"), head
                gevent.get_hub().loop.update_now()
                answered.append(gevent.get_hub().loop.now() - start)
                # Keep the connection: the worker reclaims it for a waiting client, and
                # this client sees a clean end of file.
                while sock.recv(65536):
                    pass
            finally:
                sock.close()

        clients = [gevent.spawn(client, i) for i in range(CLIENTS)]
        with gevent.Timeout(20, AssertionError(f"answered only {len(answered)}")):
            while len(answered) < CLIENTS:
                gevent.sleep(0.05)
        gevent.killall(clients)
    print(f"gunicorn: {CLIENTS} keep-alive clients answered in {max(answered):.2f} s",
          file=sys.stderr)
    assert max(answered) < 8.0  # 15 requests of 1 s, 3 at a time: about 5 s


def test_a_new_connection_is_not_idle_before_its_first_request() -> None:
    # A client that connected but has not sent its first request yet is not a kept-alive
    # connection: its request may be on its way, and reclaiming it would lose it.
    server = tcp.Server.create(tcp.WhereToListen.bind_to("127.0.0.1", 0),
                               reader_handler(Gauge()), max_connections=1)
    try:
        port = server.listening_on
        new = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with gevent.Timeout(TIMEOUT):
            while server.stats()["accepted"] < 1:
                gevent.sleep(0.001)
        waiting = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        waiting.sendall(b"b\n")  # in the backlog
        new.sendall(b"a\n")      # the first request arrives late: it is served
        assert new.recv(100) == b"ok a\n"
        # Now `new` is kept alive and idle: the waiting client reclaims its slot.
        assert new.recv(100) == b""
        assert waiting.recv(100) == b"ok b\n"
        assert server.stats()["reclaimed"] == 1
        new.close()
        waiting.close()
    finally:
        server.close(close_existing_connections=True)
        assert server.close_finished.wait(5)


def http_response(sock: Any) -> bytes:
    """One whole HTTP response (head and Content-Length body), however it arrives."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"end of file inside a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "end of file inside a response body"
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.mark.no_leak_check
@pytest.mark.parametrize("worker", ["Worker", "keep_worker.KeepWorker"])
def test_gunicorn_worker_reclaims_unless_its_subclass_says_not(worker: str) -> None:
    from .test_gunicorn import gunicorn

    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with gunicorn("wsgi_app:app", "--worker-connections", "1", "--keep-alive", "60",
                  worker=worker) as g:
        port = g.ports[0]
        first = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        second = gsocket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        try:
            first.sendall(request)
            assert http_response(first).startswith(b"HTTP/1.1 200")  # now idle, kept alive
            second.sendall(request)  # waits in the backlog
            if worker == "Worker":
                assert first.recv(65536) == b""  # reclaimed for the waiting client
            else:
                # A round trip after the second client arrived: still served.
                first.sendall(request)
                assert http_response(first).startswith(b"HTTP/1.1 200")
                first.close()
            assert http_response(second).startswith(b"HTTP/1.1 200")
        finally:
            first.close()
            second.close()
