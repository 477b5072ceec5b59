"""gevent's own server test-suite (``gevent/tests/test__server.py``, as installed) run
against ``greenserve.server.StreamServer``, the way gevent's ``test__server_pywsgi.py``
runs it against ``WSGIServer``: the same test classes with a ``Settings`` whose
``ServerClass``/``ServerSubClass`` are ours.

Every test runs and must pass. Three of gevent's tests reach into gevent's private
machinery; each is replaced below by the same check made through greenserve's:

- ``TestSSLGetCertificate.test_wrap_socket_and_handle_wrap_failure`` replaces the
  instance attribute ``server.wrap_socket`` and calls the private ``server._handle``:
  in gevent, ``_handle`` *is* the TLS-wrapping path. greenserve's engine does the
  handshake before the handler; its public ``wrap_socket_and_handle`` is checked
  instead: a failing wrap raises its own error (no follow-on error, gevent issue #1236)
  and the handler is not called.
- ``test_error_in_spawn`` replaces the spawn function gevent calls. With
  ``spawn='default'`` (two classes below) the engine forks the handler in the server's
  Switch: that fork is made to fail instead, with the same expectations (the error goes
  to the hub's ``handle_error``, the client sees the connection closed).

(``TestSSLSocketNotAllowed.test`` is skipped by gevent itself on Python 3: it needs the
Python 2 ``socket.ssl``. Our ``set_listener`` check for TLS sockets is tested in
``tests/test_server.py``.)

Two more classes run the same tests with greenserve's own choices: ``spawn='default'``
(handlers owned by the server's Switch) and ``max_connections=2`` instead of a pool.

The leak check of ``tests/conftest.py`` applies to these tests as to ours. One warning is
ignored, for one class: gevent's TLS *client* helper used by ``TestSSLGetCertificate``
uses the deprecated ``ssl.PROTOCOL_TLS`` (our server does not).
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from gevent import socket as gsocket

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

    def test_wrap_socket_and_handle_wrap_failure(self) -> None:
        self.init_server()
        called: list[Any] = []
        self.server.set_handle(lambda *args: called.append(args))
        ours, peer = gsocket.socketpair()
        try:
            peer.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no TLS client hello
            with self.assertRaises(ssl.SSLError):
                self.server.wrap_socket_and_handle(ours, ("127.0.0.1", 1))
        finally:
            ours.close()
            peer.close()
        self.assertEqual(called, [])


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
