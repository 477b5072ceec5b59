"""THE engine: accept connections on the hub and run each in a fiber of a Switch.

Every server face (``net.run_server``, ``tcp.Server``, ``StreamServer``, the gunicorn
workers, the CLI) is an :class:`Acceptor` plus a little translation. Nothing else in
greenserve accepts, limits or closes connections.

Design rules:

- No acceptor greenlet: an io watcher per listening socket calls :meth:`_accept_batch`
  in the hub, which takes up to ``max_accepts_per_batch`` connections per wake-up with
  non-blocking ``accept`` on the raw socket.
- The limit is exact: while ``max_connections`` handlers run, the watchers are stopped
  and the kernel backlog holds new clients; a finishing handler starts them again.
- A connection is counted from the moment it is accepted until its fiber has closed
  its socket. Dropped connections (``drop_incoming``) are closed at once, never counted.
- Running out of fds (EMFILE/ENFILE) or memory (ENOBUFS/ENOMEM) stops the watchers
  for a back-off (10 ms doubling to 0.5 s); a finishing connection resumes at once.
  These errors are logged at most once per ``LOG_INTERVAL``, with a count.
- After :meth:`close` has started, no handler is called: a fiber that has not started
  yet closes its socket instead.
- Per-connection preparation (a PROXY protocol header, then a TLS handshake, both
  bounded by ``handshake_timeout``) runs in the connection's fiber, never in the hub;
  a connection that fails it is closed (logged, rate limited) without calling the
  handler. ``idle_timeout`` is the socket timeout: a read or write that waits longer
  ends the connection quietly.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
import socket as _stdsocket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import Greenlet, getcurrent
from gevent import socket as gsocket
from gevent.event import Event

from . import _checks, _gevent, _tls
from ._proxy import ProxyProtocolError, read_proxy_header
from .address import Tcp, Unix, from_sockaddr
from .errors import Cancelled, NetError, add_note
from .switch import Switch

__all__ = ["Acceptor", "ServerOptions", "check_connection_options", "check_limits"]

_GONE = object()

log = logging.getLogger("greenserve")

Handler = Callable[[gsocket.socket, Any], None]
OnError = Callable[[Exception, Any], object]
Spawn = Callable[..., Any]
Wait = Callable[[list[Event], "float | None"], object]
Reclaim = Callable[[], object]

# accept() errors that concern only the connection being accepted (it died in the
# backlog, or the network under it failed): try the next one.
_RETRY = frozenset({errno.EINTR, errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN,
                    errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                    errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM})
# accept() errors that mean "out of resources for now": back off and retry.
_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that mean the listening socket itself is gone: stop serving.
_FATAL = frozenset({errno.EBADF, errno.EINVAL, errno.ENOTSOCK})

# What a handler sees when its peer goes away: a reset, a broken pipe, end of file in the
# middle of a message (IncompleteRead is an EOFError), TLS's versions of these.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, EOFError,
              ssl.SSLEOFError, ssl.SSLZeroReturnError)
_DATA_ENDED = (EOFError, ssl.SSLEOFError, ssl.SSLZeroReturnError)

# Back-off after a resource error: short enough that a freed fd is used quickly
# (a finishing connection also resumes at once), doubling to a cap that keeps a
# persistently exhausted process from spinning. The cap is half a second: fds freed by
# something other than our connections (another part of the process, a log rotation)
# are only noticed by this timer, and a server must accept again within 1 s of that
# (two wake-ups per second of an exhausted process cost nothing measurable).
MIN_BACKOFF = 0.01
MAX_BACKOFF = 0.5
# A reclaimed connection frees its slot as soon as its handler sees its end of file; one
# whose handler does not end within this many seconds no longer holds up the next
# reclaim (the slot it keeps is the handler's fault, not the waiting clients').
RECLAIM_GRACE = 1.0
# At most one log line per kind of accept error per this many seconds.
LOG_INTERVAL = 5.0


class _RateLimitedLog:
    """Logs the first event of a kind, then a count at most once per interval."""

    __slots__ = ("_last", "_suppressed")

    def __init__(self) -> None:
        self._last: dict[int | None, float] = {}
        self._suppressed: dict[int | None, int] = {}

    def __call__(self, level: int, code: int | None, msg: str, *args: Any,
                 exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        last = self._last.get(code)
        if last is not None and now - last < LOG_INTERVAL:
            self._suppressed[code] = self._suppressed.get(code, 0) + 1
            return
        self._last[code] = now
        more = self._suppressed.pop(code, 0)
        if more:
            msg += f" ({more} more since the last report)"
        log.log(level, msg, *args, exc_info=exc_info)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What a face asks of the engine, checked once when made (before any socket is
    created: a bad value raises ``TypeError``/``ValueError`` naming it)."""

    max_connections: int | None = None
    max_accepts_per_batch: int = 1
    drop_incoming: bool = False
    ssl_context: ssl.SSLContext | None = None
    handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT
    proxy_protocol: bool = False
    idle_timeout: float | None = None
    reclaim_idle: bool = True
    # Connection fibers as gevent.Greenlets rather than raw greenlets (switch.RawFiber):
    # for gevent's StreamServer face, whose handlers and hub expect gevent's.
    gevent_greenlets: bool = False
    # Handlers get gevent sockets rather than lean connections (_gevent.Conn): for
    # faces that hand the socket itself to code expecting gevent's (StreamServer,
    # gunicorn, tcp's create_sock). TLS connections are gevent's (SSLSocket) anyway.
    gevent_sockets: bool = False

    def __post_init__(self) -> None:
        _checks.count("max_connections", self.max_connections, optional=True)
        _checks.count("max_accepts_per_batch", self.max_accepts_per_batch)
        _checks.flag("drop_incoming", self.drop_incoming)
        _tls.check_context(self.ssl_context)
        _checks.seconds("handshake_timeout", self.handshake_timeout)
        _checks.flag("proxy_protocol", self.proxy_protocol)
        _checks.seconds("idle_timeout", self.idle_timeout, optional=True)
        _checks.flag("reclaim_idle", self.reclaim_idle)
        _checks.flag("gevent_greenlets", self.gevent_greenlets)
        _checks.flag("gevent_sockets", self.gevent_sockets)


class Acceptor:
    """Accept on ``listeners`` and run ``handler(sock, peer)`` for each connection.

    ``handler`` runs in a fiber of ``sw`` (or whatever ``spawn(fn, *args)`` makes) and
    gets a gevent socket and the peer's address object. When it returns or raises, the
    socket is closed and the connection's slot freed. An ``Exception`` from the handler
    gets a note ``handling connection from <peer>`` and goes to ``on_error(exc, peer)``
    (default: logged); if ``on_error`` raises, the fiber fails ``sw``. If the fiber cannot
    be made (``spawn`` or the fork raises), the connection is closed and the error, noted
    ``starting the handler for a connection from <peer>``, goes to ``on_error`` the same way.

    When ``accept`` fails in a way that means the listening socket itself is broken
    (``EBADF``, ``EINVAL``: shut down or not listening, ``ENOTSOCK``), the acceptor logs
    it, closes itself and calls ``on_fatal(exc)`` (in the hub: it must not block), so
    that the face can end its server instead of waiting for connections that never come.

    Resource handling: the acceptor closes every connection socket it accepted. It
    closes the listening sockets on :meth:`close` only with ``close_listeners=True``.
    """

    def __init__(self, listeners: Sequence[gsocket.socket], handler: Handler,
                 options: ServerOptions, *, sw: Switch, on_error: OnError | None = None,
                 spawn: Spawn | None = None, name: str = "server",
                 on_fatal: Callable[[OSError], object] | None = None) -> None:
        self.options = options
        self.ssl_context = options.ssl_context
        self.handshake_timeout = options.handshake_timeout
        self.proxy_protocol = options.proxy_protocol
        self.idle_timeout = options.idle_timeout
        self._prepared = bool(options.ssl_context or options.proxy_protocol
                              or options.idle_timeout)
        self._wrapped: dict[gsocket.socket, Any] = {}  # accepted socket -> its TLS socket
        self._listeners = list(listeners)
        self._handler = handler
        self._sw = sw
        limit = options.max_connections
        self._limit = limit if limit is not None else float("inf")
        self.max_accepts_per_batch = options.max_accepts_per_batch
        self._drop_incoming = options.drop_incoming
        self._on_error = on_error if on_error is not None else self._log_handler_error
        self._on_fatal = on_fatal
        # Connection fibers are forked from the hub: they get a copy of the context of
        # the code that made the server (as a fiber forked by it would), not the hub's.
        self._context = contextvars.copy_context()
        # Bound once: each fork keeps its functions for the connection's lifetime.
        self._serve_fn = self._serve
        self._unserved_fn = self._unserved
        self._spawn = spawn
        self._lean = not options.gevent_greenlets
        self._lean_conns = not options.gevent_sockets and options.ssl_context is None
        self.name = name
        self._init_watchers()
        self._init_counters()
        # The engine lives no longer than its owner: its watchers must not outlive it.
        sw.on_release(functools.partial(self.close, close_listeners=False))

    def _init_watchers(self) -> None:
        loop = gevent.get_hub().loop
        self._watchers = [loop.io(ls.fileno(), 1) for ls in self._listeners]
        # What the watcher callback gets per listener: the socket, its family (read once:
        # gevent's `family` property makes an enum on every access), and whether each
        # accepted socket needs TCP_NODELAY set. Not when the listener has it
        # (greenserve's own listeners do): Linux copies it to every accepted socket.
        self._accept_args = [(ls, ls.family, _needs_nodelay(ls)) for ls in self._listeners]
        self._timer = loop.timer(0)
        self._backoff = 0.0
        self._accepting = False  # wanted by the face (start/stop_accepting)
        self._watching = False   # watchers really started
        self._paused = False     # pause_until() waits for room elsewhere
        self._closed = False

    def _init_counters(self) -> None:
        self._conns: dict[gsocket.socket, Greenlet | None] = {}
        # Connections abort_connections() shut down: whatever their handler raises from
        # then on is the abort's doing (see _serve), not the handler's failure.
        self._aborted: set[gsocket.socket] = set()
        # Connections waiting for their peer's next message, oldest first: accepted
        # socket -> (how to end it, bytes received by then). See reclaimable().
        self._reclaimable: dict[gsocket.socket, tuple[Reclaim | None, Any]] = {}
        self._reclaiming: gsocket.socket | None = None  # reclaimed, not yet released
        self._reclaim_timer: Any = None  # bounds how long _reclaiming waits
        self._owner_of: dict[Any, gsocket.socket] = {}  # TLS wrapper -> accepted socket
        self.active = 0
        self.stats = {"accepted": 0, "active": 0, "dropped": 0, "handler_errors": 0,
                      "accept_errors": 0, "peak_active": 0, "handshake_errors": 0,
                      "idle_timeouts": 0, "peer_gone": 0, "reclaimed": 0}
        self.idle = Event()  # set while no connection is active
        self.idle.set()
        self._log = _RateLimitedLog()

    # -- control -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_connections(self) -> int | None:
        return None if self._limit == float("inf") else int(self._limit)

    @property
    def drop_incoming(self) -> bool:
        """While True, each accepted connection is closed at once (and counted in
        ``stats["dropped"]``); at the limit nothing is accepted, nor reclaimed for."""
        return self._drop_incoming

    @drop_incoming.setter
    def drop_incoming(self, flag: bool) -> None:
        self._drop_incoming = flag
        self._update()

    @property
    def watching(self) -> bool:
        """True while the engine's watchers run (accepting, below the limit, not backing
        off)."""
        return self._watching

    @property
    def backoff(self) -> float:
        """The current accept-error back-off in seconds (0: none)."""
        return self._backoff

    @property
    def sets_nodelay(self) -> list[bool]:
        """Per listener: whether each accepted connection gets ``TCP_NODELAY`` set (a
        TCP listener without it; greenserve's own listeners have it, and Linux copies it
        to accepted sockets)."""
        return [nodelay for _, _, nodelay in self._accept_args]

    def accept_batch_now(self, index: int = 0) -> None:
        """Run one accept batch on listener ``index`` now, as its watcher's callback
        would when readable (whether or not the watchers run: for tests that need a batch
        at a chosen moment)."""
        watching = self._watching
        self._watching = True
        try:
            self._accept_batch(*self._accept_args[index])
        finally:
            self._watching = watching and self._watching

    def open_connections(self) -> int:
        """How many connection sockets the engine holds open (``active`` counts the
        same ones: a consistency check for the faces' ``invariant``)."""
        return len(self._conns)

    def start_accepting(self) -> None:
        """Start (or resume) watching the listening sockets."""
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        self._accepting = True
        self._update()

    def pause_until(self, ready: Callable[[], object]) -> None:
        """Accept nothing until ``ready()`` returns: a limit the engine does not count
        itself (a gevent ``Pool`` shared with other code: ``pool.wait_available``).
        ``ready`` blocks in a daemon fiber of the engine's switch; then accepting resumes
        (unless stopped or closed meanwhile). A pause already waiting is not doubled."""
        if self._paused or self._closed:
            return
        self._paused = True
        self._update()
        self._sw.fork_daemon(self._resume_when, ready)

    def _resume_when(self, ready: Callable[[], object]) -> None:
        try:
            ready()
        finally:
            self._paused = False
            self._update()

    def stop_accepting(self) -> None:
        """Stop accepting; connections in the backlog wait there."""
        self._accepting = False
        self._update()

    def close(self, *, close_listeners: bool = True, close_connections: bool = False) -> None:
        """Stop accepting for good. Idempotent in effect.

        ``close_listeners``: close the listening sockets too. ``close_connections``: shut
        down every connection socket (its client sees end of file) and cancel its
        handler; the socket is closed as the handler unwinds.
        """
        if not self._closed:
            self._closed = True
            self._accepting = False
            self._update()
            self._timer.close()
            if self._reclaim_timer is not None:
                self._reclaim_timer.close()
            for w in self._watchers:
                w.close()
        if close_listeners:
            for ls in self._listeners:
                ls.close()
        if close_connections:
            self.abort_connections()

    def drain(self, grace: float | None, *, abort: Event | None = None,
              abort_grace: float | None = None, wait: Wait | None = None,
              logger: Any = log, on_abort: Callable[[int], object] | None = None) -> bool:
        """The one way a server stops: :meth:`close` (no handler is called from now on;
        the listeners stay open), wait up to ``grace`` seconds for the connections to
        end (``None``: as long as they take; ``abort`` set: stop waiting), then
        :meth:`abort_connections` and wait up to ``abort_grace`` seconds (``None``: as
        long as it takes) for their handlers to unwind.

        ``wait(events, timeout)`` waits for any of ``events`` (default: ``gevent.wait``;
        a gunicorn worker heartbeats while it waits). Logs ``stopping: N connections,
        up to S s`` when connections are open, and what it closes, to ``logger`` (the
        ``greenserve`` logger, or a face's own, e.g. gunicorn's); ``on_abort(n)`` is
        called before ``n`` connections are aborted. Returns True once no
        connection is left, False if handlers ignored their cancellation for
        ``abort_grace`` seconds (the caller then gives up on them).
        """
        wait = _wait_any if wait is None else wait
        self.close(close_listeners=False)
        gevent.sleep(0)  # fibers forked just before close() start now and release
        if self.idle.is_set():
            return True
        limit = "waiting for them" if grace is None else f"up to {grace:g} s"
        logger.info("%s: stopping: %s, %s", self.name, _plural(self.active), limit)
        if abort is None or not abort.is_set():
            wait([self.idle] if abort is None else [self.idle, abort], grace)
        if self.idle.is_set():
            return True
        why = "now" if abort is not None and abort.is_set() else f"after {grace:g} s"
        logger.info("%s: closing %s %s", self.name, _plural(self.active), why)
        if on_abort is not None:
            on_abort(self.active)
        self.abort_connections()
        wait([self.idle], abort_grace)
        if self.idle.is_set():
            return True
        logger.warning("%s: %s ignored cancellation for %s s; not waiting for them",
                    self.name, _plural(self.active), abort_grace)
        return False

    def serves(self, fiber: Any) -> bool:
        """True if ``fiber`` is the fiber of one of this engine's connections."""
        return fiber in self._conns.values()

    def abort_connections(self) -> None:
        """Shut down every open connection and cancel its handler.

        The cancellation reaches a handler at its next blocking point, from a hub
        callback; a handler that runs before that (its timer fired in the same loop
        iteration) may fail on the shut-down socket (``EPIPE``). Such an exception is
        not counted as a handler error nor passed to ``on_error``: the server ended
        that connection, not the handler.
        """
        for sock, g in list(self._conns.items()):
            self._aborted.add(sock)
            _gevent.kernel_shutdown(self._wrapped.get(sock, sock))
            if g is not None:
                self._cancel(g)

    def abort_connection(self, sock: gsocket.socket) -> None:
        """Shut down one connection and cancel its handler (as :meth:`abort_connections`
        does for all). A face calls it when a connection must end for a reason of its
        own (a ``Writer`` whose peer stopped reading); a released socket is ignored."""
        sock = self._owner_of.get(sock, sock)  # the TLS wrapper a handler was given
        if sock not in self._conns:
            return
        self._aborted.add(sock)
        _gevent.kernel_shutdown(self._wrapped.get(sock, sock))
        g = self._conns[sock]
        if g is not None:
            self._cancel(g)

    def _cancel(self, g: Greenlet) -> None:
        if self._spawn is None:
            self._sw._cancel_fiber(g)
        elif not g.dead:
            g.kill(Cancelled(f"{self.name} closed its connections"), block=False)

    def _update(self) -> None:
        want = (self._accepting and not self._closed and not self._timer.active
                and not self._paused
                and (self.active < self._limit
                     # At the limit: still watch, to reclaim an idle connection for a
                     # client waiting in the backlog (one at a time), unless such a
                     # client would be dropped anyway.
                     or (bool(self._reclaimable) and self._reclaiming is None
                         and not self._drop_incoming)))
        if want == self._watching:
            return
        self._watching = want
        for w, args in zip(self._watchers, self._accept_args, strict=True):
            if want:
                w.start(self._accept_batch, *args)
            else:
                w.stop()

    # -- the accept loop (runs in the hub) -----------------------------------------------

    def _accept_batch(self, listener: gsocket.socket, family: int, nodelay: bool) -> None:
        # Nothing may escape this callback: gevent stops a watcher whose callback raised,
        # while _watching would still say it runs, and the listener would be deaf.
        try:
            accept = self._ready(listener)
            if accept is None:
                return
            for _ in range(self.max_accepts_per_batch):
                if not self._watching or self.active >= self._limit:
                    return
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    return
                except OSError as exc:
                    if not self._accept_failed(exc):
                        return
                    continue
                self._backoff = 0.0
                admitted = self._admit(fd, addr, family, nodelay)
                if admitted is None:
                    continue
                # Spawned here, not a call deeper: a gevent Greenlet records the stack it
                # was spawned from (memory and time per connection, benchmarks/README.md).
                sock, peer = admitted
                try:
                    if self._spawn is not None:
                        g = self._spawn(self._serve, sock, peer)
                    else:
                        g = self._sw._fork_owning(self._serve_fn, self._unserved_fn, sock,
                                                  peer, context=self._context, lean=self._lean)
                except Exception as exc:
                    self._spawn_failed(exc, sock, peer)
                    continue
                if sock in self._conns:  # (spawn=None: served and released already)
                    self._conns[sock] = g
        except Exception as exc:  # a bug of ours, not the client's: say so, go on
            self._log(logging.ERROR, -2, "%s: accepting failed unexpectedly: %r",
                      self.name, exc, exc_info=exc)
        except BaseException:
            self._deafened()
            raise

    def _deafened(self) -> None:
        # A BaseException left the accept callback: gevent stopped its watcher.
        self._watching = False  # as gevent left it; _update() restarts the watchers
        for w in self._watchers:
            w.stop()
        gevent.get_hub().loop.run_callback(self._update)

    def _ready(self, listener: gsocket.socket) -> Any:
        """The listener's non-blocking accept function (``_gevent.raw_accept``) to
        accept with now, or None (nothing to accept in this wake-up: what stands in the
        way was dealt with)."""
        if self._spawn is None and self._sw.cancelled:
            self.close(close_listeners=False)  # the owner is going away: so are we
            return None
        accept = _gevent.raw_accept(listener)
        if accept is None:  # closed under us: as accept() on a closed fd would say
            self._accept_failed(OSError(errno.EBADF, "the listening socket was closed"))
            return None
        if self.active >= self._limit:
            # Woken at the limit: a client waits in the backlog. Make room for it (the
            # next wake-up, after that release, accepts it). Only here: reaching the
            # limit during a batch says nothing of a client waiting.
            if not self._drop_incoming:
                self._reclaim_one()
            return None
        return accept

    def _accept_failed(self, exc: OSError) -> bool:
        """Handle an accept error; True means: go on accepting in this batch."""
        code = exc.errno
        if code in _RETRY:
            return True
        self.stats["accept_errors"] += 1
        if code in _FATAL:
            log.error("%s: listening socket failed (%s); closing", self.name, exc)
            self.close(close_listeners=False)
            if self._on_fatal is not None:
                add_note(exc, f"accepting connections for {self.name}")
                self._on_fatal(exc)
            return False
        self._log(logging.WARNING, code, "%s: accept failed: %s; backing off", self.name, exc)
        self._back_off()
        return False

    def _back_off(self) -> None:
        self._backoff = min(MAX_BACKOFF, max(MIN_BACKOFF, self._backoff * 2))
        self._timer.close()
        self._timer = gevent.get_hub().loop.timer(self._backoff)
        self._timer.start(self._resume)
        self._update()

    def _resume(self) -> None:
        self._timer.stop()
        self._update()

    def _admit(self, fd: int, addr: Any, family: int, nodelay: bool) -> Any:
        """The accepted ``fd`` as a connection, counted in: ``(sock, peer)``; None when
        it was dropped or its peer is gone already."""
        if self._drop_incoming:
            os.close(fd)
            self.stats["dropped"] += 1
            return None
        if self._lean_conns:
            sock: Any = _gevent.Conn(fd, family)  # closes fd if it fails
        else:
            try:
                sock = _gevent.ServedSocket(family, _stdsocket.SOCK_STREAM, 0, fileno=fd)
            except BaseException:
                os.close(fd)
                raise
        try:
            if nodelay:
                sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            peer = from_sockaddr(family, addr)
        except OSError as exc:  # the peer left already (reset while in the backlog)
            sock.close()
            log.debug("%s: connection from %r gone before it was served: %s",
                      self.name, addr, exc)
            return None
        except BaseException:
            sock.close()
            raise
        self._conns[sock] = None  # counted in (a call less per connection)
        self.active += 1
        stats = self.stats
        stats["accepted"] += 1
        stats["active"] = self.active
        if self.active > stats["peak_active"]:
            stats["peak_active"] = self.active
        self.idle.clear()
        if self.active >= self._limit:
            self._update()
        return sock, peer

    def _spawn_failed(self, exc: Exception, sock: gsocket.socket, peer: Any) -> None:
        # The connection's fiber could not be made: free the connection (its client
        # sees end of file) and report why as for a handler, then go on accepting.
        self._release(sock)
        add_note(exc, f"starting the handler for a connection from {peer}")
        try:
            self._on_error(exc, peer)
        except Exception as raised:  # as from a connection fiber: it fails the switch
            self._sw.fail(raised)

    # -- one connection (runs in its own fiber) -----------------------------------------

    def _serve(self, sock: gsocket.socket, peer: Tcp | Unix) -> None:
        conn: Any = sock
        try:
            if self._closed:
                return  # close() started before this fiber did: never call the handler
            if self._conns.get(sock) is None:
                self._conns[sock] = getcurrent()
            if self._prepared:
                conn, peer = self._prepare(sock, peer)
                if conn is None:
                    return
            self._handler(conn, peer)
        except Exception as exc:
            if sock in self._aborted:
                log.debug("%s: connection from %s aborted; its handler ended with %r",
                          self.name, peer, exc)
                return
            if self.peer_left(sock, peer, exc):
                return
            if self.idle_timeout is not None and _is_socket_timeout(exc):
                self.stats["idle_timeouts"] += 1
                log.debug("%s: connection from %s idle for %s s: closed",
                          self.name, peer, self.idle_timeout)
                return
            self.stats["handler_errors"] += 1
            add_note(exc, f"handling connection from {peer}")
            self._on_error(exc, peer)
        finally:
            if conn is not sock and conn is not None:
                conn.close()
            if self._wrapped:
                self._owner_of.pop(self._wrapped.pop(sock, None), None)  # also after a
                # failed handshake
            self._release(sock)

    def peer_left(self, sock: gsocket.socket, peer: Any, exc: BaseException) -> bool:
        """True if ``exc``, raised in the handler of connection ``sock``, is its peer going
        away (a reset, a broken pipe, end of file in the middle of a message) and the
        connection's own socket confirms it; then it is logged once at ``DEBUG`` and
        counted in ``stats["peer_gone"]``, not reported as a handler error. A face that
        closes the socket before the engine sees the exception asks here first."""
        if not isinstance(exc, _PEER_GONE):
            return False
        # A reset or a broken pipe means the connection itself is gone; an end of file
        # only that the peer finished sending (it may have half-closed, still reading).
        ended = isinstance(exc, _DATA_ENDED)
        if not _gevent.peer_gone(self._wrapped.get(sock, sock), sending_ended=ended):
            return False
        self.stats["peer_gone"] += 1
        log.debug("%s: %s went away: %s", self.name, peer, exc)
        return True

    def _wrapped_by(self, sock: gsocket.socket, tls: Any) -> None:
        self._wrapped[sock] = tls
        self._owner_of[tls] = sock

    # -- reclaiming idle connections at the limit ---------------------------------------

    def reclaimable(self, conn: Any, reclaim: Reclaim | None = None, *,
                    reads_seen: bool = True) -> None:
        """Mark connection ``conn`` (the socket its handler got) as waiting for its peer's
        next message. While it is marked and the engine is at ``max_connections`` with
        a client waiting in the listen backlog, the engine may end it to admit that
        client: the oldest-marked first, one for one (the new client is accepted only
        once the reclaimed connection is released), and never a connection with unread
        bytes or with bytes received since it was marked (a request arriving), and never
        one that has received nothing yet (its first request may be on its way). Ending it
        is ``reclaim()`` (called from the hub), or by default the kernel's shutdown: a
        read blocked on it returns end of file, its peer reads end of file.
        ``reads_seen``: the caller unmarks ``conn`` (:meth:`busy`) on every byte it reads
        (``Flow``, ``Reader``); a face that cannot (gunicorn's parser reads by itself)
        passes False, and then only a TCP connection is marked, whose received and
        queued byte counts show a message that began.
        A no-op with ``reclaim_idle=False``, or for a connection the engine does not hold.
        """
        sock = self._owner_of.get(conn, conn)
        if not self.options.reclaim_idle or sock not in self._conns:
            return
        received = _gevent.bytes_received(conn)
        if received == 0 or (received is None and not reads_seen):
            # Not a keep-alive connection yet (its first message may be on its way), or
            # one whose reads nobody could tell us about.
            return
        self._reclaimable.pop(sock, None)  # marked again: now the youngest
        self._reclaimable[sock] = (reclaim, _consumed(conn, received))
        if self.active >= self._limit:
            self._update()

    def busy(self, conn: Any) -> None:
        """Unmark ``conn`` (bytes arrived, or its handler stopped waiting)."""
        if not self._reclaimable:
            return
        was = self._reclaimable.pop(self._owner_of.get(conn, conn), None)
        if was is not None and self.active >= self._limit:
            self._update()

    def _reclaim_one(self) -> None:
        """End the oldest idle connection (runs in the hub, at the limit, while a client
        waits in the backlog); skip any that is receiving a message."""
        while self._reclaimable and self._reclaiming is None:
            sock = next(iter(self._reclaimable))
            reclaim, consumed = self._reclaimable.pop(sock)
            conn = self._wrapped.get(sock, sock)
            if _gevent.has_unread(conn) or \
                    _consumed(conn, _gevent.bytes_received(conn)) != consumed:
                # A message is arriving, or was read since the mark (a TLS layer takes a
                # partial record out of the kernel): not idle after all.
                continue
            self._reclaiming = sock
            self._reclaim_deadline()
            self.stats["reclaimed"] += 1
            log.debug("%s: at %d connections, closing an idle one for a waiting client",
                      self.name, self.active)
            if reclaim is None:
                _gevent.kernel_shutdown(conn)
            else:
                gevent.get_hub().loop.run_callback(reclaim)
        self._update()

    def _reclaim_deadline(self) -> None:
        # A reclaimed connection whose handler does not end (it ignores its end of file)
        # must not stop reclaiming for good: after RECLAIM_GRACE the next idle one may go.
        if self._reclaim_timer is None:
            self._reclaim_timer = gevent.get_hub().loop.timer(RECLAIM_GRACE)
        self._reclaim_timer.start(self._reclaim_overdue)

    def _reclaim_overdue(self) -> None:
        self._reclaiming = None
        self._update()

    def _unserved(self, sock: gsocket.socket, peer: Any) -> None:
        # The fiber was cancelled before it started: just free the connection.
        self._release(sock)

    def _prepare(self, sock: gsocket.socket, peer: Any) -> tuple[Any, Any]:
        """PROXY header, TLS handshake, idle timeout: ``(None, peer)`` if rejected."""
        conn: Any = sock
        kind = "PROXY header"
        try:
            if self.proxy_protocol:
                info = read_proxy_header(sock, timeout=self.handshake_timeout)
                peer = info.source if info.source is not None else peer
            kind = "TLS handshake"
            if self.ssl_context is not None:
                # Recorded before the handshake: the wrapper owns the fd from then on,
                # and an abort during the handshake must shut the wrapper down.
                conn = _tls.server_side(sock, self.ssl_context, self.handshake_timeout,
                                        functools.partial(self._wrapped_by, sock))
        except (OSError, ProxyProtocolError, ssl.SSLError) as exc:
            self._preamble_failed(kind, peer, exc)
            return None, peer
        if self.idle_timeout is not None:
            conn.settimeout(self.idle_timeout)
        return conn, peer

    def _preamble_failed(self, kind: str, peer: Any, exc: BaseException) -> None:
        if isinstance(exc, _PEER_GONE):  # it left before saying anything: not an error
            self.stats["peer_gone"] += 1
            log.debug("%s: %s went away during its %s: %s", self.name, peer, kind, exc)
            return
        self.stats["handshake_errors"] += 1
        self._log(logging.INFO, -1, "%s: %s from %s failed: %s; connection closed",
                  self.name, kind, peer, exc)

    def _release(self, sock: gsocket.socket) -> None:
        sock.close()
        self._aborted.discard(sock)
        if self._reclaimable:
            self._reclaimable.pop(sock, None)
        if self._reclaiming is sock:
            self._reclaiming = None
            assert self._reclaim_timer is not None
            self._reclaim_timer.stop()
        if self._conns.pop(sock, _GONE) is _GONE:
            return  # released already
        self.active -= 1
        self.stats["active"] = self.active
        if self._backoff and not self._closed:
            self._timer.stop()  # an fd was freed: try accepting again at once
        if not self.active:
            self.idle.set()
        if not self._watching or self.active >= self._limit:
            # Watching and below the limit: one fewer connection changes nothing that
            # _update() looks at (the common case: no call per connection).
            self._update()

    def _log_handler_error(self, exc: Exception, peer: Any) -> None:
        log.error("%s: handler failed", self.name, exc_info=exc)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "accepting" if self._watching else "paused"
        return f"<Acceptor {self.name} {state} active={self.active}>"


def _consumed(conn: Any, received: int | None) -> tuple[int | None, int]:
    """What of a connection's input was taken out of the kernel: ``(received - queued,
    queued)`` (on TCP; elsewhere only the queued count is known). It changes when bytes
    arrive or are read, by anyone (a TLS layer reading part of a record too)."""
    queued = _gevent.queued(conn)
    return (None if received is None else received - queued, queued)


def _wait_any(events: list[Event], timeout: float | None) -> None:
    gevent.wait(events, timeout=timeout, count=1)


def _plural(n: int) -> str:
    return f"{n} connection" if n == 1 else f"{n} connections"


def _needs_nodelay(listener: gsocket.socket) -> bool:
    """True for a TCP listener without ``TCP_NODELAY`` (a unix one never needs it)."""
    if listener.family not in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
        return False
    try:
        return not listener.getsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY)
    except OSError:
        return True  # closed already (it will not accept anything) or not TCP: be safe


def _is_socket_timeout(exc: Exception) -> bool:
    """A socket operation's timeout (``socket.timeout``), as the idle timeout raises it;
    not the ``ConnectTimeout`` or ``HandshakeTimeout`` of a connection the handler made."""
    return isinstance(exc, TimeoutError) and not isinstance(exc, (NetError,
                                                                   _tls.HandshakeTimeout))


def check_limits(max_connections: object, max_accepts_per_batch: object) -> None:
    """Validate the engine's tunables (faces call it before creating any socket)."""
    _checks.count("max_connections", max_connections, optional=True)
    _checks.count("max_accepts_per_batch", max_accepts_per_batch)


def check_connection_options(ssl_context: object, handshake_timeout: object,
                             proxy_protocol: object, idle_timeout: object) -> None:
    """Validate the per-connection options (faces call it before creating any socket)."""
    _tls.check_context(ssl_context)
    _checks.seconds("handshake_timeout", handshake_timeout)
    _checks.flag("proxy_protocol", proxy_protocol)
    _checks.seconds("idle_timeout", idle_timeout, optional=True)



