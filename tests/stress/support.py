"""What the stress tests share: servers on the engine and its faces, a handler gauge,
bounded waiting, and probes of this process (fds, greenlets, memory)."""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.event import Event

from greenserve import Switch, Tcp, net, tcp
from greenserve.flow import open_listener
from greenserve.server import StreamServer

from ..helpers import make_acceptor

ROOT = Path(__file__).parent.parent.parent
SCRIPTS = Path(__file__).parent / "scripts"

# Room for every client a test starts at once, so that the kernel never refuses one.
BACKLOG = 1024


# -- waiting ---------------------------------------------------------------------------------


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait cooperatively until ``cond()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or cond}")
        gevent.sleep(0.002)


# -- probes of this process ------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def live_greenlets() -> list[gevent.Greenlet]:
    return [o for o in gc.get_objects() if isinstance(o, gevent.Greenlet) and not o.dead]


def connections_to(port: int) -> list[int]:
    """This process's fds that are TCP connections whose local port is ``port``: the
    server side of connections to a server listening there."""
    found = []
    for fd in open_fds():
        try:
            dup = os.dup(fd)
        except OSError:
            continue  # closed meanwhile (e.g. the listdir's own fd)
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue  # not a socket
        with sock:
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6) \
                        and sock.type == socket.SOCK_STREAM \
                        and sock.getsockname()[1] == port and sock.getpeername():
                    found.append(fd)
            except OSError:
                pass  # not connected: the listening socket itself
    return found


def rss_kib() -> int:
    """Resident set size (VmRSS) of this process, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _malloc_trim() -> None:
    # Freed C memory (greenlet stacks, socket buffers) stays in glibc's heap, counted in
    # RSS, until trimmed: trimming first makes RSS measure what is still allocated.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS then includes the allocator's free lists


@dataclass(frozen=True)
class Footprint:
    """What a leak would make grow: fds, live greenlets, memory."""

    fds: frozenset[int]
    greenlets: int
    rss_kib: int
    blocks: int   # sys.getallocatedblocks(): Python objects and buffers, exact
    objects: int  # objects tracked by the garbage collector

    @classmethod
    def now(cls) -> Footprint:
        gc.collect()
        _malloc_trim()
        return cls(frozenset(open_fds()), len(live_greenlets()), rss_kib(),
                   sys.getallocatedblocks(), len(gc.get_objects()))


# -- counting inside handlers ----------------------------------------------------------------


@dataclass
class Gauge:
    """Counts handlers as they run: how many now, the most at once, started, finished."""

    running: int = 0
    peak: int = 0
    started: int = 0
    finished: int = 0

    @contextmanager
    def inside(self) -> Iterator[None]:
        self.running += 1
        self.started += 1
        self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            self.running -= 1
            self.finished += 1


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Served:
    """A running server as the tests see it, whatever the face."""

    port: int
    stats: Callable[[], dict[str, int]]  # {} where the face has no stats
    active: Callable[[], int]            # open connections; -1 where the face cannot tell
    errors: list[tuple[BaseException, Any]] = field(default_factory=list)
    # Sets drop-incoming (accept and close at once) where the face has it.
    set_drop_incoming: Callable[[bool], None] | None = None


@contextmanager
def engine(handler: Callable[[Any, Any], object], **kw: Any) -> Iterator[Served]:
    """The Acceptor itself on 127.0.0.1, ``handler(sock, peer)``; handler errors are
    collected in ``served.errors``. Closes everything (connections too) on exit."""
    errors: list[tuple[BaseException, Any]] = []
    kw.setdefault("on_error", lambda exc, peer: errors.append((exc, peer)))
    with Switch(name="stress engine") as sw:
        lsock = open_listener(Tcp("127.0.0.1", 0), backlog=BACKLOG, sw=sw)
        acc = make_acceptor([lsock.socket], handler, sw=sw, name="stress engine", **kw)
        acc.start_accepting()
        try:
            yield Served(lsock.address.port, lambda: dict(acc.stats), lambda: acc.active,
                         errors, lambda flag: setattr(acc, "drop_incoming", flag))
        finally:
            acc.close(close_listeners=False, close_connections=True)


@contextmanager
def stream_server(handler: Callable[[Any, Any], object], **kw: Any) -> Iterator[Served]:
    """greenserve's gevent-compatible StreamServer on 127.0.0.1, ``handle(sock, address)``."""
    server = StreamServer(("127.0.0.1", 0), handler, backlog=BACKLOG, **kw)
    server.start()
    try:
        yield Served(server.server_port, server.stats, lambda: server.num_connections)
    finally:
        server.stop(timeout=5)


@contextmanager
def net_server(handler: Callable[[Any, Any], object], **kw: Any) -> Iterator[Served]:
    """``net.serve_listeners`` (what ``run_server`` and the CLI run) on 127.0.0.1,
    ``handler(flow, peer)``; ``kw`` are its keywords (``max_connections``, the engine's
    ``ssl_context``, ``proxy_protocol``...). This face has no stats: ``stats()`` is
    empty. Handler errors are collected in ``served.errors``."""
    errors: list[tuple[BaseException, Any]] = []
    stop = Event()
    kw.setdefault("drain_timeout", 5.0)  # a stuck handler fails the test, never hangs it
    with Switch(name="stress net") as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=BACKLOG)
        sw.fork(net.serve_listeners, [lsock], handler,
                on_error=lambda exc: errors.append((exc, None)), stop=stop, **kw)
        try:
            yield Served(lsock.address.port, dict, lambda: -1, errors)
        finally:
            stop.set()


@contextmanager
def tcp_server(handler: Callable[[Any, Any], object], **kw: Any) -> Iterator[Served]:
    """``tcp.Server.create_sock`` on 127.0.0.1 with ``handler(sock, peer)`` (the order
    of the other faces); handler errors are collected through a callable
    ``on_handler_error``. Closes everything (connections too) on exit."""
    errors: list[tuple[BaseException, Any]] = []
    server = tcp.Server.create_sock(
        tcp.WhereToListen.bind_to("127.0.0.1", 0), lambda peer, sock: handler(sock, peer),
        on_handler_error=lambda peer, exc: errors.append((exc, peer)), backlog=BACKLOG,
        **kw)
    try:
        yield Served(int(server.listening_on), server.stats, lambda: server.num_connections,
                     errors, server.set_drop_incoming_connections)
    finally:
        server.close(close_existing_connections=True)
        server.wait(5)


# -- clients ---------------------------------------------------------------------------------


def connect(port: int, timeout: float = 10.0) -> gsocket.socket:
    """A client connected to 127.0.0.1:port. Not ``create_connection``: that resolves
    even an IP literal through gevent's thread pool, whose threads (stacks, malloc
    arenas) would blur the memory figures and cost a thread round trip per client."""
    sock = gsocket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exactly(sock: Any, n: int) -> bytes:
    """``n`` bytes, or fewer if the peer closed first."""
    chunks = []
    while n:
        data = sock.recv(min(n, 65536))
        if not data:
            break
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def subprocess_env() -> dict[str, str]:
    """The environment for a child running greenserve from this checkout."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}
