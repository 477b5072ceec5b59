"""``net.run_server`` / ``net.serve_listeners``: the drain deadline (``drain_timeout``),
``abort``, and the per-connection options (TLS, PROXY protocol, idle timeout), on
real loopback sockets."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import gevent
import pytest
from gevent.event import AsyncResult, Event

from greenserve import Cancelled, Switch, Tcp, net
from greenserve.flow import Flow

from .helpers import client, recv_all

# A drain deadline long enough that a test passing "before the deadline" proves the
# deadline was not what ended the wait, short enough to keep the suite fast.
LONG_DRAIN = 30.0
# A drain deadline a test waits out.
SHORT_DRAIN = 0.3
# Slack for a loaded 2-core machine on top of a deadline that must be met.
SLACK = 5.0


class Holder:
    """A handler that reads until the client closes, noting that it started and
    whether it was cancelled."""

    def __init__(self) -> None:
        self.started = Event()
        self.cancelled = Event()

    def __call__(self, flow: Flow, addr: Any) -> None:
        self.started.set()
        try:
            while flow.read():
                pass
        except Cancelled:
            self.cancelled.set()
            raise


def serve_in(sw: Switch, handler: Any, **kw: Any) -> tuple[Any, AsyncResult]:
    lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
    done = sw.fork_promise(net.run_server, lsock, handler, on_error=pytest.fail, **kw)
    return lsock, done


def test_drain_timeout_cancels_handlers_still_running_then_returns() -> None:
    holder, stop = Holder(), Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, holder, stop=stop, drain_timeout=SHORT_DRAIN)
        c = client(lsock.address.port)
        holder.started.wait()
        started = time.monotonic()
        stop.set()
        assert recv_all(c) == b""  # shut down by the server at the deadline
        done.get(timeout=SHORT_DRAIN + SLACK)
        elapsed = time.monotonic() - started
        c.close()
    assert holder.cancelled.is_set()
    assert SHORT_DRAIN * 0.9 <= elapsed < SHORT_DRAIN + SLACK


def test_without_drain_timeout_handlers_are_waited_for() -> None:
    holder, stop = Holder(), Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, holder, stop=stop)
        c = client(lsock.address.port)
        holder.started.wait()
        stop.set()
        with pytest.raises(gevent.Timeout):
            done.get(timeout=SHORT_DRAIN)  # no deadline: still waiting for the handler
        c.close()  # the client ends its connection: the handler returns
        done.get(timeout=SLACK)
    assert not holder.cancelled.is_set()


def test_handlers_that_finish_in_time_are_not_cancelled() -> None:
    holder, stop = Holder(), Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, holder, stop=stop, drain_timeout=LONG_DRAIN)
        c = client(lsock.address.port)
        holder.started.wait()
        stop.set()
        c.close()
        done.get(timeout=SLACK)  # long before the deadline
    assert not holder.cancelled.is_set()


def test_stopping_is_logged_with_the_count_and_the_deadline(
        caplog: pytest.LogCaptureFixture) -> None:
    holder, stop = Holder(), Event()
    with Switch() as sw, caplog.at_level(logging.INFO, logger="greenserve"):
        lsock, done = serve_in(sw, holder, stop=stop, drain_timeout=SHORT_DRAIN)
        c = client(lsock.address.port)
        holder.started.wait()
        stop.set()
        done.get(timeout=SHORT_DRAIN + SLACK)
        c.close()
    messages = [r.getMessage() for r in caplog.records]
    name = f"run_server {lsock.address}"
    assert f"{name}: stopping: 1 connection, up to {SHORT_DRAIN:g} s" in messages
    assert f"{name}: closing 1 connection after {SHORT_DRAIN:g} s" in messages


def test_abort_closes_connections_at_once_during_the_drain() -> None:
    holder, stop, abort = Holder(), Event(), Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        done = sw.fork_promise(net.serve_listeners, [lsock], holder, on_error=pytest.fail,
                               stop=stop, abort=abort, drain_timeout=LONG_DRAIN)
        c = client(lsock.address.port)
        holder.started.wait()
        stop.set()
        gevent.sleep(0)  # the server is draining now
        assert not done.ready()
        abort.set()
        assert recv_all(c) == b""
        done.get(timeout=SLACK)  # far before LONG_DRAIN
        c.close()
    assert holder.cancelled.is_set()


def test_abort_without_stop_ends_the_server_too() -> None:
    holder, abort = Holder(), Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        done = sw.fork_promise(net.serve_listeners, [lsock], holder, on_error=pytest.fail,
                               abort=abort)
        c = client(lsock.address.port)
        holder.started.wait()
        abort.set()
        assert recv_all(c) == b""
        assert done.get(timeout=SLACK) is None
        c.close()
    assert holder.cancelled.is_set()


def test_cancelled_during_the_drain_cancels_at_once() -> None:
    # The "second Ctrl-C" of a Python program: cancel the switch run_server runs in.
    holder, stop = Holder(), Event()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        inner_done = Event()

        def serve() -> None:
            try:
                net.run_server(lsock, holder, on_error=pytest.fail, stop=stop,
                               drain_timeout=LONG_DRAIN)
            finally:
                inner_done.set()

        with Switch() as serving:
            serving.fork(serve)
            c = client(lsock.address.port)
            holder.started.wait()
            stop.set()
            gevent.sleep(0)
            started = time.monotonic()
            serving.cancel()
        assert time.monotonic() - started < SLACK
        assert inner_done.is_set() and holder.cancelled.is_set()
        assert recv_all(c) == b""
        c.close()


def test_cancelled_before_stop_does_not_wait_for_the_drain_deadline() -> None:
    holder = Holder()
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with Switch() as serving:
            serving.fork(net.run_server, lsock, holder, on_error=pytest.fail, stop=Event(),
                         drain_timeout=LONG_DRAIN)
            c = client(lsock.address.port)
            holder.started.wait()
            started = time.monotonic()
            serving.cancel()
        assert time.monotonic() - started < SLACK
        assert holder.cancelled.is_set()
        c.close()


def tls_echo(flow: Flow, addr: Any) -> None:
    while data := flow.read():
        flow.write(data)


def test_tls(certs: Any) -> None:
    stop = Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, tls_echo, stop=stop, ssl_context=certs.server_context())
        with net.with_tcp_connect("127.0.0.1", lsock.address.port, timeout=10,
                                  ssl_context=certs.client_context(),
                                  server_hostname="localhost") as flow:
            flow.write(b"over tls")
            assert flow.read() == b"over tls"
            assert flow.socket.version() in ("TLSv1.2", "TLSv1.3")
        stop.set()
        done.get(timeout=SLACK)


def test_tls_handshake_timeout_closes_a_silent_client(certs: Any) -> None:
    called, stop = Event(), Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, lambda flow, addr: called.set(), stop=stop,
                               ssl_context=certs.server_context(), handshake_timeout=0.2)
        with client(lsock.address.port) as c:  # says nothing: no client hello
            assert recv_all(c) == b""
        stop.set()
        done.get(timeout=SLACK)
    assert not called.is_set()


def test_proxy_protocol_gives_the_handler_the_original_client() -> None:
    seen: AsyncResult = AsyncResult()

    def handler(flow: Flow, addr: Any) -> None:
        seen.set(addr)
        flow.write(flow.read())

    stop = Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, handler, stop=stop, proxy_protocol=True)
        with client(lsock.address.port) as c:
            c.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\nafter the header")
            assert c.recv(100) == b"after the header"
        assert seen.get(timeout=SLACK) == Tcp("203.0.113.9", 5555)
        stop.set()
        done.get(timeout=SLACK)


def test_idle_timeout_closes_a_quiet_connection_quietly() -> None:
    holder, stop = Holder(), Event()
    with Switch() as sw:
        lsock, done = serve_in(sw, holder, stop=stop, idle_timeout=0.2)
        with client(lsock.address.port) as c:
            assert recv_all(c) == b""  # on_error (pytest.fail) was not called
        stop.set()
        done.get(timeout=SLACK)


BAD_SECONDS: list[tuple[object, type]] = [
    (True, TypeError), ("1", TypeError), ([1], TypeError), (math.nan, ValueError),
    (math.inf, ValueError), (0, ValueError), (-1.5, ValueError),
]


@pytest.mark.parametrize("name", ["drain_timeout", "handshake_timeout", "idle_timeout"])
@pytest.mark.parametrize(("value", "error"), BAD_SECONDS)
def test_bad_durations_are_refused_naming_the_argument(name: str, value: object,
                                                       error: type) -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with pytest.raises(error, match=name):
            net.run_server(lsock, tls_echo, on_error=pytest.fail, **{name: value})
        with pytest.raises(error, match=name):
            net.serve_listeners([lsock], tls_echo, on_error=pytest.fail, **{name: value})


def test_handshake_timeout_none_is_refused() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with pytest.raises(TypeError, match="handshake_timeout"):
            net.run_server(lsock, tls_echo, on_error=pytest.fail, handshake_timeout=None)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"ssl_context": "cert.pem"}, TypeError, "ssl_context"),
        ({"proxy_protocol": 1}, TypeError, "proxy_protocol"),
        ({"abort": AsyncResult()}, TypeError, "abort"),
        ({"additional_processes": True}, TypeError, "additional_processes"),
        ({"handler": None}, TypeError, "handler"),
    ],
)
def test_other_bad_arguments(kw: dict[str, Any], error: type, match: str) -> None:
    handler = kw.pop("handler", tls_echo)
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        with pytest.raises(error, match=match):
            net.serve_listeners([lsock], handler, on_error=pytest.fail, **kw)


@pytest.mark.parametrize("listeners", [[], (), "fd://3", [object()]])
def test_serve_listeners_needs_a_list_of_listening_sockets(listeners: Any) -> None:
    with pytest.raises(TypeError, match="listeners"):
        net.serve_listeners(listeners, tls_echo, on_error=pytest.fail)
