"""``StreamServer``: a drop-in for ``gevent.server.StreamServer`` on greenserve's engine.

Same constructor, methods and attributes as gevent's, so that code written for
``gevent.server.StreamServer`` (and gevent's own test-suite, ``tests/test_gevent_server_suite.py``)
runs unchanged. Underneath, each ``start()`` creates one :class:`~greenserve._acceptor.Acceptor`
(THE engine: accepting, the connection limit, back-off, closing) and one detached
:class:`~greenserve.Switch`; this module only translates gevent's vocabulary onto them.

Design rules:

- State is explicit: ``socket`` is ``None`` when there is no listening socket (gevent
  deletes the attribute), one ``_Run`` per ``start()`` holds the engine and its switch.
  ``close()`` never deletes anything, so ``start()`` after ``stop()`` works.
- ``spawn`` is decided once: ``'default'`` (the engine forks each handler in the run's
  Switch), ``None`` (the handler runs in the hub, as gevent does), a ``Pool``/``Group``
  (its ``spawn``; a ``Pool``'s size is the connection limit), an ``int`` (a ``Pool`` of
  that size) or any callable. A pool's room is read only through its public API
  (``full()``, ``wait_available()``, ``add()``), never through ``pool._semaphore``.
- A handler's exception goes to the hub's ``handle_error`` (as for any failed gevent
  greenlet), so ``hub.NOT_ERROR``/``SYSTEM_ERROR`` and custom hub error handlers work.
- TLS (``ssl_context=`` or gevent's ``keyfile=``/``certfile=``...) is one
  ``ssl.SSLContext`` handed to the engine: the handshake runs in the connection's
  greenlet, bounded by ``handshake_timeout``, never in the accept loop. gevent's TLS
  hooks (``_handle``, ``wrap_socket_and_handle``, ``wrap_socket``) exist as in gevent;
  when code customises one of them, connections go through ``_handle`` instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket as _stdsocket
import ssl
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import gevent
import greenlet
from gevent import GreenletExit, getcurrent
from gevent import socket as gsocket
from gevent.baseserver import parse_address as _gevent_parse_address
from gevent.event import Event
from gevent.pool import Group, Pool

from . import _acceptor, _bind, _tls
from ._acceptor import Acceptor, ServerOptions, check_connection_options, check_limits
from .address import Fd, Tcp, Unix, as_accepted, parse_address
from .errors import add_note
from .flow import ListeningSocket, open_listener
from .switch import Switch

__all__ = ["StreamServer"]

log = logging.getLogger("greenserve")

Handle = Callable[[Any, Any], object]

# After stop(timeout) has cancelled the handlers still running, how long it waits for
# them to unwind before giving up on them (gevent's stop() gives pool.kill() 1 s too).
ABORT_GRACE = 1.0

# The keys stats() promises (docs/server.md, State), all 0 before the first start().
_STATS_KEYS = ("accepted", "active", "dropped", "handler_errors", "accept_errors", "peak_active")

# gevent's ssl_args: those configuring the context (wrap_socket's file arguments) and
# those configuring the wrap itself. Anything else is a TypeError at construction.
_CONTEXT_ARGS = frozenset({"keyfile", "certfile", "cert_reqs", "ssl_version", "ca_certs",
                           "ciphers"})
_WRAP_ARGS = frozenset({"server_side", "do_handshake_on_connect", "suppress_ragged_eofs"})


class StreamServer:
    """A TCP (or unix) server calling ``handle(socket, address)`` for each connection.

    ``listener``: an address — ``(host, port)``, gevent's ``"host:port"``/``":port"``/
    ``"port"`` (an empty host or ``"*"`` means every interface), greenserve's
    ``"unix:/path"`` and ``"fd://N"``, or a ``Tcp``/``Unix``/``Fd`` — bound by
    :meth:`start`; or an already listening socket (then ``backlog`` must be ``None``).

    ``spawn``: ``'default'`` (each handler in a greenlet owned by the server's Switch),
    a ``gevent.pool.Pool`` (its size limits the connections; it may be shared), a
    ``gevent.pool.Group``, an ``int`` (a Pool of that size), ``None`` (the handler runs
    in the hub and must not block) or any callable ``spawn(fn, *args)``.

    Beyond gevent: ``max_connections`` (never more handlers at once; no accept while
    at the limit), ``max_accepts_per_batch`` (default :attr:`max_accept`),
    ``handshake_timeout``, ``proxy_protocol``, ``idle_timeout`` (see docs/server.md),
    :attr:`num_connections` and :meth:`stats`. ``ssl_args`` are gevent's: ``ssl_context``
    or ``keyfile``/``certfile``/``ca_certs``/``cert_reqs``/``ciphers``/``ssl_version``.

    Resource handling: the server closes every connection socket when its handler
    returns or raises, and the listening socket on :meth:`close`/:meth:`stop` — also
    one that was passed in (as gevent does); a unix socket path it bound is removed.
    :meth:`stop` waits up to ``timeout`` for running handlers, then closes their
    connections and cancels them.

    Error handling: bad arguments raise ``TypeError``/``ValueError`` before any socket
    is created (a passed socket is left alone). A handler's exception is reported to
    the hub's ``handle_error`` with a note naming the peer; the server goes on. A
    process where ``gevent.monkey`` patched ``socket`` but not ``threading`` or ``ssl``
    is refused with ``RuntimeError`` (see :attr:`allow_partial_patching`).
    """

    #: The listen backlog used when ``backlog`` is not given (gevent's default).
    backlog = 128
    #: ``SO_REUSEADDR`` for sockets the server binds (``None``: leave it unset). For a
    #: unix path, a true value also removes a stale socket file left by a dead server.
    reuse_addr: int | None = 1
    #: Connections taken per readiness wake-up, unless ``max_accepts_per_batch`` is given.
    max_accept = 100
    #: The engine's back-off after running out of fds (EMFILE...): these are its values,
    #: kept for code that reads them; the engine does not take them per server.
    min_delay = _acceptor.MIN_BACKOFF
    max_delay = _acceptor.MAX_BACKOFF
    #: The default ``timeout`` of :meth:`stop` (seconds).
    stop_timeout: float = 1
    #: accept() errors that mean the listening socket is gone (the engine stops on them).
    fatal_errors = (errno.EBADF, errno.EINVAL, errno.ENOTSOCK)
    #: Set to ``True`` (on a subclass, or here) to serve in a process where
    #: ``gevent.monkey`` patched ``socket`` but not ``threading``/``ssl`` on purpose.
    allow_partial_patching = False

    handle: Handle      # the request handler: a subclass's method or the one passed
    family: int | None  # the address family (None for an "fd://N" not yet opened)
    address: Any        # as gevent has it: (host, port[, ...]), a unix path, or Fd

    def __init__(self, listener: Any, handle: Handle | None = None, backlog: int | None = None,
                 spawn: Any = "default", *, max_connections: int | None = None,
                 max_accepts_per_batch: int | None = None,
                 handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
                 proxy_protocol: bool = False, idle_timeout: float | None = None,
                 **ssl_args: Any) -> None:
        if not type(self).allow_partial_patching:
            _check_monkey_patching()
        batch = self.max_accept if max_accepts_per_batch is None else max_accepts_per_batch
        check_limits(max_connections, batch)
        self.ssl_context, self.ssl_args = _tls_from_ssl_args(ssl_args)
        check_connection_options(self.ssl_context, handshake_timeout, proxy_protocol,
                                 idle_timeout)
        if backlog is not None:
            _check_backlog(backlog)
            if _is_socket(listener):
                raise TypeError("backlog must be None when a socket instance is passed")
        self.max_connections = max_connections
        self.max_accept = batch
        self.handshake_timeout = handshake_timeout
        self.proxy_protocol = proxy_protocol
        self.idle_timeout = idle_timeout
        self.socket: gsocket.socket | None = None
        self._listening: ListeningSocket | None = None
        self._run: _Run | None = None
        self._accepting = False        # what start_accepting/stop_accepting asked for
        self._handling: set[Any] = set()    # greenlets running one of our handlers, for
        # a spawn whose greenlets the engine's table may not hold (see set_spawn)
        self._rejected: weakref.WeakSet[Any] = weakref.WeakSet()  # fibers not to call handle
        self._any_rejected = False  # whether _rejected was ever used (a WeakSet's `in`
        # is Python code: the common case skips it)
        self._stopped = Event()
        self._stopped.set()
        self.loop = gevent.get_hub().loop
        self.pool: Any = None
        self._spawn: Callable[..., Any] | None = None
        self._in_switch = True
        self.set_spawn(spawn)
        self.set_handle(handle)
        if backlog is not None:
            self.backlog = backlog
        self.set_listener(listener)  # last: it may take ownership of a passed socket

    # -- configuration (gevent's set_* methods) ---------------------------------------------

    def set_listener(self, listener: Any) -> None:
        """Use ``listener`` (an address, or a listening socket the server then owns)."""
        if self.started:
            raise RuntimeError("stop() the server before set_listener()")
        if _is_socket(listener):
            if hasattr(listener, "do_handshake"):
                raise TypeError(f"Expected a regular socket, not SSLSocket: {listener!r}")
            self._close_listener()
            self._adopt(_as_gevent_socket(listener), unlink=None)
        else:
            family, address = _parse_listener(listener)
            self._close_listener()
            self.family, self.address = family, address

    def set_spawn(self, spawn: Any) -> None:
        """Choose how handlers run (see the class docstring). Not while started."""
        if self.started:
            raise RuntimeError("stop() the server before set_spawn()")
        pool: Any = None
        in_switch = False
        fn: Callable[..., Any] | None = None
        if isinstance(spawn, str):
            if spawn != "default":
                raise ValueError(f"spawn must be 'default', not {spawn!r}")
            in_switch = True
        elif spawn is None:
            pass  # in the hub
        elif isinstance(spawn, Group) or (hasattr(spawn, "spawn") and not callable(spawn)):
            pool, fn = spawn, spawn.spawn
        elif isinstance(spawn, int) and not isinstance(spawn, bool):
            if spawn <= 0:
                raise ValueError(f"spawn: a pool size must be > 0, not {spawn}")
            pool = Pool(spawn)
            fn = pool.spawn
        elif callable(spawn):
            fn = spawn
        else:
            raise TypeError(f"spawn must be 'default', None, a Pool or Group, an int or a "
                            f"callable, not {type(spawn).__name__}")
        size = getattr(pool, "size", None)
        if size is not None and size <= 0:
            raise ValueError(f"spawn: a Pool of size {size} can never run a handler")
        self.pool, self._spawn, self._in_switch = pool, fn, in_switch
        # Whether the engine's own table may not know the greenlet a handler runs in
        # (a spawn that is not a gevent Group's returns what it likes): then the
        # handlers' greenlets are tracked here (memory per connection otherwise).
        self._track_handlers = not (in_switch or spawn is None or isinstance(pool, Group))

    def set_handle(self, handle: Handle | None) -> None:
        """Use ``handle(socket, address)`` for new connections (``None``: keep the
        ``handle`` method of a subclass). Raises ``TypeError`` if there is none."""
        if handle is not None:
            if not callable(handle):
                raise TypeError(f"handle must be callable, not {type(handle).__name__}")
            self.handle = handle
        elif not callable(getattr(self, "handle", None)):
            raise TypeError("'handle' must be provided")

    # -- the listening socket -----------------------------------------------------------------

    def init_socket(self) -> None:
        """Bind the listening socket if there is none (called by :meth:`start`)."""
        if self.socket is not None:
            return
        sock = self.get_listener(self.address, self.backlog, self.family)
        unlink = None
        if sock.family == _stdsocket.AF_UNIX and isinstance(self.address, str) \
                and not self.address.startswith("\0"):
            unlink = _bind.bound_record(self.address)
        self._adopt(sock, unlink)

    @classmethod
    def get_listener(cls, address: Any, backlog: int | None = None,
                     family: int | None = None) -> gsocket.socket:
        """Bind and listen on ``address`` (as :meth:`init_socket` does); a gevent socket."""
        if backlog is None:
            backlog = cls.backlog
        reuse = bool(cls.reuse_addr)
        if isinstance(address, Fd):
            return open_listener(address, backlog=backlog).socket
        if family == _stdsocket.AF_UNIX:
            return open_listener(Unix(address), backlog=backlog, reuse_addr=reuse).socket
        host, port = address[0], address[1]
        if not host:
            host = "::" if family == _stdsocket.AF_INET6 else "0.0.0.0"
        lsock = open_listener(Tcp(host, port), backlog=backlog, reuse_addr=reuse)
        if cls.reuse_addr is None:
            lsock.socket.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 0)
        return lsock.socket

    def _adopt(self, sock: gsocket.socket, unlink: _bind.Bound | None) -> None:
        self._listening = ListeningSocket(sock, unlink=unlink)
        self.socket = sock
        self.family = sock.family
        self.address = sock.getsockname()

    @property
    def server_host(self) -> str | None:
        """The IP address the server is bound to (``None`` for a unix socket)."""
        return self.address[0] if isinstance(self.address, tuple) else None

    @property
    def server_port(self) -> int | None:
        """The port the server is bound to (``None`` for a unix socket)."""
        return self.address[1] if isinstance(self.address, tuple) else None

    @property
    def closed(self) -> bool:
        """True while there is no listening socket (before binding, after close)."""
        return self.socket is None

    @property
    def started(self) -> bool:
        return self._run is not None and not self._run.closed

    @property
    def ssl_enabled(self) -> bool:
        return self.ssl_context is not None

    # -- running ------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind (if needed) and start accepting; returns at once. On a started server
        this only resumes accepting. Works again after :meth:`stop`/:meth:`close`."""
        if self.started:
            self.start_accepting()
            return
        self.init_socket()
        assert self.socket is not None
        try:
            self._run = _Run(self, self.socket)
            self._accepting = True
            self._run.acceptor.start_accepting()
        except BaseException:
            self.close()
            raise
        self._stopped.clear()

    def serve_forever(self, stop_timeout: float | None = None) -> None:
        """:meth:`start` if needed, then block until the server is stopped; on the way
        out (also when this greenlet is killed) :meth:`stop` with ``stop_timeout``."""
        if not self.started:
            self.start()
        try:
            self._stopped.wait()
        finally:
            gevent.spawn(self.stop, timeout=stop_timeout).join()

    def start_accepting(self) -> None:
        """Accept again after :meth:`stop_accepting` (starts the server if it is not)."""
        run = self._run
        if run is None or run.closed:
            self.start()
            return
        self._accepting = True
        run.acceptor.start_accepting()

    def stop_accepting(self) -> None:
        """Stop accepting; new clients wait in the listen backlog."""
        self._accepting = False
        run = self._run
        if run is not None and not run.closed:
            run.acceptor.stop_accepting()

    def close(self) -> None:
        """Stop accepting and close the listening socket; running handlers go on.
        Idempotent."""
        run = self._run
        if run is not None and not run.closed:
            run.closed = True
            run.acceptor.close(close_listeners=False)
        self._close_listener()
        self._stopped.set()

    def _close_listener(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        self.socket = None

    def stop(self, timeout: float | None = None) -> None:
        """Close (no new connections), then give running handlers up to ``timeout``
        seconds (default :attr:`stop_timeout`) to finish; connections still open then
        are shut down (the client sees end of file) and their handlers cancelled.

        Called from one of this server's handlers, it returns after closing and the
        rest happens in the background. If reporting a handler's error failed (a hub
        ``handle_error`` that raised), that exception is raised here.
        """
        if timeout is None:
            timeout = self.stop_timeout
        run = self._run
        self.close()
        if run is None:
            return
        me = getcurrent()
        if me in self._handling or run.acceptor.serves(me):  # called from a handler
            gevent.spawn(run.drain, timeout)
            return
        run.drain(timeout)

    def __enter__(self) -> StreamServer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- state ----------------------------------------------------------------------------------

    @property
    def num_connections(self) -> int:
        """Connections open now (including ones still finishing after a stop)."""
        return self._run.acceptor.active if self._run is not None else 0

    def stats(self) -> dict[str, int]:
        """A copy of the engine's counters for the current (or last) run:
        ``accepted``, ``active``, ``dropped``, ``handler_errors``, ``accept_errors``,
        ``peak_active``, ``handshake_errors``, ``idle_timeouts``, ``peer_gone``."""
        if self._run is None:
            return dict.fromkeys(_STATS_KEYS, 0)
        return dict(self._run.acceptor.stats)

    def full(self) -> bool:
        """True while no new connection can be accepted (limit or pool full)."""
        limit = self._limit()
        if limit is not None and self.num_connections >= limit:
            return True
        full = getattr(self.pool, "full", None)
        return bool(full()) if full is not None else False

    def is_fatal_error(self, ex: BaseException) -> bool:
        return isinstance(ex, OSError) and bool(ex.args) and ex.args[0] in self.fatal_errors

    def _limit(self) -> int | None:
        limits = [n for n in (self.max_connections, getattr(self.pool, "size", None))
                  if n is not None]
        return min(limits) if limits else None

    # -- one connection -----------------------------------------------------------------------

    def _serve_connection(self, conn: Any, peer: Tcp | Unix, entry: str = "handle") -> None:
        """The engine's handler: calls ``handle`` (the engine did the TLS handshake, or
        there is no TLS and ``_handle`` is gevent's), or with ``entry="_handle"``, when
        gevent's hooks decide, ``_handle`` (with TLS, ``wrap_socket_and_handle``, which
        calls ``wrap_socket``). Runs in the connection's greenlet (or the hub)."""
        handle: Handle = getattr(self, entry)  # looked up per connection, as gevent's
        me = getcurrent()
        if self._any_rejected and me in self._rejected:
            return  # the spawn for it failed: the engine just closes the socket
        address = as_accepted(peer)
        tracked = self._track_handlers
        if tracked:
            self._handling.add(me)
        try:
            handle(conn, address)
        except BaseException as exc:
            run = self._run
            if isinstance(exc, Exception) and run is not None \
                    and run.acceptor.peer_left(conn, peer, exc):
                return  # asked before do_close closes the socket the engine checks with
            if isinstance(exc, (Exception, GreenletExit)):
                raise  # the engine reports errors; a cancellation just ends the fiber
            # SystemExit, KeyboardInterrupt: to the hub, as from any gevent greenlet
            # (which raises them in the main greenlet), not into the server's Switch.
            add_note(exc, f"handling connection from {peer}")
            self._report_handler_error(exc, peer)
        finally:
            if tracked:
                self._handling.discard(me)
            self.do_close(conn, address)

    def do_close(self, sock: Any, *args: Any) -> None:
        """Called after each handler returns or raises; closes its socket (gevent's hook)."""
        sock.close()

    # -- gevent's TLS hooks ---------------------------------------------------------------
    #
    # gevent calls ``_handle(sock, address)`` for each connection: ``handle``, or with TLS
    # ``wrap_socket_and_handle``, which calls ``wrap_socket(sock, **ssl_args)``. Code
    # written for gevent customises TLS by assigning ``server.wrap_socket`` or overriding
    # one of these methods. As long as none is customised, the engine does the handshake
    # itself (bounded by handshake_timeout, counted in stats()["handshake_errors"]); when
    # one is (seen at start()), each connection goes through ``_handle`` as in gevent.

    def _handle(self, client_socket: Any, address: Any) -> object:
        """gevent's per-connection entry point: ``wrap_socket_and_handle`` for a TLS
        server, else ``handle``."""
        if self.ssl_context is not None:
            return self.wrap_socket_and_handle(client_socket, address)
        return self.handle(client_socket, address)

    def wrap_socket(self, client_socket: Any, **wrap_args: Any) -> Any:
        """Wrap an accepted socket in TLS with the server's context and complete the
        handshake within ``handshake_timeout``; ``wrap_args`` (gevent's ``ssl_args``) are
        accepted and already part of the context. On failure ``client_socket`` is closed
        and the error (``ssl.SSLError``, ``OSError``, ``TimeoutError``) raised. Assign
        ``server.wrap_socket`` (before :meth:`start`) to wrap your own way, as in gevent.
        """
        if self.ssl_context is None:
            raise ValueError("this server has no TLS configuration (ssl_context/certfile)")
        return _tls.server_side(client_socket, self.ssl_context, self.handshake_timeout)

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> object:
        """``wrap_socket(client_socket, **ssl_args)``, then ``handle`` with the TLS
        socket, which is closed afterwards (as gevent's). An error of the wrap is raised
        as it is, without calling ``handle``."""
        with self.wrap_socket(client_socket, **(self.ssl_args or {})) as tls:
            return self.handle(tls, address)

    def _gevent_tls_hooks(self) -> bool:
        """True when a TLS server's hooks are customised: ``wrap_socket`` assigned on the
        instance, or ``wrap_socket``/``wrap_socket_and_handle``/``_handle`` overridden."""
        if self.ssl_context is None:
            return False
        cls = type(self)
        return any(name in self.__dict__ or getattr(cls, name) is not getattr(StreamServer, name)
                   for name in ("wrap_socket", "wrap_socket_and_handle", "_handle"))

    def _report_handler_error(self, exc: BaseException, peer: Any) -> None:
        # As for any failed gevent greenlet: the hub decides (prints it, or raises a
        # SYSTEM_ERROR in the main greenlet).
        hub = gevent.get_hub()
        where = getcurrent()
        hub.handle_error(self if where is hub else where, type(exc), exc, exc.__traceback__)

    # -- spawning (everything but 'default', which the engine does in the Switch) -------------

    def _engine_spawn(self) -> Callable[..., Any] | None:
        if self._in_switch:
            return None
        return self._run_in_hub if self._spawn is None else self._spawn_connection

    @staticmethod
    def _run_in_hub(serve: Callable[..., Any], *args: Any) -> None:
        serve(*args)  # spawn=None: gevent runs the handler right in the accept callback

    def _spawn_connection(self, serve: Callable[..., Any], sock: Any, peer: Any) -> Any:
        pool, spawn = self.pool, self._spawn
        if pool is None or not _pool_full(pool):
            try:  # (the spawn first: see the engine's _accept_batch)
                fiber = spawn(serve, sock, peer)  # type: ignore[misc]  # set when we run
            except Exception as exc:
                return self._spawn_failed(exc, serve, sock, peer)
            if pool is not None and _pool_full(pool):
                self._pool_filled(pool)
            return fiber if isinstance(fiber, gevent.Greenlet) else _cancellable(fiber)
        # A shared pool filled by someone else: this connection waits for room (in the
        # pool's accounting), and accepting pauses until there is some.
        run = self._run
        assert run is not None
        run.acceptor.pause_until(pool.wait_available)
        return run.switch.fork(self._serve_when_pool_has_room, pool, serve, sock, peer)

    def _pool_filled(self, pool: Any) -> None:
        run = self._run
        assert run is not None
        if run.acceptor.active < run.limit:
            # Full, but not of ours: the engine would go on. It waits for room instead.
            run.acceptor.pause_until(pool.wait_available)

    def _spawn_failed(self, exc: Exception, serve: Callable[..., Any], sock: Any,
                      peer: Any) -> Any:
        run = self._run
        assert run is not None
        hub = gevent.get_hub()
        hub.handle_error((_gevent_address(peer), self), type(exc), exc, exc.__traceback__)
        return self._reject(run, serve, sock, peer)

    def _reject(self, run: _Run, serve: Callable[..., Any], sock: Any, peer: Any) -> Any:
        # The engine owns the socket: let it run its fiber function, which closes the
        # socket, without calling the handler.
        fiber = run.switch.fork(serve, sock, peer)
        self._any_rejected = True
        self._rejected.add(fiber)
        return fiber

    def _serve_when_pool_has_room(self, pool: Any, serve: Callable[..., Any], sock: Any,
                                  peer: Any) -> None:
        me = getcurrent()
        try:
            pool.add(me)  # blocks until the pool has room
        except BaseException:
            self._any_rejected = True
            self._rejected.add(me)
            serve(sock, peer)  # closes the socket without calling the handler
            raise
        serve(sock, peer)

    # -- repr -----------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {hex(id(self))} {self._formatinfo()}>"

    def __str__(self) -> str:
        return f"<{type(self).__name__} {self._formatinfo()}>"

    def _address_text(self) -> str:
        address = self.address
        if isinstance(address, tuple) and len(address) >= 2:
            return f"{address[0]}:{address[1]}"
        return str(address)

    def _formatinfo(self) -> str:
        parts = []
        if self.socket is not None:
            parts.append(f"fileno={self.socket.fileno()}")
        parts.append(f"address={self._address_text()}")
        handle = self.__dict__.get("handle")
        if handle is not None:
            if getattr(handle, "__self__", None) is self:
                parts.append(f"handle=<bound method {type(self).__name__}."
                             f"{handle.__name__} of self>")
            else:
                parts.append(f"handle={handle!r}")
        parts.append(f"connections={self.num_connections}")
        return " ".join(parts)


class _Run:
    """One ``start()``..``stop()``: the engine, its Switch, and how the stop went."""

    def __init__(self, server: StreamServer, sock: gsocket.socket) -> None:
        self.server = server
        name = f"StreamServer {server._address_text()}"
        self.switch = Switch._detached(name)
        limit = server._limit()
        self.limit = limit if limit is not None else 0  # 0: no limit of ours to compare
        # gevent's TLS hooks customised: the handshake happens in _handle, not the engine.
        self.engine_tls = not server._gevent_tls_hooks()
        handler = (server._serve_connection if self.engine_tls
                   else functools.partial(server._serve_connection, entry="_handle"))
        options = ServerOptions(
            max_connections=limit, max_accepts_per_batch=server.max_accept,
            ssl_context=server.ssl_context if self.engine_tls else None,
            handshake_timeout=server.handshake_timeout,
            proxy_protocol=server.proxy_protocol, idle_timeout=server.idle_timeout,
            gevent_greenlets=True, gevent_sockets=True)
        self.acceptor = Acceptor(
            [sock], handler, options, sw=self.switch,
            on_error=server._report_handler_error, spawn=server._engine_spawn(), name=name,
            # As gevent's server does: a broken listening socket closes the server, so
            # serve_forever() returns (after stop()).
            on_fatal=lambda exc: server.close())
        self.closed = False
        self._draining = False
        self._drained = Event()

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the handlers, then cancel the rest; once."""
        if self._draining:
            self._drained.wait()
            return
        self._draining = True
        try:
            self._drain(timeout)
        finally:
            self._drained.set()

    def _drain(self, timeout: float) -> None:
        # The engine's one stop sequence; handlers that ignore their cancellation for
        # ABORT_GRACE are left behind (stop() must return), their switch unfinished.
        if self.acceptor.drain(timeout, abort_grace=ABORT_GRACE):
            self.switch._close()


# -- helpers ---------------------------------------------------------------------------------


class _RawFiber:
    """What the engine cancels for a handler running in a raw greenlet (``spawn_raw``)."""

    __slots__ = ("_g",)

    def __init__(self, g: greenlet.greenlet) -> None:
        self._g = g

    @property
    def dead(self) -> bool:
        return bool(self._g.dead)

    def kill(self, exception: BaseException, block: bool = False) -> None:
        gevent.kill(self._g, exception)


class _Uncancellable:
    """For a custom ``spawn`` returning no greenlet: stop() can only shut the socket."""

    dead = True

    def kill(self, exception: BaseException, block: bool = False) -> None:
        pass  # pragma: no cover - the engine never kills a dead fiber


def _cancellable(fiber: Any) -> Any:
    if isinstance(fiber, gevent.Greenlet):  # what a Pool or Group spawns: the common case
        return fiber
    if hasattr(fiber, "kill") and hasattr(fiber, "dead"):
        return fiber
    if isinstance(fiber, greenlet.greenlet):
        return _RawFiber(fiber)
    return _Uncancellable()


def _pool_full(pool: Any) -> bool:
    if pool.__class__ is Pool:  # gevent's own: its full() in one step (two checks a
        size = pool.size        # connection, three Python calls each)
        return size is not None and len(pool.greenlets) >= size
    full = getattr(pool, "full", None)
    return bool(full()) if full is not None else False


def _is_socket(listener: object) -> bool:
    return hasattr(listener, "accept") and hasattr(listener, "fileno")


def _as_gevent_socket(sock: Any) -> gsocket.socket:
    if isinstance(sock, gsocket.socket):
        return sock
    # A stdlib socket: the server takes over its fd (the object passed is detached).
    return gsocket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())


def _check_backlog(backlog: object) -> None:
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int or None, not {type(backlog).__name__}")
    if backlog < 0:
        raise ValueError(f"backlog must be >= 0, not {backlog}")


def _parse_listener(listener: Any) -> tuple[int | None, Any]:
    """``(family, address)`` as gevent parses it, plus greenserve's address forms."""
    if isinstance(listener, str) and (listener.lower().startswith(("unix:", "fd://"))
                                      or "://" in listener):
        listener = parse_address(listener)
    if isinstance(listener, Unix):
        return _stdsocket.AF_UNIX, listener.path
    if isinstance(listener, Tcp):
        return listener.family, listener.sockaddr
    if isinstance(listener, Fd):
        return None, listener
    if not isinstance(listener, (str, tuple, int)) or isinstance(listener, bool):
        raise TypeError(f"listener must be an address or a listening socket, not "
                        f"{type(listener).__name__}")
    family, address = _gevent_parse_address(listener)
    return int(family), address


def _gevent_address(peer: Tcp | Unix) -> Any:
    """The peer as ``accept()`` gives it to gevent handlers."""
    return as_accepted(peer)


def _tls_from_ssl_args(ssl_args: dict[str, Any]
                       ) -> tuple[ssl.SSLContext | None, dict[str, Any] | None]:
    """gevent's ``**ssl_args`` as one server ``SSLContext`` (or none), and the
    ``ssl_args`` attribute gevent keeps (the wrap arguments, ``None`` without TLS)."""
    unknown = set(ssl_args) - _CONTEXT_ARGS - _WRAP_ARGS - {"ssl_context"}
    if unknown:
        raise TypeError(f"StreamServer() got unexpected keyword arguments: {sorted(unknown)}")
    args = dict(ssl_args)
    ctx = args.pop("ssl_context", None)
    if ctx is None and not args.keys() & _CONTEXT_ARGS:
        if args:
            raise ValueError(f"{sorted(args)} need ssl_context= or certfile=")
        return None, None
    if args.setdefault("server_side", True) is not True:
        raise ValueError("server_side must be True for a server")
    if args.get("suppress_ragged_eofs", True) is not True:
        raise ValueError("suppress_ragged_eofs=False is not supported: a TLS peer closing "
                         "without close_notify reads as end of file")
    if ctx is not None:
        both = sorted(args.keys() & _CONTEXT_ARGS)
        if both:
            raise TypeError(f"{both} cannot be combined with ssl_context= (configure the "
                            f"context instead)")
        return _tls.check_context(ctx), args
    return _context_from_files(args), args


def _context_from_files(args: dict[str, Any]) -> ssl.SSLContext:
    certfile = args.get("certfile")
    if certfile is None:
        raise ValueError("certfile= is needed for TLS (or pass ssl_context=)")
    version = args.get("ssl_version")
    if version is None or version in (ssl.PROTOCOL_TLS, ssl.PROTOCOL_TLS_SERVER):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    else:
        ctx = ssl.SSLContext(version)
    ctx.load_cert_chain(certfile, args.get("keyfile"))
    if args.get("ca_certs") is not None:
        ctx.load_verify_locations(args["ca_certs"])
    if args.get("cert_reqs") is not None:
        ctx.verify_mode = args["cert_reqs"]
    if args.get("ciphers") is not None:
        ctx.set_ciphers(args["ciphers"])
    return ctx


def _check_monkey_patching() -> None:
    """Refuse a half-patched process: ``socket`` patched, ``threading`` or ``ssl`` not.

    There, concurrent handlers share ``threading.local`` state (each connection is a
    greenlet of one OS thread) and block the whole process on a contended
    ``threading.Lock``, and the stdlib's TLS client fails on gevent sockets.
    """
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        return
    missing = [name for name in ("threading", "ssl") if not monkey.is_module_patched(name)]
    if missing:
        raise RuntimeError(
            f"gevent.monkey patched socket but not {' and '.join(missing)}: in such a "
            f"process concurrent handlers share threading.local state and stdlib TLS "
            f"clients fail. Call gevent.monkey.patch_all() as the first statement of the "
            f"program, before any other import; if the partial patching is deliberate, "
            f"set StreamServer.allow_partial_patching = True.")
