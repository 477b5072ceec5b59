"""Item 1, overload: 20x more clients than ``max_connections`` arrive at once, three
times over. The limit is never exceeded (counted inside the handler), every client
gets its whole reply, and the server answers normally afterwards."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent.event import Event

from greenserve import Switch, Tcp, net
from greenserve.flow import Flow

from .support import BACKLOG, Gauge, Served, connect, engine, stream_server

LIMIT = 10
CLIENTS = 20 * LIMIT
ROUNDS = 3
PAYLOAD = 4096
# How long a handler holds its slot after the first read: long enough that the
# clients really pile up at the limit, short enough for 600 connections in a second.
HOLD = 0.002


def payload(i: int) -> bytes:
    return (b"%04d" % i) * (PAYLOAD // 4)  # unique per client: a mix-up shows


def echo_socket(gauge: Gauge) -> Callable[[Any, Any], None]:
    def handler(sock: Any, addr: Any) -> None:
        with gauge.inside():
            data = sock.recv(65536)
            gevent.sleep(HOLD)
            while data:
                sock.sendall(data)
                data = sock.recv(65536)
    return handler


def echo_flow(gauge: Gauge) -> Callable[[Flow, Any], None]:
    def handler(flow: Flow, addr: Any) -> None:
        with gauge.inside():
            data = flow.read()
            gevent.sleep(HOLD)
            while data:
                flow.write(data)
                data = flow.read()
    return handler


@contextmanager
def run_server(handler: Callable[[Flow, Any], None], **kw: Any) -> Iterator[Served]:
    stop = Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=BACKLOG)
        sw.fork(net.run_server, lsock, handler, on_error=pytest.fail, stop=stop, **kw)
        try:
            yield Served(lsock.address.port, dict, lambda: -1)
        finally:
            stop.set()


def start_run_server(gauge: Gauge) -> Any:
    return run_server(echo_flow(gauge), max_connections=LIMIT)


def start_stream_server(gauge: Gauge) -> Any:
    # StreamServer takes up to 100 connections per wake-up (gevent's max_accept):
    # the limit must hold inside a batch, not only between batches.
    return stream_server(echo_socket(gauge), max_connections=LIMIT)


def start_engine(gauge: Gauge) -> Any:
    return engine(echo_socket(gauge), max_connections=LIMIT, max_accepts_per_batch=64)


def one_client(port: int, i: int) -> bool:
    with connect(port) as c:
        c.sendall(payload(i))
        c.shutdown(socket.SHUT_WR)
        got = bytearray()
        while data := c.recv(65536):
            got += data
    assert bytes(got) == payload(i), f"client {i}: {len(got)} of {PAYLOAD} bytes"
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start", [start_run_server, start_stream_server, start_engine],
                         ids=["run_server", "StreamServer", "engine-batch-64"])
def test_overload_rounds_never_exceed_limit_and_serve_everyone(
        start: Callable[[Gauge], Any], record_property: Any) -> None:
    gauge = Gauge()
    durations = []
    with start(gauge) as served:
        for _ in range(ROUNDS):
            began = time.monotonic()
            clients = [gevent.spawn(one_client, served.port, i) for i in range(CLIENTS)]
            gevent.joinall(clients, timeout=30, raise_error=True)
            assert all(g.value is True for g in clients), "a client did not finish"
            durations.append(round(time.monotonic() - began, 3))
            assert gauge.running == 0  # each client saw EOF: its handler had returned
        # afterwards the server answers normally
        assert one_client(served.port, 9999)
        stats = served.stats()
    assert gauge.peak <= LIMIT, f"{gauge.peak} handlers ran at once; the limit is {LIMIT}"
    assert gauge.peak == LIMIT, "the clients never filled the server: nothing was tested"
    assert gauge.started == gauge.finished == ROUNDS * CLIENTS + 1
    if stats:  # the faces that count
        assert stats["accepted"] == ROUNDS * CLIENTS + 1
        assert stats["peak_active"] == LIMIT
        assert stats["accept_errors"] == stats["handler_errors"] == stats["dropped"] == 0
    record_property("round_seconds", durations)
    print(f"overload: {ROUNDS} rounds x {CLIENTS} clients, limit {LIMIT}: "
          f"rounds took {durations} s; peak in handler {gauge.peak}")
