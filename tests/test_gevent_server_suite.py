"""gevent's own server test-suite (``gevent/tests/test__server.py``, as installed) run
against ``greenserve.server.StreamServer``, the way gevent's ``test__server_pywsgi.py``
runs it against ``WSGIServer``: the same test classes with a ``Settings`` whose
``ServerClass``/``ServerSubClass`` are ours.

Every test of gevent's six classes runs unmodified and must pass: nothing is skipped or
replaced by us. ``TestSSLGetCertificate.test_wrap_socket_and_handle_wrap_failure``
assigns ``server.wrap_socket`` and calls ``server._handle``: greenserve's StreamServer
has both as gevent's has them. The only skip is gevent's own:
``TestSSLSocketNotAllowed.test`` needs the Python 2 ``socket.ssl`` (our ``set_listener``
check for TLS sockets is tested in ``tests/test_server.py``).

Two more classes run the same tests with greenserve's own choices: ``spawn='default'``
(handlers owned by the server's Switch) and ``max_connections=2`` instead of a pool.
There, gevent's ``test_error_in_spawn`` (which replaces the spawn function gevent calls)
makes the Switch's fork fail instead, with the same expectations (the error goes to the
hub's ``handle_error``, the client sees the connection closed).

Then greenserve's checks of gevent's TLS hooks on real connections: an assigned
``wrap_socket``, an overridden ``wrap_socket_and_handle`` or ``_handle`` are used for
every connection; without them the engine does the handshake.

The leak check of ``tests/conftest.py`` applies to these tests as to ours. One warning is
ignored, for one class: gevent's TLS *client* helper used by ``TestSSLGetCertificate``
uses the deprecated ``ssl.PROTOCOL_TLS`` (our server does not).
"""

from __future__ import annotations

import ssl
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from gevent import ssl as gssl

from greenserve import net
from greenserve.server import StreamServer

# Found through the installed gevent (some distributions strip its tests: then skip).
gevent_suite: Any = pytest.importorskip("gevent.tests.test__server")


class SimpleStreamServer(StreamServer):
    # The request handler of gevent's SimpleStreamServer, unchanged.
    handle = gevent_suite.SimpleStreamServer.handle


class Settings(gevent_suite.Settings):
    ServerClass = StreamServer
    ServerSubClass = SimpleStreamServer
    restartable = True
    close_socket_detected = True


class TestDefaultSpawn(gevent_suite.TestDefaultSpawn):
    Settings = Settings


class TestRawSpawn(gevent_suite.TestRawSpawn):
    Settings = Settings


class TestPoolSpawn(gevent_suite.TestPoolSpawn):
    Settings = Settings


class TestNoneSpawn(gevent_suite.TestNoneSpawn):
    Settings = Settings


class TestSSLSocketNotAllowed(gevent_suite.TestSSLSocketNotAllowed):
    Settings = Settings


# The test's *client*, gevent.ssl.get_server_certificate(), builds its context with the
# deprecated ssl.PROTOCOL_TLS; our filterwarnings=error would fail it for that alone.
@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
class TestSSLGetCertificate(gevent_suite.TestSSLGetCertificate):
    Settings = Settings


class ForkFails:
    """``test_error_in_spawn`` for ``spawn='default'``: the Switch's fork fails."""

    server: StreamServer

    def test_error_in_spawn(self) -> None:
        test: Any = self
        test.init_server()
        error = gevent_suite.ExpectedError("test_error_in_spawn")

        def fork(*_args: Any, **_kw: Any) -> Any:
            raise error

        run = test.server._run
        run.switch._fork_owning = fork
        test.expect_one_error()
        test.assertAcceptedConnectionError()
        test.assert_error(gevent_suite.ExpectedError, error)
        test.assertEqual(run.acceptor.active, 0)  # the slot is free again


class TestSwitchSpawn(ForkFails, gevent_suite.TestDefaultSpawn):
    """gevent's tests with greenserve's default: handlers owned by the server's Switch."""

    Settings = Settings

    def get_spawn(self) -> Any:
        return "default"


class TestMaxConnections(ForkFails, gevent_suite.TestPoolSpawn):
    """gevent's pool tests with greenserve's limit instead of a pool of 2."""

    Settings = Settings

    def get_spawn(self) -> Any:
        return "default"

    def fill_default_server_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = super().fill_default_server_args(kwargs)
        kwargs.setdefault("max_connections", 2)
        return kwargs


# -- gevent's TLS hooks on real connections ---------------------------------------------------


def tls_echo(sock: Any, address: Any) -> None:
    sock.sendall(sock.recv(100))


def tls_round_trip(certs: Any, server: StreamServer) -> bytes:
    with net.with_tcp_connect("127.0.0.1", server.server_port, timeout=10,
                              ssl_context=certs.client_context(),
                              server_hostname="localhost") as flow:
        flow.write(b"hooked")
        return flow.read()


def test_an_assigned_wrap_socket_wraps_every_connection(certs: Any) -> None:
    server = StreamServer(("127.0.0.1", 0), tls_echo, ssl_context=certs.server_context())
    wrapped: list[dict[str, Any]] = []

    def wrap_socket(sock: Any, **wrap_args: Any) -> Any:
        wrapped.append(wrap_args)
        return gssl.SSLSocket(sock=sock, _context=certs.server_context(), **wrap_args)

    server.wrap_socket = wrap_socket  # type: ignore[method-assign]
    server.start()
    try:
        assert tls_round_trip(certs, server) == b"hooked"
        assert tls_round_trip(certs, server) == b"hooked"
    finally:
        server.stop()
    assert wrapped == [{"server_side": True}] * 2  # gevent's ssl_args, as gevent passes them
    assert server.stats()["handshake_errors"] == 0


def test_an_overridden_wrap_socket_and_handle_is_used(certs: Any) -> None:
    seen: list[str] = []

    class Logged(StreamServer):
        def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> object:
            seen.append("wrap")
            return super().wrap_socket_and_handle(client_socket, address)

    server = Logged(("127.0.0.1", 0), tls_echo, ssl_context=certs.server_context())
    server.start()
    try:
        assert tls_round_trip(certs, server) == b"hooked"
    finally:
        server.stop()
    assert seen == ["wrap"]


def test_a_failing_assigned_wrap_closes_the_connection_and_reports(certs: Any) -> None:
    server = StreamServer(("127.0.0.1", 0), tls_echo, ssl_context=certs.server_context())
    errors: list[BaseException] = []
    hub = gevent.get_hub()
    refused = ssl.SSLError("refused by the hook")

    def wrap_socket(sock: Any, **wrap_args: Any) -> Any:
        raise refused

    server.wrap_socket = wrap_socket  # type: ignore[method-assign]
    server.start()
    original = hub.handle_error
    hub.handle_error = lambda where, kind, value, tb: errors.append(value)  # type: ignore
    try:
        with gsocket.create_connection(("127.0.0.1", server.server_port), timeout=10) as c:
            assert c.recv(10) == b""  # closed, handle never called
    finally:
        hub.handle_error = original  # type: ignore[method-assign]
        server.stop()
    assert errors == [refused]


def test_without_hooks_the_engine_does_the_handshake(certs: Any) -> None:
    server = StreamServer(("127.0.0.1", 0), tls_echo, ssl_context=certs.server_context(),
                          handshake_timeout=0.2)
    server.start()
    try:
        assert server._run is not None and server._run.engine_tls
        assert tls_round_trip(certs, server) == b"hooked"
        with gsocket.create_connection(("127.0.0.1", server.server_port), timeout=10) as c:
            assert c.recv(10) == b""  # no client hello: closed at handshake_timeout
    finally:
        server.stop()
    assert server.stats()["handshake_errors"] == 1


def test_handle_without_tls_is_handle() -> None:
    calls: list[Any] = []
    server = StreamServer(("127.0.0.1", 0), lambda sock, address: calls.append(address))
    try:
        server._handle(None, ("127.0.0.1", 1))
        with pytest.raises(ValueError, match="no TLS configuration"):
            server.wrap_socket(None)
    finally:
        server.close()
    assert calls == [("127.0.0.1", 1)]
