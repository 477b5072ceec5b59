"""``greenserve.tcp``: Jane Street Async's ``Tcp`` (``Tcp.Server`` and the client) on gevent.

A :class:`Server` is one :class:`~greenserve._acceptor.Acceptor` (THE engine: batched
accepts on the hub, the exact connection limit, drop-incoming, back-off, closing) plus
Async's vocabulary: ``on_handler_error``, ``close`` returning one Event, ``close_finished``,
``close_finished_and_handlers_determined``, ``num_connections``, ``invariant``.

Design rules:

- The connection fibers belong to a Switch: the caller's ``sw`` (the server then lives
  like a fiber of ``sw``: leaving the ``with`` block waits until the server is closed,
  cancelling ``sw`` closes it with its connections), or a detached one of its own.
- ``create`` hands each handler a :class:`~greenserve.stream.Reader` and a
  :class:`~greenserve.stream.Writer` over the connection; when the handler ends the writer
  is closed (flushed, at most 30 s) and then the reader. A writer whose peer stopped
  reading for ``buffer_age_limit`` seconds makes the engine abort that connection (the
  socket is shut down, the handler cancelled), which frees its slot.
- The connection's own end is not a handler error: a handler that ends because its peer
  went away (a reset, a broken pipe, end of file in the middle of a message, as the
  connection's socket confirms) or with its writer's ``WriterBufferAgeExceeded`` is logged
  at debug level and does not reach ``on_handler_error`` (a peer that resets must not
  close a server running with the default ``"raise"``).
- The client connects in the caller's greenlet under one deadline (``timeout``), which
  also covers name resolution and the TLS handshake; ``interrupt`` (an Event) is a second
  way out. The socket is closed on every failure path.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket as _stdsocket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, Union

import gevent
from gevent import GreenletExit, getcurrent
from gevent import socket as gsocket
from gevent.event import Event

from . import _bind, _checks, _connect, _tls
from ._acceptor import Acceptor, ServerOptions
from .address import Fd, Tcp, Unix, parse_address
from .errors import (
    ConnectInterrupted,
    ConnectTimeout,
    WriterBufferAgeExceeded,
    add_note,
)
from .flow import ListeningSocket, open_listener
from .stream import DEFAULT_BUFFER_AGE_LIMIT, Reader, Writer
from .switch import Switch

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "Reader",
    "Server",
    "WhereToConnect",
    "WhereToListen",
    "Writer",
    "connect",
    "connect_sock",
    "with_connection",
]

log = logging.getLogger("greenserve")

T = TypeVar("T")

# Async's defaults (Tcp.Server.create): max_connections = 10_000, backlog = 64.
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_BACKLOG = 64
# Async's Tcp.connect default timeout (``Time.Span.of_sec 10.``) is for a data-centre
# network; 30 s is what browsers and curl-like clients give a connect on the internet.
DEFAULT_CONNECT_TIMEOUT = 30.0

OnHandlerError = Union[Literal["raise", "ignore"], Callable[[Any, Exception], object]]
ListenAddress = Union[Tcp, Unix, Fd]


# -- where ------------------------------------------------------------------------------------


class WhereToListen:
    """Constructors for the address a :class:`Server` listens on (Async's
    ``Where_to_listen``). Each returns an address object; anything
    :func:`~greenserve.parse_address` takes is accepted as well."""

    @staticmethod
    def of_port(port: int) -> Tcp:
        """Every IPv4 interface, ``port``."""
        return Tcp("0.0.0.0", _checked_port(port))

    @staticmethod
    def of_port_chosen_by_os() -> Tcp:
        """Every IPv4 interface, a free port chosen by the kernel (see ``listening_on``)."""
        return Tcp("0.0.0.0", 0)

    @staticmethod
    def bind_to(host: str, port: int) -> Tcp:
        """``host`` (an IP literal, e.g. ``"127.0.0.1"`` or ``"::1"``), ``port``."""
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty str, not {host!r}")
        return Tcp(host, _checked_port(port))

    @staticmethod
    def of_file(path: str) -> Unix:
        """A unix socket at ``path``."""
        return Unix(path)

    @staticmethod
    def of_fd(fd: int) -> Fd:
        """An inherited listening socket (systemd socket activation: ``fd://N``)."""
        return Fd(fd)


class WhereToConnect:
    """Constructors for the address a client connects to (Async's ``Where_to_connect``)."""

    @staticmethod
    def of_host_and_port(host: str, port: int) -> Tcp:
        """``host`` (a name, resolved with gevent's resolver, or an IP literal), ``port``."""
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty str, not {host!r}")
        return Tcp(host, _checked_port(port))

    @staticmethod
    def of_file(path: str) -> Unix:
        """A unix socket at ``path``."""
        return Unix(path)


def _checked_port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, not {port}")
    return port


# -- the server -------------------------------------------------------------------------------


class Server:
    """A TCP or unix server (Async's ``Tcp.Server``); make one with :meth:`create` or
    :meth:`create_sock`, which return once it is listening and accepting.

    Resource handling: the server owns its listening socket (also a ``socket=`` passed
    to it) and closes it on :meth:`close`; a unix path it bound is removed then. Each
    connection is closed when its handler returns or raises. With ``sw``, cancelling
    ``sw`` closes the server and its connections, and leaving ``sw``'s block waits until
    the server was closed.

    Error handling: bad arguments raise ``TypeError``/``ValueError`` naming the argument,
    before any socket is created. A handler's exception goes to ``on_handler_error``.
    """

    __slots__ = ("__weakref__", "_acceptor", "_age_limit", "_close_finished", "_closed",
                 "_error", "_handler", "_handlers_done", "_lsock", "_max", "_on_error",
                 "_own_switch", "_sw")

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("use tcp.Server.create(...) or tcp.Server.create_sock(...)")

    # -- construction -----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        where: object,
        handler: Callable[[Any, Reader, Writer], object],
        *,
        on_handler_error: OnHandlerError = "raise",
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        max_accepts_per_batch: int = 1,
        backlog: int = DEFAULT_BACKLOG,
        socket: Any = None,
        buffer_age_limit: float | None = DEFAULT_BUFFER_AGE_LIMIT,
        drop_incoming_connections: bool = False,
        sw: Switch | None = None,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
        proxy_protocol: bool = False,
        idle_timeout: float | None = None,
        reclaim_idle: bool = True,
    ) -> Server:
        """Listen on ``where`` and call ``handler(addr, reader, writer)`` for each
        connection, in its own fiber. ``addr`` is the peer's ``Tcp``/``Unix`` address (the
        PROXY header's source with ``proxy_protocol=True``).

        ``on_handler_error``: ``"raise"`` (the server closes its listening socket, leaves
        existing connections alone, and :meth:`serve_forever`/:meth:`wait` raise the
        error; ``sw``, if given, fails with it), ``"ignore"``, or ``f(addr, exc)`` (if
        ``f`` raises, as ``"raise"`` with ``f``'s exception). ``max_connections``: never
        more handlers at once (no accept while at the limit; ``None``: no limit).
        ``max_accepts_per_batch``:
        connections taken per readiness wake-up. ``backlog``: the kernel's listen queue.
        ``socket``: a socket to listen with, used as is (no ``setsockopt``; bound to
        ``where`` unless already bound; the server owns it once ``create`` returned).
        ``buffer_age_limit``: see :class:`~greenserve.stream.Writer` (``None``: no limit).
        ``drop_incoming_connections``: see :meth:`set_drop_incoming_connections`.
        ``ssl_context``: TLS, the handshake bounded by ``handshake_timeout`` (seconds);
        ``proxy_protocol``: read a PROXY v1/v2 header first (also bounded by
        ``handshake_timeout``; the handler's ``addr`` is its source); ``idle_timeout``:
        a read or write waiting longer ends the connection quietly. All of these run in
        the connection's fiber, never in the accept loop (see docs/tcp.md).
        ``reclaim_idle``: at ``max_connections``, with a client waiting, the connection
        idle the longest among those whose handler waits inside
        :meth:`Reader.idle <greenserve.stream.Reader.idle>` is closed to admit it;
        ``False``: never.
        """
        age_limit = _checks.seconds("buffer_age_limit", buffer_age_limit, optional=True)
        options = _server_options(max_connections, max_accepts_per_batch,
                                  drop_incoming_connections, ssl_context, handshake_timeout,
                                  proxy_protocol, idle_timeout, reclaim_idle)
        setup = _Setup("create", handler, on_handler_error, age_limit, sw, options)
        return cls._create(where, setup, backlog, socket)

    @classmethod
    def create_sock(
        cls,
        where: object,
        handler: Callable[[Any, Any], object],
        *,
        on_handler_error: OnHandlerError = "raise",
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        max_accepts_per_batch: int = 1,
        backlog: int = DEFAULT_BACKLOG,
        socket: Any = None,
        drop_incoming_connections: bool = False,
        sw: Switch | None = None,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
        proxy_protocol: bool = False,
        idle_timeout: float | None = None,
    ) -> Server:
        """As :meth:`create`, but ``handler(addr, sock)`` gets the connected gevent
        socket (an ``SSLSocket`` with ``ssl_context``); the server closes it when the
        handler ends."""
        options = _server_options(max_connections, max_accepts_per_batch,
                                  drop_incoming_connections, ssl_context, handshake_timeout,
                                  proxy_protocol, idle_timeout)
        # The handler gets the socket itself: a gevent socket, as documented.
        options = dataclasses.replace(options, gevent_sockets=True)
        setup = _Setup("create_sock", handler, on_handler_error, None, sw, options)
        return cls._create(where, setup, backlog, socket)

    @classmethod
    def _create(cls, where: object, setup: _Setup, backlog: int, socket: Any) -> Server:
        setup.check()
        _check_backlog(backlog)
        addr = parse_address(where, default_host="127.0.0.1")
        if not isinstance(addr, (Tcp, Unix, Fd)):
            raise ValueError(f"where: cannot listen on {addr}: a tcp, unix or fd address "
                             f"is needed")
        if socket is not None:
            socket = _supplied_socket(socket)
        lsock = _listen(addr, backlog, socket)
        self = object.__new__(cls)
        try:
            self._setup(lsock, setup)
        except BaseException:
            lsock.close()
            raise
        return self

    def _setup(self, lsock: ListeningSocket, setup: _Setup) -> None:
        self._lsock = lsock
        self._handler = setup.handler
        self._on_error = setup.on_handler_error
        self._age_limit = setup.age_limit
        self._max = setup.options.max_connections
        self._error: BaseException | None = None
        self._closed = False
        self._close_finished = Event()
        self._handlers_done = Event()
        sw = setup.sw
        self._own_switch = sw is None
        self._sw = Switch._detached(f"tcp.Server {lsock.address}") if sw is None else sw
        serve = self._serve_streams if setup.kind == "create" else self._serve_sock
        self._acceptor = Acceptor(
            [lsock.socket], serve, setup.options, sw=self._sw, on_error=self._handler_failed,
            name=f"tcp.Server {lsock.address}", on_fatal=self._listener_failed)
        try:
            if sw is not None:
                sw.fork(self._keep)
            self._acceptor.start_accepting()
        except BaseException:
            self._acceptor.close(close_listeners=False)
            raise

    # -- one connection (runs in its fiber) -------------------------------------------

    def _serve_sock(self, sock: Any, peer: Any) -> None:
        try:
            self._handler(peer, sock)
        except Exception:
            raise  # the engine reports it to _handler_failed
        except GreenletExit:
            raise  # cancelled: not a failure
        except BaseException as exc:
            self._escaped(exc, peer)
            raise

    def _serve_streams(self, sock: Any, peer: Any) -> None:
        writer = Writer(sock, self._age_limit, on_failure=_WriterFailed(self, sock, peer))
        reader = Reader(sock, reclaimer=self._acceptor)
        try:
            self._handler(peer, reader, writer)
        except Exception as exc:
            # Asked before the streams close the socket: the engine checks with the
            # socket whether the peer went away (then: one DEBUG line, no handler error).
            # (A writer whose peer stopped reading had the engine abort the connection:
            # the engine knows that one too.)
            if not self._acceptor.peer_left(sock, peer, exc):
                raise
        except GreenletExit:
            raise
        except BaseException as exc:
            self._escaped(exc, peer)
            raise
        finally:
            try:
                writer.close()
            finally:
                reader.close()

    def _escaped(self, exc: BaseException, peer: Any) -> None:
        # A BaseException (an uncaught gevent.Timeout, SystemExit...) is no handler error
        # on_handler_error may ignore: it fails the server whatever the mode. Its switch
        # (the caller's, or the server's own) then cancels the other connections.
        add_note(exc, f"escaped the handler of a connection from {peer}")
        self._fail(exc)

    def _writer_failed(self, sock: Any, peer: Any, exc: BaseException) -> None:
        # Runs in the hub. A peer that stopped reading holds a slot until the engine
        # ends the connection; a reset peer is noticed by the handler's next read/write.
        if isinstance(exc, WriterBufferAgeExceeded):
            log.info("%s: %s stopped reading: %s; connection closed",
                     self._acceptor.name, peer, exc)
            self._acceptor.abort_connection(sock)

    def _handler_failed(self, exc: Exception, peer: Any) -> None:
        mode = self._on_error
        if mode == "ignore":
            log.debug("%s: handler failed (ignored)", self._acceptor.name, exc_info=exc)
            return
        if callable(mode):
            try:
                mode(peer, exc)
                return
            except Exception as raised:
                add_note(raised, f"raised by on_handler_error for a connection from {peer}")
                exc = raised
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        name = self._acceptor.name
        if self._error is None:
            self._error = exc
            log.error("%s: handler failed; server closed", name, exc_info=exc)
            self.close()
        else:
            log.error("%s: handler failed after the server closed", name, exc_info=exc)
        if not self._own_switch:
            self._sw.fail(exc)

    def _listener_failed(self, exc: OSError) -> None:
        # The listening socket broke (the engine logged it): the server is over, and
        # wait()/serve_forever() raise why, whatever on_handler_error says.
        if self._error is None:
            self._error = exc
        self.close()
        if not self._own_switch:
            self._sw.fail(exc)

    def _keep(self) -> None:
        # The server's place in the caller's switch: the switch waits for it like for a
        # fiber, and cancelling the switch closes the server with its connections.
        try:
            self._close_finished.wait()
        except BaseException:
            self.close(close_existing_connections=True)
            raise

    # -- closing ----------------------------------------------------------------------

    def close(self, close_existing_connections: bool = False) -> Event:
        """Stop accepting and close the listening socket; return :attr:`close_finished`.

        Idempotent: every call returns the same Event. It is set once the listening
        socket is closed and, with ``close_existing_connections=True``, every connection
        socket too (clients see end of file; handlers are cancelled). A later call with
        ``close_existing_connections=True`` still closes the connections (the Event is
        not set again). The handler is never called after ``close()``.
        """
        if not isinstance(close_existing_connections, bool):
            raise TypeError(f"close_existing_connections must be a bool, not "
                            f"{type(close_existing_connections).__name__}")
        if not self._closed:
            self._closed = True
            self._acceptor.close(close_listeners=False)
            self._lsock.close()
            self._acceptor.idle.rawlink(self._on_idle)
            if not close_existing_connections:
                self._close_finished.set()
        if close_existing_connections:
            self._acceptor.abort_connections()
        return self._close_finished

    def _on_idle(self, idle: Event) -> None:
        # After close() no connection comes in: once idle, the acceptor stays idle.
        idle.unlink(self._on_idle)
        self._close_finished.set()
        self._handlers_done.set()

    @property
    def close_finished(self) -> Event:
        """The Event :meth:`close` returns, without starting a close."""
        return self._close_finished

    @property
    def close_finished_and_handlers_determined(self) -> Event:
        """Set once the server is closed and every handler has returned."""
        return self._handlers_done

    @property
    def is_closed(self) -> bool:
        """True once :meth:`close` was called (or the server failed)."""
        return self._closed

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server is closed and its handlers have returned.

        With ``on_handler_error="raise"``, the handler's error is raised as soon as the
        listening socket is closed (connections still running are left alone). So is
        the ``OSError`` of a listening socket that broke (``accept`` failing with
        ``EBADF``, ``EINVAL`` or ``ENOTSOCK``), which closes the server in every mode.
        Returns ``False`` if ``timeout`` seconds passed first. If the wait is interrupted (a
        ``KeyboardInterrupt``, a cancellation), the server is closed with its
        connections and the exception propagates.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if not self._close_finished.wait(timeout):
                return False
        except BaseException:
            self.close(close_existing_connections=True)
            raise
        if self._error is not None:
            raise self._error  # outside the try: the live connections are left alone
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            if not self._handlers_done.wait(left):
                return False
        except BaseException:
            self.close(close_existing_connections=True)
            raise
        if self._own_switch and not self._sw.finished:
            self._sw._close()  # raises what escaped a handler (SystemExit...)
        return True

    def serve_forever(self) -> None:
        """Serve until the server is closed (from another greenlet, a signal handler, a
        failing handler); see :meth:`wait`."""
        self.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
        if ev is None:
            self.wait()
            return
        try:
            self.wait()
        except BaseException as exc:
            if exc is not ev and exc is not self._error:
                raise

    # -- state ------------------------------------------------------------------------

    @property
    def num_connections(self) -> int:
        """Connections whose handler is running (or whose socket is still open)."""
        return self._acceptor.active

    @property
    def listening_on(self) -> int | str | bytes:
        """The port (TCP) or path (unix: ``bytes`` only for a name text cannot hold) the
        server listens on."""
        addr = self._lsock.address
        return addr.port if isinstance(addr, Tcp) else addr.path

    @property
    def listening_on_address(self) -> Tcp | Unix:
        """The address the listening socket is bound to (port 0 resolved)."""
        return self._lsock.address

    @property
    def listening_socket(self) -> gsocket.socket:
        """The listening gevent socket. Accepting on it directly bypasses
        ``max_connections`` and ``on_handler_error``; use with care."""
        return self._lsock.socket

    def set_drop_incoming_connections(self, flag: bool) -> None:
        """While ``flag`` is true, accept each new connection and close it at once (a
        "pause" clients see as an immediate end of file rather than a hang in the
        backlog). Dropped connections are never counted in ``num_connections``."""
        if not isinstance(flag, bool):
            raise TypeError(f"flag must be a bool, not {type(flag).__name__}")
        self._acceptor.drop_incoming = flag

    def stats(self) -> dict[str, int]:
        """Counters: ``accepted``, ``active``, ``dropped``, ``handler_errors``,
        ``accept_errors``, ``peak_active``, ``handshake_errors``, ``idle_timeouts``,
        ``peer_gone``."""
        return dict(self._acceptor.stats)

    def invariant(self) -> None:
        """Check the server's internal consistency; raise ``AssertionError`` if broken."""
        acceptor = self._acceptor
        checks = [
            (0 <= acceptor.active <= (acceptor.active if self._max is None else self._max),
             "0 <= num_connections <= max_connections"),
            (acceptor.active == acceptor.open_connections(), "num_connections counts open sockets"),
            (not self._closed or acceptor.closed, "a closed server's acceptor is closed"),
            (not self._closed or self._lsock.closed, "a closed server's socket is closed"),
            (not self._close_finished.is_set() or self._closed, "close_finished => closed"),
            (not self._handlers_done.is_set() or (self._closed and not acceptor.active),
             "handlers determined => closed and no connection"),
            (self._error is None or self._closed, "a failed server is closed"),
        ]
        for ok, what in checks:
            if not ok:
                raise AssertionError(f"{self!r}: invariant broken: {what}")

    def __repr__(self) -> str:
        if self._error is not None:
            state = f"failed ({type(self._error).__name__})"
        elif self._closed:
            state = "closed"
        elif self._acceptor.drop_incoming:
            state = "dropping incoming"
        else:
            state = "listening"
        return (f"<tcp.Server {self._lsock.address} {state} "
                f"connections={self._acceptor.active}/{self._max or 'unlimited'}>")


class _WriterFailed:
    """A connection's ``Writer.on_failure``: ``server._writer_failed(sock, peer, exc)``
    (a partial costs four objects per connection, this one)."""

    __slots__ = ("_peer", "_server", "_sock")

    def __init__(self, server: Server, sock: Any, peer: Any) -> None:
        self._server = server
        self._sock = sock
        self._peer = peer

    def __call__(self, exc: BaseException) -> None:
        self._server._writer_failed(self._sock, self._peer, exc)


def _server_options(max_connections: object, max_accepts_per_batch: object, drop: object,
                    ssl_context: object, handshake_timeout: object, proxy_protocol: object,
                    idle_timeout: object, reclaim_idle: object = False) -> ServerOptions:
    """The engine's options from create's arguments, checked (naming each)."""
    _checks.flag("drop_incoming_connections", drop)
    return ServerOptions(
        max_connections=max_connections,  # type: ignore[arg-type]
        max_accepts_per_batch=max_accepts_per_batch,  # type: ignore[arg-type]
        drop_incoming=drop,  # type: ignore[arg-type]
        ssl_context=ssl_context,  # type: ignore[arg-type]
        handshake_timeout=handshake_timeout,  # type: ignore[arg-type]
        proxy_protocol=proxy_protocol,  # type: ignore[arg-type]
        idle_timeout=idle_timeout,  # type: ignore[arg-type]
        reclaim_idle=reclaim_idle)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Setup:
    """What ``create``/``create_sock`` hand to the server, besides where to listen."""

    kind: str  # "create": handler(addr, reader, writer); "create_sock": handler(addr, sock)
    handler: Callable[..., object]
    on_handler_error: object
    age_limit: float | None
    sw: Switch | None
    options: ServerOptions

    def check(self) -> None:
        if not callable(self.handler):
            raise TypeError(f"handler must be callable, not {type(self.handler).__name__}")
        _check_on_handler_error(self.on_handler_error)
        if self.sw is not None and not isinstance(self.sw, Switch):
            raise TypeError(f"sw must be a Switch or None, not {type(self.sw).__name__}")
        if self.sw is not None:
            self.sw.check()  # a finished or cancelled switch takes no server


def _check_on_handler_error(value: object) -> None:
    if value in ("raise", "ignore") or callable(value):
        return
    raise ValueError(f"on_handler_error must be 'raise', 'ignore' or a callable "
                     f"f(addr, exc), not {value!r}")


def _check_backlog(backlog: object) -> None:
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int, not {type(backlog).__name__}")
    if backlog < 0:
        raise ValueError(f"backlog must be >= 0, not {backlog}")


def _supplied_socket(sock: object) -> gsocket.socket:
    if isinstance(sock, gsocket.socket):
        if sock.fileno() < 0:
            raise ValueError("socket is closed")
        if sock.type != _stdsocket.SOCK_STREAM:
            raise ValueError("socket must be a stream socket (SOCK_STREAM)")
        return sock
    raise TypeError(f"socket must be a gevent socket (gevent.socket.socket) or None, not "
                    f"{type(sock).__name__}")


def _listen(addr: ListenAddress, backlog: int, sock: gsocket.socket | None) -> ListeningSocket:
    if sock is None:
        return open_listener(addr, backlog=backlog, reuse_addr=True)
    if isinstance(addr, Fd):
        raise ValueError("where: an fd:// address and socket= both name a socket: pass one")
    if sock.family != addr.family:
        raise ValueError(f"socket's family ({sock.family!r}) does not match where ({addr})")
    unlink = None
    if not _is_bound(sock):
        try:
            unlink = _bind.bind(sock, addr, reuse_addr=False, reuse_port=False)
        except OSError as exc:
            add_note(exc, f"binding the supplied socket to {addr}")
            raise
    sock.listen(backlog)
    return ListeningSocket(sock, unlink=unlink)


def _is_bound(sock: gsocket.socket) -> bool:
    name = sock.getsockname()
    if sock.family == _stdsocket.AF_UNIX:
        return bool(name)
    return bool(name[1])


# -- the client -------------------------------------------------------------------------------


def connect_sock(where: object, *, timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
                 interrupt: Event | None = None, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> Any:
    """Connect to ``where`` and return the connected gevent socket (an ``SSLSocket``
    with ``ssl_context``). ``where``: ``WhereToConnect.of_host_and_port(host, port)``,
    ``.of_file(path)``, or anything :func:`~greenserve.parse_address` takes; a host name
    is resolved with gevent's resolver and its addresses tried in order.

    ``timeout`` (seconds, ``None`` = none) bounds everything: resolution, the attempts
    and the TLS handshake. ``server_hostname`` defaults to the host connected to.

    Resource handling: the caller owns the returned socket. Error handling:
    ``ConnectTimeout``, ``ConnectInterrupted`` (``interrupt`` was set first),
    ``Refused``, ``AddressLookupFailed``, ``NoMatchingAddresses``, ``ssl.SSLError``;
    each with a note naming the address. The socket is closed on every failure.
    """
    target = _connect_target(where)
    timeout = _checks.seconds("timeout", timeout, optional=True)
    if interrupt is not None and not isinstance(interrupt, Event):
        raise TypeError(f"interrupt must be a gevent.event.Event or None, not "
                        f"{type(interrupt).__name__}")
    _tls.check_context(ssl_context)
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError(f"server_hostname must be a str or None, not "
                        f"{type(server_hostname).__name__}")
    with _bounded(target, timeout, interrupt):
        sock, _ = _connect.connect(target, None)  # bounded by _bounded's timeout
        if ssl_context is None:
            return sock
        hostname = server_hostname
        if hostname is None and isinstance(target, Tcp):
            hostname = target.host
        try:
            return _tls.client_side(sock, ssl_context, hostname, None)
        except ssl.SSLError as exc:
            add_note(exc, f"connecting to {target} (TLS handshake)")
            raise


def connect(where: object, *, timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
            interrupt: Event | None = None,
            buffer_age_limit: float | None = DEFAULT_BUFFER_AGE_LIMIT,
            ssl_context: ssl.SSLContext | None = None,
            server_hostname: str | None = None) -> tuple[Any, Reader, Writer]:
    """:func:`connect_sock`, then a ``Reader`` and a ``Writer`` over the socket.

    Resource handling: the caller closes them: ``writer.close()`` (flushes), then
    ``reader.close()`` (which closes the socket); or use :func:`with_connection`.
    """
    age_limit = _checks.seconds("buffer_age_limit", buffer_age_limit, optional=True)
    sock = connect_sock(where, timeout=timeout, interrupt=interrupt, ssl_context=ssl_context,
                        server_hostname=server_hostname)
    return sock, Reader(sock), Writer(sock, age_limit)


def with_connection(where: object, fn: Callable[[Any, Reader, Writer], T], *,
                    timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
                    interrupt: Event | None = None,
                    buffer_age_limit: float | None = DEFAULT_BUFFER_AGE_LIMIT,
                    ssl_context: ssl.SSLContext | None = None,
                    server_hostname: str | None = None) -> T:
    """Connect (as :func:`connect`), return ``fn(sock, reader, writer)``'s value; the
    writer (flushed), reader and socket are closed after, also when ``fn`` raises."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    sock, reader, writer = connect(where, timeout=timeout, interrupt=interrupt,
                                   buffer_age_limit=buffer_age_limit,
                                   ssl_context=ssl_context, server_hostname=server_hostname)
    try:
        return fn(sock, reader, writer)
    finally:
        try:
            writer.close()
        finally:
            reader.close()
            sock.close()


def _connect_target(where: object) -> Tcp | Unix:
    target = parse_address(where)
    if not isinstance(target, (Tcp, Unix)):
        raise ValueError(f"where: cannot connect to {target}: a tcp or unix address is needed")
    return target


class _Interrupted(BaseException):
    """Thrown into the connecting greenlet when ``interrupt`` is set (private)."""


@contextmanager
def _bounded(target: Tcp | Unix, timeout: float | None,
             interrupt: Event | None) -> Iterator[None]:
    """Run the block under the deadline and the interrupt; turn them into
    ``ConnectTimeout``/``ConnectInterrupted`` noting ``target``."""
    note = f"connecting to {target}"
    if interrupt is not None and interrupt.is_set():
        exc: OSError = ConnectInterrupted(f"interrupted before connecting to {target}")
        add_note(exc, note)
        raise exc
    deadline = gevent.Timeout(timeout)
    token = _Interrupted()
    me = getcurrent()
    armed = True

    def fire(_event: Event) -> None:
        if armed:
            me.throw(token)

    if interrupt is not None:
        interrupt.rawlink(fire)
    deadline.start()
    try:
        yield
    except _Interrupted as exc:
        if exc is not token:
            raise
        new: OSError = ConnectInterrupted(f"interrupted while connecting to {target}")
        add_note(new, note)
        raise new from None
    except gevent.Timeout as exc:
        if exc is not deadline:
            raise
        new = ConnectTimeout(errno.ETIMEDOUT, f"no connection within timeout={timeout} s")
        add_note(new, note)
        raise new from None
    finally:
        armed = False
        deadline.close()
        if interrupt is not None:
            interrupt.unlink(fire)
