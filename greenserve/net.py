"""Eio's ``Net`` for gevent: listen, connect, accept, accept_fork, run_server,
datagrams and name resolution.

Every socket a function here returns is attached to the ``sw`` it was given and is
closed when that switch finishes (closing it earlier is fine). ``run_server`` serves
with the one acceptor engine (:mod:`greenserve._acceptor`).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket as _stdsocket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.os
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from . import _bind, _checks, _connect, _tls
from ._acceptor import Acceptor, ServerOptions, check_limits
from .address import Address, Tcp, Udp, Unix, parse_address
from .errors import (
    add_note,
    reraise,
)
from .flow import DatagramSocket, Flow, ListeningSocket, open_listener
from .switch import Switch

__all__ = [
    "accept", "accept_fork", "connect", "datagram_socket", "getaddrinfo",
    "getaddrinfo_datagram", "getaddrinfo_stream", "getnameinfo", "listen", "recv",
    "run_server", "send", "serve_listeners", "with_tcp_connect",
]

log = logging.getLogger("greenserve")

OnError = Callable[[Exception], object]

# Connections one wake-up of a listening socket takes when a single process serves it:
# under a burst of connects, a batch saves an epoll round trip and a hub iteration per
# connection (scenario d of benchmarks/: ~14k -> ~18k connections/s); gevent's
# StreamServer and greenserve's take 100 too. The connection limit stays exact mid-batch.
ACCEPT_BATCH = 100


def _check_switch(sw: object) -> Switch:
    if not isinstance(sw, Switch):
        raise TypeError(f"sw must be a greenserve.Switch, not {type(sw).__name__}")
    return sw


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")


def _check_timeout(name: str, value: object) -> float | None:
    return _checks.seconds(name, value, optional=True)


# -- listening and accepting -----------------------------------------------------------------


def listen(addr: object, *, sw: Switch, backlog: int = _stdsocket.SOMAXCONN,
           reuse_addr: bool = False, reuse_port: bool = False) -> ListeningSocket:
    """Bind a listening socket to ``addr`` (``Tcp``/``Unix``/``fd://N`` or anything
    :func:`~greenserve.parse_address` takes), owned by ``sw``.

    Unix paths: with ``reuse_addr=True`` a stale *socket* file at the path is removed
    first (any other kind of file is an error, never removed); the path is unlinked
    when the socket is closed, only if it is still the socket we bound.
    Raises ``OSError`` (``EADDRINUSE``, ...) with a note naming the address.
    """
    _check_switch(sw)
    _check_flag("reuse_addr", reuse_addr)
    _check_flag("reuse_port", reuse_port)
    return open_listener(parse_address(addr), backlog=backlog, reuse_addr=reuse_addr,
                         reuse_port=reuse_port, sw=sw)


def accept(lsock: ListeningSocket, *, sw: Switch) -> tuple[Flow, Tcp | Unix]:
    """Wait for one connection on ``lsock``; the flow is owned by ``sw``."""
    return lsock.accept(sw=_check_switch(sw))


def accept_fork(lsock: ListeningSocket, *, sw: Switch, on_error: OnError,
                handler: Callable[[Flow, Any], object]) -> None:
    """Accept one connection in the caller, then run ``handler(flow, addr)`` in a new
    fiber of ``sw``.

    Resource handling: the flow is closed when the handler returns or raises.
    Error handling: an ``Exception`` from the handler gets the note ``handling
    connection from <addr>`` and is passed to ``on_error``; if ``on_error`` raises,
    ``sw`` fails. ``Cancelled`` just ends the fiber.
    """
    _check_switch(sw)
    flow, addr = lsock.accept(sw=sw)
    sw._fork_owning(_serve_flow, _close_flow, flow, addr, handler, on_error)


def _close_flow(flow: Flow, *_: Any) -> None:
    flow.close()  # the fiber never started


def _serve_flow(flow: Flow, addr: Any, handler: Callable[[Flow, Any], object],
                on_error: OnError) -> None:
    with flow:
        try:
            handler(flow, addr)
        except Exception as exc:
            add_note(exc, f"handling connection from {addr}")
            on_error(exc)


def _check_event(name: str, value: object, kinds: tuple[type, ...]) -> None:
    if value is not None and not isinstance(value, kinds):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{name} must be a gevent {wanted} or None, not {type(value).__name__}")


def run_server(lsock: ListeningSocket, handler: Callable[[Flow, Any], object], *,
               on_error: OnError, max_connections: int | None = None,
               additional_processes: int = 0, stop: Event | AsyncResult | None = None,
               drain_timeout: float | None = None, ssl_context: ssl.SSLContext | None = None,
               handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
               proxy_protocol: bool = False, idle_timeout: float | None = None,
               reclaim_idle: bool = True) -> Any:
    """Accept connections on ``lsock`` and run ``handler(flow, addr)`` for each in its
    own fiber, with at most ``max_connections`` at once (no accept while at the limit).

    Runs until cancelled, or until ``stop`` (an ``Event`` or ``AsyncResult``) is set:
    then accepting stops, running handlers finish, and the ``AsyncResult``'s value is
    returned (``None`` for an ``Event``). ``drain_timeout`` (seconds; ``None``: wait
    for the handlers however long they take): handlers still running that long after
    ``stop`` was set have their connections shut down and are cancelled; run_server
    returns once they have unwound. ``additional_processes=N`` forks N more processes
    serving the same socket; setting ``stop`` stops them all, with the same deadline.

    Per connection, before the handler: ``proxy_protocol`` reads a PROXY v1/v2 header
    (``addr`` is then the client it names), ``ssl_context`` completes a TLS handshake
    (the flow then reads and writes plaintext), both within ``handshake_timeout``
    seconds; a connection that fails them is closed (logged at INFO) and the handler
    is not called. ``idle_timeout``: a read or write that waits longer ends the
    connection quietly.
    ``reclaim_idle`` (default True): at ``max_connections``, with a client waiting, the
    connection idle the longest among those whose handler waits inside
    :meth:`Flow.idle <greenserve.flow.Flow.idle>` is closed to admit it (the handler's
    read returns end of file); ``False``: never.

    Error handling: as :func:`accept_fork`; out-of-fds and similar accept errors are
    logged (rate limited) and retried after a back-off. An accept error that means the
    listening socket itself is broken (``EBADF``, ``EINVAL``, ``ENOTSOCK``: closed, shut
    down or not listening) ends the server: running handlers finish (as for ``stop``),
    then the ``OSError`` is raised. Bad arguments raise ``TypeError``/``ValueError``
    naming the argument, before anything is accepted.
    Resource handling: each flow is closed when its handler ends; ``lsock`` stays open
    (it belongs to the switch that created it).
    """
    return serve_listeners(
        [lsock], handler, on_error=on_error, max_connections=max_connections,
        additional_processes=additional_processes, stop=stop, drain_timeout=drain_timeout,
        ssl_context=ssl_context, handshake_timeout=handshake_timeout,
        proxy_protocol=proxy_protocol, idle_timeout=idle_timeout, reclaim_idle=reclaim_idle)


def serve_listeners(listeners: list[ListeningSocket], handler: Callable[[Flow, Any], object], *,
                    on_error: OnError, max_connections: int | None = None,
                    additional_processes: int = 0, stop: Event | AsyncResult | None = None,
                    drain_timeout: float | None = None, abort: Event | None = None,
                    ssl_context: ssl.SSLContext | None = None,
                    handshake_timeout: float = _tls.DEFAULT_HANDSHAKE_TIMEOUT,
                    proxy_protocol: bool = False, idle_timeout: float | None = None,
                    reclaim_idle: bool = True) -> Any:
    """:func:`run_server` for several listening sockets sharing one connection limit
    (the CLI's ``--bind`` repeated), with one more keyword: ``abort``, an ``Event``
    that ends everything at once when set (also after ``stop``, during the drain): the
    connections are shut down and their handlers cancelled, as when ``drain_timeout``
    runs out (the CLI's second signal). With ``additional_processes``, the children are
    sent ``SIGTERM`` when ``stop`` is set and ``SIGQUIT`` when ``abort`` is set (or when
    this call is cancelled or fails). Arguments and errors as for :func:`run_server`;
    ``listeners`` must be a non-empty list of :class:`ListeningSocket`, which stay open.
    """
    _check_listeners(listeners)
    _check_serving(handler, on_error, max_connections, additional_processes, stop, abort)
    drain = _checks.seconds("drain_timeout", drain_timeout, optional=True)
    options = ServerOptions(
        max_connections=max_connections, ssl_context=ssl_context,
        handshake_timeout=handshake_timeout, proxy_protocol=proxy_protocol,
        idle_timeout=idle_timeout, reclaim_idle=reclaim_idle,
        # One process: take up to ACCEPT_BATCH connections per wake-up. Several
        # processes on one socket: one each, so that connections spread over them.
        max_accepts_per_batch=1 if additional_processes else ACCEPT_BATCH)
    serve = functools.partial(_serve, listeners, handler, on_error, options,
                              drain_timeout=drain)
    if not additional_processes:
        return serve(stop, abort)
    return _serve_with_children(serve, additional_processes, stop, abort)


def _check_listeners(listeners: object) -> None:
    if not isinstance(listeners, list) or not listeners:
        raise TypeError("listeners must be a non-empty list of ListeningSocket")
    for ls in listeners:
        if not isinstance(ls, ListeningSocket):
            raise TypeError(f"listeners must hold ListeningSocket objects, not "
                            f"{type(ls).__name__}")


def _check_serving(handler: object, on_error: object, max_connections: object,
                   additional_processes: object, stop: object, abort: object) -> None:
    check_limits(max_connections, 1)
    if isinstance(additional_processes, bool) or not isinstance(additional_processes, int):
        raise TypeError(f"additional_processes must be an int, not "
                        f"{type(additional_processes).__name__}")
    if additional_processes < 0:
        raise ValueError(f"additional_processes must be >= 0, not {additional_processes}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, not {type(handler).__name__}")
    if not callable(on_error):
        raise TypeError(f"on_error must be callable, not {type(on_error).__name__}")
    _check_event("stop", stop, (Event, AsyncResult))
    _check_event("abort", abort, (Event,))


def _serve_with_children(serve: Callable[[Any, Any], Any], count: int,
                         stop: Event | AsyncResult | None, abort: Event | None) -> Any:
    """Fork ``count`` children serving as this process does, serve, then wait for them.

    The children stop (SIGTERM) and drain at the same time as this process, and this
    process waits for them after its own drain; ``abort`` set at any time until they
    have exited closes their connections at once (SIGQUIT), as does a cancellation or a
    failure here.
    """
    children = [_fork_child(serve) for _ in range(count)]
    how = signal.SIGQUIT
    try:
        with Switch(name="run_server children") as sw:
            for pid in children:
                sw.fork(_watch_child, pid, children)  # the switch waits for every child
            if stop is not None:
                sw.fork_daemon(_signal_children_when_set, stop, children, signal.SIGTERM)
            if abort is not None:  # alive until the children have exited
                sw.fork_daemon(_signal_children_when_set, abort, children, signal.SIGQUIT)
            try:
                result = serve(stop, abort)
            except OSError:
                how = signal.SIGTERM  # a broken listening socket: the handlers drained
                raise
            _signal_children(children, signal.SIGTERM)  # (again:) stop, then drain
        return result
    finally:
        _stop_children(children, how)  # those left after an error: reap them


def _serve(listeners: list[ListeningSocket], handler: Callable[[Flow, Any], object],
           on_error: OnError, options: ServerOptions, stop: Event | AsyncResult | None,
           abort: Event | None, *, drain_timeout: float | None) -> Any:
    def serve_one(sock: gsocket.socket, peer: Any) -> None:
        flow = Flow(sock, peer=peer, reclaimer=acceptor)
        try:
            handler(flow, peer)
        except Exception as exc:
            # Asked before the flow closes the socket, which the engine checks with.
            if not acceptor.peer_left(sock, peer, exc):
                raise
        finally:
            flow.close()

    name = f"run_server {' '.join(str(ls.address) for ls in listeners)}"
    broken: AsyncResult = AsyncResult()  # fails if a listening socket breaks
    with Switch(name=name) as sw:
        acceptor = Acceptor([ls.socket for ls in listeners], serve_one, options, sw=sw,
                            on_error=lambda exc, peer: on_error(exc), name=name,
                            on_fatal=broken.set_exception)
        acceptor.start_accepting()
        try:
            result = _wait_for_stop(stop, broken, abort)
        except BaseException:  # cancelled, or stop.set_exception(): cancel the handlers
            acceptor.close(close_listeners=False)
            raise
        # Handlers get drain_timeout (or until abort), then are aborted; the switch
        # waits for them to unwind.
        acceptor.drain(drain_timeout, abort=abort)
    if broken.ready():
        broken.get()  # raises the listening socket's error, now that the handlers are done
    return result


def _wait_for_stop(stop: Event | AsyncResult | None, broken: AsyncResult,
                   abort: Event | None) -> Any:
    """Wait for ``stop``, ``abort`` (without either: until cancelled) or ``broken``;
    return the ``AsyncResult``'s value (``None`` for an ``Event``, or when ``broken`` or
    ``abort`` came first). ``stop.set_exception(exc)`` raises ``exc``."""
    gevent.wait([e for e in (stop, broken, abort) if e is not None], count=1)
    if isinstance(stop, AsyncResult) and stop.ready() and not broken.ready():
        return stop.get()
    return None


def _fork_child(serve: Callable[[Event, Event], object]) -> int:
    pid = gevent.os.fork()
    if pid:
        return pid
    code = 1
    try:
        _child_main(serve)
        code = 0
    except BaseException:
        log.exception("run_server: child process %d failed", os.getpid())
    finally:
        os._exit(code)


def _child_main(serve: Callable[[Event, Event], object]) -> None:
    """A child serves until its parent says: ``SIGTERM`` stops it gracefully (the
    drain as in the parent), ``SIGQUIT`` closes its connections at once. ``SIGINT`` is
    ignored: a terminal's Ctrl-C reaches the whole process group, and the parent
    decides what it means."""
    stop, abort = Event(), Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGQUIT, abort.set)
    gevent.signal_handler(signal.SIGINT, _ignore)
    serve(stop, abort)


def _ignore() -> None:
    pass


def describe_exit(status: int) -> str:
    """A ``waitpid`` status in words: ``exited with 3``, ``killed by SIGKILL``."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _reaped(pid: int, status: int, children: list[int]) -> None:
    if pid in children:
        children.remove(pid)  # reaped: its pid may be reused, never signal it again
    level = logging.ERROR if status else logging.DEBUG
    log.log(level, "run_server: child process %d %s", pid, describe_exit(status))


def _watch_child(pid: int, children: list[int]) -> None:
    try:
        _, status = gevent.os.waitpid(pid, 0)
    except ChildProcessError:  # reaped by someone else: nothing to report
        if pid in children:
            children.remove(pid)
        return
    _reaped(pid, status, children)


def _signal_children_when_set(event: Event | AsyncResult, children: list[int],
                              sig: int) -> None:
    gevent.wait([event])
    _signal_children(children, sig)


def _signal_children(children: list[int], sig: int) -> None:
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_children(children: list[int], sig: int) -> None:
    """Signal the children not reaped yet with ``sig`` and wait for each to exit."""
    _signal_children(children, sig)
    for pid in list(children):
        try:
            _, status = gevent.os.waitpid(pid, 0)
        except ChildProcessError:
            if pid in children:
                children.remove(pid)  # reaped meanwhile
            continue
        _reaped(pid, status, children)


# -- connecting ------------------------------------------------------------------------------


def connect(addr: object, *, sw: Switch, timeout: float | None = None) -> Flow:
    """Connect to ``addr`` (``Tcp``/``Unix`` or anything ``parse_address`` takes; a host
    name is resolved and its addresses tried in order). The flow is owned by ``sw``.

    Raises ``Refused``, ``ConnectTimeout`` (``timeout`` seconds per attempt), ... with a
    note naming the address. Nothing leaks on failure.
    """
    _check_switch(sw)
    timeout = _check_timeout("timeout", timeout)
    target = parse_address(addr)
    if not isinstance(target, (Tcp, Unix)):
        raise ValueError(f"cannot connect to {target}: a tcp or unix address is needed")
    sock, peer = _connect.connect(target, timeout)
    return Flow(sock, peer=peer, sw=sw)


@contextmanager
def with_tcp_connect(host: str, service: str | int, *, timeout: float | None = None,
                     happy_eyeballs_delay: float | None = None,
                     ssl_context: ssl.SSLContext | None = None,
                     server_hostname: str | None = None) -> Iterator[Flow]:
    """Connect to ``host``/``service`` and yield the flow; it is closed on exit.

    Tries the ``getaddrinfo`` stream addresses in order, ``timeout`` seconds per
    attempt, moving on after a failure; the last failure is raised with the earlier
    ones in its notes (``NoMatchingAddresses`` when nothing resolves to TCP).
    ``happy_eyeballs_delay`` (seconds) starts the attempts staggered and in parallel,
    families interleaved, as RFC 8305 describes; the first to connect wins.
    ``ssl_context``: the flow speaks TLS; the handshake (checking ``server_hostname``,
    default ``host``) is bounded by ``timeout`` and closes the socket if it fails
    (``ssl.SSLError``, or ``TimeoutError``).
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty str, not {host!r}")
    if not isinstance(service, (str, int)) or isinstance(service, bool):
        raise TypeError(f"service must be a str or int, not {type(service).__name__}")
    timeout = _check_timeout("timeout", timeout)
    delay = _check_timeout("happy_eyeballs_delay", happy_eyeballs_delay)
    _tls.check_context(ssl_context)
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError(f"server_hostname must be a str or None, not "
                        f"{type(server_hostname).__name__}")
    sock, peer = _connect.connect_by_name(host, str(service), timeout, delay)
    if ssl_context is not None:
        sock = _tls.client_side(sock, ssl_context, server_hostname or host, timeout)
    with Flow(sock, peer=peer) as flow:
        yield flow


def interleave_families(targets: list[Tcp]) -> list[Tcp]:
    """RFC 8305 section 4: alternate address families, starting with the first one."""
    return _connect.interleave_families(targets)


# -- datagrams -------------------------------------------------------------------------------


def datagram_socket(addr: object, *, sw: Switch, reuse_addr: bool = False,
                    reuse_port: bool = False) -> DatagramSocket:
    """A datagram socket owned by ``sw``: bound to ``Udp(...)``/``Unix(...)`` (or their
    text forms), or an unbound client socket for ``"udp4"``/``"udp6"``."""
    _check_switch(sw)
    _check_flag("reuse_addr", reuse_addr)
    _check_flag("reuse_port", reuse_port)
    if addr in ("udp4", "udp6"):
        family = _stdsocket.AF_INET if addr == "udp4" else _stdsocket.AF_INET6
        return DatagramSocket(gsocket.socket(family, _stdsocket.SOCK_DGRAM), sw=sw)
    target = parse_address(addr)
    if not isinstance(target, (Udp, Unix)):
        raise ValueError(f"datagram_socket needs a udp: or unix: address, not {target}")
    sock = gsocket.socket(target.family, _stdsocket.SOCK_DGRAM)
    try:
        unlink = _bind.bind(sock, target, reuse_addr, reuse_port)
    except OSError as exc:
        sock.close()
        reraise(exc, f"binding {target}")
    except BaseException:
        sock.close()
        raise
    return DatagramSocket(sock, sw=sw, unlink=unlink)


def send(sock: DatagramSocket, addr: Udp | Unix, data: bytes | bytearray | memoryview) -> None:
    """``sock.send(addr, data)``."""
    sock.send(addr, data)


def recv(sock: DatagramSocket, buffer: Any) -> tuple[Udp | Unix, int]:
    """``sock.recv(buffer)``."""
    return sock.recv(buffer)


# -- names -----------------------------------------------------------------------------------


def getaddrinfo(host: str, service: str | int | None = None) -> list[Tcp | Udp | Unix]:
    """Resolve ``host`` (and ``service``) to addresses, in the resolver's order.

    Raises ``AddressLookupFailed`` when resolution fails or finds nothing.
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty str, not {host!r}")
    return _connect.resolve(host, service)


def getaddrinfo_stream(host: str, service: str | int | None = None) -> list[Tcp | Unix]:
    """:func:`getaddrinfo`, keeping stream addresses."""
    return [a for a in getaddrinfo(host, service) if isinstance(a, (Tcp, Unix))]


def getaddrinfo_datagram(host: str, service: str | int | None = None) -> list[Udp | Unix]:
    """:func:`getaddrinfo`, keeping datagram addresses."""
    return [a for a in getaddrinfo(host, service) if isinstance(a, (Udp, Unix))]


def getnameinfo(addr: Address) -> tuple[str, str]:
    """Reverse lookup: ``(host, service)`` for a ``Tcp``/``Udp`` address."""
    if not isinstance(addr, (Tcp, Udp)):
        raise TypeError(f"addr must be Tcp or Udp, not {type(addr).__name__}")
    flags = _stdsocket.NI_DGRAM if isinstance(addr, Udp) else 0
    try:
        host, service = gsocket.getnameinfo(addr.sockaddr, flags)
    except OSError as exc:
        reraise(exc, f"looking up the name of {addr}")
    return host, service
