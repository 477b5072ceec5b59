"""Item 7, graceful shutdown under load: 200 clients make request/response round trips
(the server takes 10 ms per request) when ``net.serve_listeners(..., stop=event,
drain_timeout=...)`` is told to stop.

- Clients that finish before the deadline lose nothing: every request gets its whole
  reply, and the server returns as soon as the last handler is done.
- Clients that would go on forever are cut at the deadline: no reply is truncated,
  every request sent well before the deadline is answered, and when
  ``serve_listeners`` returns no handler runs and no server-side socket is open.
- Nothing is accepted after ``stop``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest
from gevent.event import Event

from greenserve import Switch, Tcp, net
from greenserve.flow import Flow

from .support import (
    BACKLOG,
    Gauge,
    connect,
    connections_to,
    open_fds,
    recv_exactly,
    wait_until,
)

CLIENTS = 200
SIZE = 32           # every request and reply
DELAY = 0.01        # server time per request
ROUND_TRIPS = 5     # per client, in the finishing scenario
DRAIN_LONG = 5.0    # far more than the finishing clients need
DRAIN_SHORT = 0.5   # the endless clients are cut at this deadline
# A request sent this long before the deadline must be answered (200 clients share
# two cores: one round trip takes a few ms plus DELAY).
ANSWER_MARGIN = 0.25


def request(client: int, n: int) -> bytes:
    return (b"%d:%d:" % (client, n)).ljust(SIZE, b".")


def reply_to(data: bytes) -> bytes:
    return data.upper().replace(b".", b"!")


def make_handler(gauge: Gauge) -> Callable[[Flow, Any], None]:
    def handler(flow: Flow, addr: Any) -> None:
        with gauge.inside():
            pending = b""
            while data := flow.read():
                pending += data
                while len(pending) >= SIZE:
                    one, pending = pending[:SIZE], pending[SIZE:]
                    gevent.sleep(DELAY)
                    flow.write(reply_to(one))
    return handler


@dataclass
class Client:
    index: int
    sent: list[float] = field(default_factory=list)      # when each request went out
    answered: list[float] = field(default_factory=list)  # when each whole reply came
    ended_by_server: bool = False

    def run(self, port: int, limit: int | None, first: Event) -> None:
        with connect(port, timeout=20) as c:
            n = 0
            while limit is None or n < limit:
                req = request(self.index, n)
                try:
                    c.sendall(req)
                    self.sent.append(time.monotonic())
                    got = recv_exactly(c, SIZE)
                except ConnectionResetError:
                    got = b""
                if not got:
                    self.ended_by_server = True
                    return
                assert got == reply_to(req), f"client {self.index}: truncated/wrong {got!r}"
                self.answered.append(time.monotonic())
                n += 1
                first.set()


def serve_until_stopped(drain: float, limit: int | None) -> dict[str, Any]:
    gauge = Gauge()
    stop = Event()
    clients = [Client(i) for i in range(CLIENTS)]
    firsts = [Event() for _ in clients]
    out: dict[str, Any] = {}
    errors: list[Exception] = []
    baseline = open_fds()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=BACKLOG)
        port = lsock.address.port

        def serve() -> None:
            net.serve_listeners([lsock], make_handler(gauge), on_error=errors.append,
                                stop=stop, drain_timeout=drain)
            out["returned"] = time.monotonic()
            out["running_at_return"] = gauge.running
            out["server_sockets_at_return"] = connections_to(port)

        server = sw.fork(serve)
        greenlets = [gevent.spawn(c.run, port, limit, first)
                     for c, first in zip(clients, firsts, strict=True)]
        # Every client is connected and in the middle of its session.
        assert gevent.wait(firsts, timeout=20) and all(f.is_set() for f in firsts)
        stopped = time.monotonic()
        stop.set()
        late = connect(port)  # after stop: must not be served
        late.sendall(request(-1, 0))
        server.join(timeout=drain + 10)
        assert server.dead, "serve_listeners did not return"
        gevent.joinall(greenlets, timeout=10, raise_error=True)
        lsock.close()  # the backlog goes with it: the late client is reset, unanswered
        try:
            assert late.recv(SIZE) == b""
        except ConnectionResetError:
            pass
        late.close()
    wait_until(lambda: open_fds() == baseline, 5, "every socket closed")
    out.update(stopped=stopped, clients=clients, gauge=gauge, errors=errors)
    return out


@pytest.mark.slow
@pytest.mark.timeout(40)
def test_clients_finishing_before_the_deadline_lose_nothing(record_property: Any) -> None:
    out = serve_until_stopped(DRAIN_LONG, ROUND_TRIPS)
    clients: list[Client] = out["clients"]
    gauge: Gauge = out["gauge"]
    took = out["returned"] - out["stopped"]
    assert not out["errors"], out["errors"]
    assert all(len(c.answered) == ROUND_TRIPS and not c.ended_by_server for c in clients)
    assert took < DRAIN_LONG, f"returned {took:.3f} s after stop: it waited for the deadline"
    assert out["running_at_return"] == 0 and out["server_sockets_at_return"] == []
    assert gauge.started == gauge.finished == CLIENTS  # the late client never got in
    after_stop = sum(1 for c in clients for t in c.answered if t > out["stopped"])
    figures = {"clients": CLIENTS, "round_trips": CLIENTS * ROUND_TRIPS,
               "answered_after_stop": after_stop, "returned_after_stop_s": round(took, 3)}
    record_property("figures", figures)
    print(f"shutdown (finishing): {figures}")


@pytest.mark.slow
@pytest.mark.timeout(40)
def test_endless_clients_are_cut_at_the_deadline_and_nothing_is_left(
        record_property: Any) -> None:
    out = serve_until_stopped(DRAIN_SHORT, None)
    clients: list[Client] = out["clients"]
    gauge: Gauge = out["gauge"]
    stopped, deadline = out["stopped"], out["stopped"] + DRAIN_SHORT
    took = out["returned"] - stopped
    assert DRAIN_SHORT <= took < DRAIN_SHORT + 0.5, took
    assert out["running_at_return"] == 0 and out["server_sockets_at_return"] == []
    assert gauge.started == gauge.finished == CLIENTS  # the late client never got in
    assert not out["errors"], out["errors"]  # the cut handlers were cancelled, not failed
    assert all(c.ended_by_server for c in clients)
    unanswered_early = [(c.index, t) for c in clients for t in c.sent[len(c.answered):]
                        if t < deadline - ANSWER_MARGIN]
    assert not unanswered_early, unanswered_early[:5]
    after_stop = sum(1 for c in clients for t in c.answered if t > stopped)
    assert after_stop > CLIENTS  # the handlers went on serving while draining
    assert all(t < out["returned"] for c in clients for t in c.answered)
    figures = {"clients": CLIENTS, "answered_before_stop": sum(
        1 for c in clients for t in c.answered if t <= stopped),
        "answered_during_drain": after_stop,
        "cut_in_flight": sum(len(c.sent) - len(c.answered) for c in clients),
        "returned_after_stop_s": round(took, 3)}
    record_property("figures", figures)
    print(f"shutdown (cut at deadline): {figures}")
