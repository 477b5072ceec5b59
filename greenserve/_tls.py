"""TLS for greenserve's sockets: wrap a gevent socket with a (stdlib) ``ssl.SSLContext``.

The handshake always runs in the greenlet that owns the connection (a server's
connection fiber, a client's caller), bounded by a timeout, never in an accept loop.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl

from . import _gevent

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "HandshakeTimeout", "check_context", "client_side",
           "context_from_files", "server_side"]

# A legitimate client finishes a TLS handshake in a few round trips; 10 s covers slow
# mobile links while freeing a slot held by a client that never completes one.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class HandshakeTimeout(TimeoutError):
    """The TLS (or PROXY) handshake did not complete within ``handshake_timeout``."""


def check_context(ssl_context: object, name: str = "ssl_context") -> ssl.SSLContext | None:
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"{name} must be an ssl.SSLContext or None, not "
                        f"{type(ssl_context).__name__}")
    return ssl_context


def context_from_files(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server context loading ``certfile`` (and ``keyfile``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def server_side(sock: gsocket.socket, ctx: ssl.SSLContext, timeout: float | None,
                on_wrapped: Callable[[gssl.SSLSocket], object] | None = None
                ) -> gssl.SSLSocket:
    """Wrap an accepted socket and complete the server handshake within ``timeout``.

    ``on_wrapped(tls)`` is called once the wrapper has taken the fd over, before the
    handshake: from then on ``sock`` is detached, and whoever may need to shut the
    connection down (the engine's abort) must use ``tls``.
    On failure the socket is closed and the error (``ssl.SSLError``, ``OSError``,
    :class:`HandshakeTimeout`) raised.
    """
    return _handshake(sock, ctx, timeout, server_side=True, server_hostname=None,
                      on_wrapped=on_wrapped)


def client_side(sock: gsocket.socket, ctx: ssl.SSLContext, server_hostname: str | None,
                timeout: float | None) -> gssl.SSLSocket:
    """Wrap a connected socket and complete the client handshake within ``timeout``."""
    return _handshake(sock, ctx, timeout, server_side=False, server_hostname=server_hostname)


def _handshake(sock: gsocket.socket, ctx: ssl.SSLContext, timeout: float | None, *,
               server_side: bool, server_hostname: str | None,
               on_wrapped: Callable[[gssl.SSLSocket], object] | None = None
               ) -> gssl.SSLSocket:
    try:
        tls = _gevent.tls_wrap(sock, ctx, server_side=server_side,
                               server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    try:
        if on_wrapped is not None:
            on_wrapped(tls)
        with gevent.Timeout(timeout, HandshakeTimeout(f"TLS handshake took over {timeout} s")):
            tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
