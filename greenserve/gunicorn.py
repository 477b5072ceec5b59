"""gunicorn workers on greenserve's engine.

    gunicorn -k greenserve.gunicorn.Worker app:wsgi_app         # a WSGI application
    gunicorn -k greenserve.gunicorn.TCPWorker mymodule:handler  # handler(flow, addr)

Each worker process runs ONE :class:`~greenserve._acceptor.Acceptor` (THE engine) over
every listening socket gunicorn gave it, so ``worker_connections`` is one limit for the
whole worker (gunicorn's gevent worker makes one pool, with that limit, per socket).
This module only translates gunicorn's vocabulary onto the engine; it never accepts,
limits or closes a connection itself. It imports gunicorn: ``import greenserve`` never
imports it.

Design rules:

- Monkey-patching is gunicorn's gevent worker's: :meth:`_EngineWorker.patch`, the
  first step of ``init_process`` (in the forked worker, before the application is
  loaded), calls ``gevent.monkey.patch_all()`` and turns the inherited listening
  sockets into gevent sockets; then the hub is reinitialised. The arbiter is never
  patched.
- ``alive`` is a property. Every way gunicorn ends a worker sets ``alive = False``
  (SIGTERM, ``max_requests``, ``--reload``, the parent gone); the setter wakes the main
  greenlet at once, where gunicorn's gevent worker polls ``alive`` once a second.
- Signals run in greenlets (``gevent.signal_handler``), never by interrupting whatever
  Python code happened to run, so a handler may touch the engine.
- Stopping: close the listening sockets (accepting stops), end the connections idle
  between keep-alive requests, wait for the rest until ``graceful_timeout`` (less
  :data:`EXIT_MARGIN`), heartbeating all along, then cancel what still runs.
- HTTP is gunicorn's own, as in gunicorn's ``-k gevent`` worker: ``AsyncWorker.handle``
  (its parser, keep-alive loop, hooks, access log, HTTP/2). :class:`Worker` supplies
  only ``timeout_ctx`` (the wait for the next request on a connection), which is how it
  knows which connections are idle.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket as _stdsocket
import sys
import time
from types import TracebackType
from typing import Any

import gevent
from gevent import Greenlet, GreenletExit, getcurrent, hub, monkey
from gevent import socket as gsocket
from gevent.event import Event
from gunicorn.sock import ssl_context as gunicorn_ssl_context
from gunicorn.workers import base
from gunicorn.workers.base_async import AsyncWorker

from . import _gevent, speedups
from ._acceptor import Acceptor, ServerOptions
from .address import Tcp, Unix, as_accepted
from .flow import Flow
from .switch import Switch

__all__ = ["TCPWorker", "Worker"]

# Connections taken per readiness wake-up: gevent's StreamServer default for a single
# worker; with several workers on the same sockets gunicorn's gevent worker takes 1, so
# that a burst is spread over the workers instead of landing on whichever woke first.
MAX_ACCEPT = 100
# The heartbeat (worker.notify()) interval: gunicorn's gevent worker notifies once a
# second. The arbiter kills a worker silent for --timeout seconds; the worker is given
# half of that as ``self.timeout``, and a shorter one shortens the interval.
HEARTBEAT = 1.0
# The arbiter sends SIGKILL graceful_timeout after its SIGTERM (checking every 0.1 s).
# A worker cancels what still runs this much earlier, so that handlers unwind and the
# worker exits by itself (running gunicorn's worker_exit hook) before that; measured:
# cancel to exit takes a few milliseconds.
EXIT_MARGIN = 0.2

log = logging.getLogger("greenserve")


class _EngineWorker(base.Worker):  # type: ignore[misc]  # gunicorn is untyped
    """What both workers share: patching, one engine over all sockets, heartbeat, stop.

    A subclass defines :meth:`_serve_connection` (called in the connection's fiber with
    the accepted socket, TLS-wrapped if gunicorn's cert options are set, and the peer).
    """

    sockets: list[Any]  # gunicorn's listeners; gevent sockets once patch() ran
    _stop_requested: Event | None = None  # created in run(), after the hub's reinit
    _acceptor: Acceptor | None = None
    _quick = False  # SIGQUIT/SIGINT: close every connection at once

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._alive = True
        super().__init__(*args, **kwargs)
        self.worker_connections: int = self.cfg.worker_connections
        self._signal_watchers: list[Any] = []

    # -- gunicorn's protocol -----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the worker should stop (gunicorn sets it; setting it wakes run())."""
        return self._alive

    @alive.setter
    def alive(self, value: bool) -> None:
        # Only ever set from a greenlet (signals run in greenlets; handle_abort and the
        # boot-time handler bypass this), so it may act on the engine right here.
        self._alive = value
        if value:
            return
        if self._acceptor is not None:
            self._acceptor.stop_accepting()  # before this greenlet yields: not one more
        if self._stop_requested is not None:
            self._stop_requested.set()

    def patch(self) -> None:
        """Monkey-patch the worker process, as gunicorn's gevent worker does.

        ``gevent.monkey.patch_all()``, then the inherited listening sockets become
        gevent sockets (same fds). Runs after fork and before the application is
        imported, so the application sees a patched stdlib.
        """
        monkey.patch_all()
        self.sockets = [gsocket.socket(s.FAMILY, _stdsocket.SOCK_STREAM, fileno=s.sock.detach())
                        for s in self.sockets]

    def init_process(self) -> None:
        # Until init_signals() replaces them, the arbiter's handlers (inherited through
        # fork) would queue a SIGTERM in the arbiter's queue, which nobody reads here.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._signal_while_booting)
        self.patch()
        hub.reinit()
        self._route_engine_log()
        speedups.install_default(self.install_speedups)
        super().init_process()  # signals, the reloader, load_wsgi(), then run()

    def init_signals(self) -> None:
        """gunicorn's signals, with TERM, QUIT, INT and USR1 handled in greenlets."""
        super().init_signals()
        for sig, handler in ((signal.SIGTERM, self.handle_exit),
                             (signal.SIGQUIT, self.handle_quit),
                             (signal.SIGINT, self.handle_quit),
                             (signal.SIGUSR1, self.handle_usr1)):
            self._signal_watchers.append(gevent.signal_handler(sig, handler, sig, None))

    def _signal_while_booting(self, sig: int, frame: object) -> None:
        self._quick = self._quick or sig != signal.SIGTERM
        self._alive = False  # run() then stops at once

    def handle_abort(self, sig: int, frame: object) -> None:
        """SIGABRT (the arbiter's timeout): gunicorn's, a Python-level handler that must
        interrupt a stuck worker; it may run in the middle of the engine's code, so it
        sets the flag without the ``alive`` setter's side effects."""
        self._alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def handle_exit(self, sig: int, frame: object) -> None:
        """SIGTERM: graceful stop (run() wakes at once)."""
        self.alive = False

    def handle_quit(self, sig: int, frame: object) -> None:
        """SIGQUIT/SIGINT: quick stop. gunicorn's ``worker_int`` hook, then every
        connection is closed and its handler cancelled at once."""
        self._quick = True
        self.alive = False
        self.cfg.worker_int(self)
        if self._acceptor is not None:
            self._acceptor.close(close_listeners=True, close_connections=True)

    def notify(self) -> None:
        """The heartbeat; also stops the worker once its arbiter is gone (as gunicorn's
        gevent worker does, but gracefully)."""
        super().notify()
        if self.ppid != os.getppid() and self.alive:
            self.log.info("Parent changed, shutting down: %s", self)
            self.alive = False

    def run(self) -> None:
        self._stop_requested = Event()
        if not self.alive:
            self._stop_requested.set()
        sw = Switch._detached(f"gunicorn worker {self.pid}")
        acceptor = self._acceptor = self._make_acceptor(sw)
        try:
            if self.alive:
                acceptor.start_accepting()
                self._beat_until(self._stop_requested)
            self._stop(acceptor, sw)
        except BaseException:
            acceptor.close(close_listeners=True, close_connections=True)
            raise

    # -- serving and stopping ------------------------------------------------------------------

    # The C accelerator of greenlet stack chunks (docs/speedups.md), installed in each
    # worker process; GREENSERVE_SPEEDUPS=0, or a subclass setting False, turns it off.
    install_speedups = True

    # At worker_connections, a connection waiting for its next keep-alive request may be
    # closed to admit a client waiting in the backlog (the longest idle first; never one
    # whose request has begun to arrive). A subclass sets False to keep them all.
    reclaim_idle = True

    def _make_acceptor(self, sw: Switch) -> Acceptor:
        options = ServerOptions(
            max_connections=self.worker_connections,
            max_accepts_per_batch=1 if self.cfg.workers > 1 else MAX_ACCEPT,
            ssl_context=gunicorn_ssl_context(self.cfg) if self.cfg.is_ssl else None,
            reclaim_idle=self.reclaim_idle, gevent_sockets=True)
        return Acceptor(self.sockets, self._serve_connection, options, sw=sw,
                        on_error=self._connection_failed, name=f"gunicorn worker {self.pid}")

    def _serve_connection(self, conn: Any, peer: Tcp | Unix) -> None:
        raise NotImplementedError

    def _connection_failed(self, exc: Exception, peer: Any) -> None:
        self.log.error("Error handling connection from %s", peer, exc_info=exc)

    def _end_idle_connections(self) -> None:
        """Close the connections no request is running on (a stop has begun)."""

    def _beat_until(self, event: Event) -> None:
        """Heartbeat until ``event`` is set."""
        self._beating_wait([event], None)

    def _beating_wait(self, events: list[Event], timeout: float | None) -> None:
        """Wait for any of ``events`` for up to ``timeout`` seconds, telling the arbiter
        we are alive all along (the engine's drain waits with this)."""
        interval = min(HEARTBEAT, self.timeout) if self.timeout > 0 else HEARTBEAT
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.notify()
            wait = interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            if gevent.wait(events, timeout=wait, count=1):
                return

    def _graceful_timeout(self, n: int) -> None:
        # The line gunicorn's own gevent worker writes when its graceful timeout ends.
        self.log.warning("Worker graceful timeout (pid:%s): cancelling %d connections",
                         self.pid, n)

    def _stop(self, acceptor: Acceptor, sw: Switch) -> None:
        """Stop accepting, end idle connections, then the engine's drain: the others get
        until ``graceful_timeout``, then are cancelled."""
        acceptor.close(close_listeners=True)
        self._end_idle_connections()
        grace = max(0.0, self.cfg.graceful_timeout - EXIT_MARGIN)
        if acceptor.drain(grace, abort_grace=EXIT_MARGIN, wait=self._beating_wait,
                          logger=self.log, on_abort=self._graceful_timeout):
            sw._close()

    def _route_engine_log(self) -> None:
        """Send the engine's log (accept errors, failed TLS handshakes) to gunicorn's
        error log, unless the "greenserve" logger was configured already."""
        error_log = getattr(self.log, "error_log", None)
        if log.handlers or error_log is None:
            return
        for handler in error_log.handlers:
            log.addHandler(handler)
        log.setLevel(error_log.level)
        log.propagate = False


class Worker(_EngineWorker, AsyncWorker):  # type: ignore[misc]  # gunicorn is untyped
    """A WSGI worker: ``gunicorn -k greenserve.gunicorn.Worker app:wsgi_app``.

    HTTP/1.1 (keep-alive, pipelining, chunked bodies), gunicorn's HTTP/2 when enabled,
    hooks and access log all come from gunicorn's ``AsyncWorker``, as in gunicorn's
    gevent worker; the differences are in accepting and stopping (see the module
    docstring and docs/gunicorn.md).

    Resource handling: the engine closes every connection; gunicorn's handler closes it
    too when its keep-alive loop ends. Error handling: gunicorn's (a 400 or 500 answer,
    logged); a request cancelled at the graceful timeout is logged, and its connection
    closed without an answer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: dict[Greenlet, Any] = {}  # connection fiber -> its socket
        self._waits: set[_RequestWait] = set()  # connections waiting for a request
        self._served: set[Greenlet] = set()  # connection fibers that had a request
        self._listener_names: dict[Any, Any] = {}

    def timeout_ctx(self) -> _RequestWait:
        """gunicorn's keep-alive loop waits for each request inside this."""
        return _RequestWait(self)

    def run(self) -> None:
        self._listener_names = _listener_names(self.sockets)
        super().run()

    def _serve_connection(self, conn: Any, peer: Tcp | Unix) -> None:
        me = getcurrent()
        self._conns[me] = conn
        try:
            self.handle(self._listener_for(conn), conn, _accept_address(peer))
        finally:
            del self._conns[me]
            self._served.discard(me)

    def _end_idle_connections(self) -> None:
        for wait in list(self._waits):
            wait.end_unless_request_arrived()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, GreenletExit):  # cancelled by the stop: no answer
            why = "quick stop" if self._quick else "graceful timeout"
            self.log.info("Request cancelled by the worker's %s (pid:%s)", why, self.pid)
            return
        super().handle_error(req, client, addr, exc)

    def _listener_for(self, conn: Any) -> Any:
        """The listening socket that accepted ``conn``, for gunicorn's environ
        (SERVER_NAME/SERVER_PORT). The engine does not say which one it was: match the
        connection's local address (exactly, else a wildcard bind on its port)."""
        if len(self.sockets) == 1:
            return self.sockets[0]
        try:
            local = conn.getsockname()
        except OSError:
            return self.sockets[0]
        if isinstance(local, tuple):
            found = (self._listener_names.get(local[:2])
                     or self._listener_names.get(("", local[1])))
        else:
            found = self._listener_names.get(local)
        return found if found is not None else self.sockets[0]


class TCPWorker(_EngineWorker):
    """A raw TCP worker: ``gunicorn -k greenserve.gunicorn.TCPWorker mymodule:handler``.

    gunicorn's loader loads ``mymodule:handler``; each connection runs
    ``handler(flow, addr)`` in its own greenlet, with a :class:`~greenserve.Flow` and the
    peer's address (``Tcp``/``Unix``). ``max_requests`` counts connections.

    Resource handling: the flow is closed when the handler returns or raises. Error
    handling: a handler's exception is logged to gunicorn's error log with the peer's
    address; the worker goes on.
    """

    def load_wsgi(self) -> None:
        super().load_wsgi()
        if not callable(self.wsgi):
            raise TypeError(f"the TCP handler must be callable, not {type(self.wsgi).__name__}")

    def _serve_connection(self, conn: Any, peer: Tcp | Unix) -> None:
        self._count_request()
        flow = Flow(conn, peer=peer, reclaimer=self._acceptor)
        try:
            self.wsgi(flow, peer)  # gunicorn's name for what it loaded: our handler
        except Exception as exc:
            # Asked before the flow closes the socket, which the engine checks with.
            acceptor = self._acceptor
            if acceptor is None or not acceptor.peer_left(conn, peer, exc):
                raise
        finally:
            flow.close()

    def _count_request(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current connection.")
            self.alive = False


class _KeepAliveEnded(BaseException):
    """Thrown into a connection fiber waiting for its next request, to end the wait.

    A ``BaseException``, like ``gevent.Timeout``: nothing between the wait and the
    parser's ``recv`` catches it."""


class _RequestWait:
    """``timeout_ctx()``: one wait for a connection's next request.

    gunicorn's keep-alive loop runs ``with self.timeout_ctx(): req = next(parser)``.
    Like gunicorn's gevent worker's ``gevent.Timeout(keepalive, False)``, this ends
    the wait quietly (no request: gunicorn closes the connection) when the keep-alive
    timeout expires; unlike it, it also ends the wait as soon as the worker stops,
    unless bytes of a request have already arrived (that request is then served).
    """

    __slots__ = ("_fiber", "_timer", "_waiting", "_worker")

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._fiber: Any = None
        self._timer: Any = None
        self._waiting = False

    def __enter__(self) -> _RequestWait:
        self._fiber = getcurrent()
        self._waiting = True
        self._timer = gevent.get_hub().loop.timer(self._worker.cfg.keepalive)
        self._timer.start(self._end)
        self._worker._waits.add(self)
        here = inspect.currentframe()
        if here is not None and not _parser_holds_bytes(here.f_back):
            self._reclaimable(True)
        if not self._worker.alive:
            self.end_unless_request_arrived()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._waiting = False
        self._timer.close()
        self._worker._waits.discard(self)
        self._reclaimable(False)
        if ev is None:
            self._worker._served.add(self._fiber)  # a request came: now kept alive
        return isinstance(ev, _KeepAliveEnded)

    def _reclaimable(self, waiting: bool) -> None:
        # While it waits for a request, the engine may end this connection (with
        # _end_if_idle, as a stop does) to admit a client when the worker is full.
        acceptor = self._worker._acceptor
        conn = self._worker._conns.get(self._fiber)
        if acceptor is None or conn is None:
            return
        if waiting and self._fiber not in self._worker._served:
            return  # before its first request a connection is new, not kept alive
        if waiting:
            # gunicorn's parser reads the socket itself: the engine must see a request
            # begin in the kernel's byte counts (TCP only), not through our reads.
            acceptor.reclaimable(conn, self._end_if_idle, reads_seen=False)
        else:
            acceptor.busy(conn)

    def end_unless_request_arrived(self) -> None:
        # From the hub: throwing into a fiber from another greenlet would never return.
        gevent.get_hub().loop.run_callback(self._end_if_idle)

    def _end_if_idle(self) -> None:
        sock = self._worker._conns.get(self._fiber)
        if sock is None or not _gevent.has_unread(sock):
            self._end()

    def _end(self) -> None:
        # Runs in the hub. While _waiting, the fiber is blocked inside the with block
        # (in the parser's recv): the exception ends the wait there.
        if self._waiting:
            self._waiting = False
            self._fiber.throw(_KeepAliveEnded())


def _parser_holds_bytes(frame: Any) -> bool:
    """Whether gunicorn's request parser, in its keep-alive loop's frame (``handle`` of
    gunicorn's AsyncWorker: ``with self.timeout_ctx(): req = next(parser)``), holds
    read-ahead bytes: the start of a pipelined request, so the connection is not idle.
    There is no other way to reach the parser. If gunicorn's shape changed (no
    ``parser.unreader.buf`` there), the answer is True: never reclaim what we cannot
    see (tests/test_reclaim.py's gunicorn scenario then fails, telling us)."""
    parser = frame.f_locals.get("parser")
    buf = getattr(getattr(parser, "unreader", None), "buf", None)
    if buf is None or not hasattr(buf, "getbuffer"):
        return True
    return bool(buf.getbuffer().nbytes)


def _listener_names(sockets: list[Any]) -> dict[Any, Any]:
    """Listening sockets by name: ``(host, port)``, ``("", port)`` for a wildcard
    host, or a unix path."""
    names: dict[Any, Any] = {}
    for ls in sockets:
        name = ls.getsockname()
        if isinstance(name, tuple):
            host = "" if name[0] in ("0.0.0.0", "::") else name[0]
            names.setdefault((host, name[1]), ls)
        else:
            names.setdefault(name, ls)
    return names


def _accept_address(peer: Tcp | Unix) -> Any:
    """The peer as ``accept()`` gives it, which is what gunicorn's handler expects."""
    return as_accepted(peer)
