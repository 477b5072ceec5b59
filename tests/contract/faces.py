"""Transports, clients and face drivers for the contract suite.

A *transport* says how a server listens and how a client reaches it: TCP on 127.0.0.1 or
::1, a unix socket, TLS, a PROXY v1/v2 header in front. A *face driver* starts one face
on one transport with the contract handler (``handlers.py``) and gives the tests one
interface, :class:`Running`: the addresses to connect to, ``stop(mode)`` (``graceful``:
stop accepting, give the handlers ``grace`` seconds, then cut them; ``abort``: cut at
once; ``cancel``: cancel what owns the server), ``stats()`` where the face has them, the
probe of its handlers (in-process faces), the handler errors it reported, its log
(subprocess faces).

Every wait here is bounded and waits on something (an event, a line, a process);
nothing sleeps to synchronise.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import re
import signal
import socket
import ssl
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.ssl
from gevent import socket as gsocket
from gevent import subprocess as gsubprocess
from gevent.event import AsyncResult, Event

from greenserve import StreamServer, Switch, Tcp, Unix, net, tcp

from . import handlers
from .handlers import Probe

ROOT = Path(__file__).resolve().parent.parent.parent
READY_CONF = ROOT / "tests" / "gunicorn_apps" / "ready_conf.py"
HANDLER_SPEC = "tests.contract.handlers:serve"

BACKLOG = 128          # room for every client a test starts at once
CLIENT_TIMEOUT = 10.0  # any single client operation (connect, handshake, recv)
START_TIMEOUT = 20.0   # a subprocess face until it is ready
ABORT_WAIT = 5.0       # after cutting the connections, until every handler has unwound
EXIT_WAIT = 10.0       # a subprocess face, from its stop signal to its exit
LONG_GRACE = 30.0      # the grace period configured for a face that is to be aborted


class FaceStopFailed(AssertionError):
    """A face's stop raised, did not finish in time, or its process exited badly."""


class _Abort(Exception):
    """What the ``abort`` stop of the net faces sets on their ``stop`` AsyncResult."""


# -- transports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    name: str
    family: int
    host: str | None = None  # None: a unix socket
    tls: bool = False
    tls_files: bool = False  # StreamServer only: gevent's keyfile=/certfile= keywords
    proxy: int = 0           # PROXY protocol version the client sends first (0: none)

    @property
    def preamble(self) -> bool:
        """A transport where the engine prepares the connection before the handler."""
        return self.tls or bool(self.proxy)


TRANSPORTS = {t.name: t for t in (
    Transport("tcp4", socket.AF_INET, "127.0.0.1"),
    Transport("tcp6", socket.AF_INET6, "::1"),
    Transport("unix", socket.AF_UNIX),
    Transport("tls", socket.AF_INET, "127.0.0.1", tls=True),
    Transport("tlsfiles", socket.AF_INET, "127.0.0.1", tls=True, tls_files=True),
    Transport("proxy1", socket.AF_INET, "127.0.0.1", proxy=1),
    Transport("proxy2", socket.AF_INET, "127.0.0.1", proxy=2),
)}


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _has_ipv6_loopback()


# -- faces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    name: str
    transports: tuple[str, ...]
    stop_modes: tuple[str, ...]
    subprocess: bool = False
    listeners: int = 1  # listening sockets it serves under one limit
    # The stop modes that give the handlers ``grace`` seconds before cutting them; the
    # others must cut at once.
    graceful_modes: tuple[str, ...] = ("graceful",)


_ALL = ("tcp4", "tcp6", "unix", "tls", "proxy1", "proxy2")


def _takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` has the keyword ``name`` (faces grow options: the suite offers
    what the face under test offers)."""
    return name in inspect.signature(fn).parameters


# run_server took no per-connection options before it shared serve_listeners' keywords.
RUN_SERVER_TRANSPORTS = _ALL if _takes(net.run_server, "ssl_context") else ("tcp4", "tcp6",
                                                                            "unix")
NET_MODES = ("graceful", "abort", "cancel")
FACES = {f.name: f for f in (
    Face("run_server", RUN_SERVER_TRANSPORTS, NET_MODES),
    Face("serve_listeners", _ALL,
         (*NET_MODES, "abort_event") if _takes(net.serve_listeners, "abort") else NET_MODES,
         listeners=2),
    Face("tcp.create", _ALL, ("graceful", "abort", "cancel")),
    Face("tcp.create_sock", _ALL, ("graceful", "abort", "cancel")),
    # Killing serve_forever()'s greenlet stops the server with its stop_timeout.
    Face("StreamServer", (*_ALL, "tlsfiles"), ("graceful", "abort", "cancel"),
         graceful_modes=("graceful", "cancel")),
    Face("gunicorn", ("tcp4", "tcp6", "unix", "tls"), ("graceful", "abort"), subprocess=True,
         listeners=2),
    Face("cli", _ALL, ("graceful", "abort"), subprocess=True, listeners=2),
)}


# -- clients --------------------------------------------------------------------------------


PROXY_V1_SOURCE = "203.0.113.9"
PROXY_V2_SOURCE = "2001:db8::9"
PROXY_V2_DESTINATION = "2001:db8::1"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source_port: int, destination_port: int) -> bytes:
    return (f"PROXY TCP4 {PROXY_V1_SOURCE} 127.0.0.1 {source_port} "
            f"{destination_port}\r\n").encode("ascii")


def proxy_v2(source_port: int, destination_port: int) -> bytes:
    block = (ipaddress.IPv6Address(PROXY_V2_SOURCE).packed
             + ipaddress.IPv6Address(PROXY_V2_DESTINATION).packed
             + struct.pack("!HH", source_port, destination_port))
    # version 2, command PROXY; AF_INET6 over STREAM
    return V2_SIGNATURE + bytes([0x21, 0x21]) + struct.pack("!H", len(block)) + block


def client_tls_context(certs: Any) -> ssl.SSLContext:
    """A client context trusting the test CA, making gevent (cooperative) TLS sockets."""
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(certs.ca))
    return ctx


class Client:
    """One client connection, over whatever the transport needs."""

    def __init__(self, running: Running, index: int = 0, *, preamble: bool = True,
                 timeout: float = CLIENT_TIMEOUT, bind: Any = None) -> None:
        """Connect to listener ``index`` (modulo how many the face has); send the PROXY
        header and do the TLS handshake unless ``preamble`` is false. ``bind``: a unix
        name to bind the client socket to first."""
        t = running.transport
        self.running = running
        address = running.addresses[index % len(running.addresses)]
        raw = gsocket.socket(t.family, socket.SOCK_STREAM)
        self.raw = raw
        self.sock: Any = raw
        self._buf = b""
        try:
            raw.settimeout(timeout)
            if bind is not None:
                raw.bind(bind)
            raw.connect(address)
            local = raw.getsockname()
            if t.family == socket.AF_UNIX:
                name = local if isinstance(local, bytes) else local.encode("utf-8",
                                                                          "surrogateescape")
                self.expected_peer = b"unix " + name.hex().encode()
            elif t.proxy == 1:
                self.expected_peer = b"tcp %s %d" % (PROXY_V1_SOURCE.encode(), local[1])
            elif t.proxy == 2:
                self.expected_peer = b"tcp %s %d" % (PROXY_V2_SOURCE.encode(), local[1])
            else:
                self.expected_peer = b"tcp %s %d" % (local[0].encode(), local[1])
            if preamble and t.proxy:
                make = proxy_v1 if t.proxy == 1 else proxy_v2
                raw.sendall(make(local[1], address[1]))
            if preamble and t.tls:
                ctx = client_tls_context(running.certs)
                self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise

    # what a test does with it
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, line: bytes) -> None:
        self.send(line + b"\n")

    def read_line(self) -> bytes:
        """The next line without its newline; ``AssertionError`` at end of file."""
        while b"\n" not in self._buf:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"end of file before a whole line; got {self._buf!r}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def recv(self, n: int = 65536) -> bytes:
        if self._buf:
            data, self._buf = self._buf[:n], self._buf[n:]
            return data
        data: bytes = self.sock.recv(n)
        return data

    def closed_by_server(self, timeout: float = CLIENT_TIMEOUT) -> bytes:
        """Read until the server closes (end of file, or a reset: it closed with unread
        data); return what came before. Fails if it does not close within ``timeout``."""
        got = b""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.recv()
            except (ConnectionResetError, ssl.SSLEOFError):
                return got
            except TimeoutError:
                raise AssertionError(f"the server did not close the connection within "
                                     f"{timeout} s (got {len(got)} bytes)") from None
            if not data:
                return got
            got += data

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if self.sock is not self.raw:
            self.sock.close()
        self.raw.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_served(running: Running, index: int = -1) -> None:
    """A new client is served: ``peer`` gets its own (or its PROXY header's) address."""
    with Client(running, index) as c:
        c.request(b"peer")
        seen = c.read_line()
        assert seen == c.expected_peer, f"the handler saw {seen!r}, not {c.expected_peer!r}"
        assert c.closed_by_server() == b""


# -- a running face -------------------------------------------------------------------------


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               probe: Probe | None = None) -> None:
    """Wait cooperatively until ``cond()``: on the probe's ``changed`` Event when the
    condition is about the probe, else checking every few ms; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if probe is not None:
            probe.changed.clear()
        if cond():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not true within {timeout} s: {what}")
        if probe is not None:
            probe.changed.wait(min(left, 0.05))
        else:
            gevent.sleep(min(left, 0.005))


class Running:
    """One face serving one transport, as the tests see it."""

    stopped = False

    def __init__(self, face: Face, transport: Transport, tmp_path: Path, certs: Any, *,
                 max_connections: int | None, grace: float, stop_mode: str | None) -> None:
        self.face, self.transport = face, transport
        self.tmp_path, self.certs = tmp_path, certs
        self.max_connections, self.grace, self.stop_mode = max_connections, grace, stop_mode
        self.addresses: list[Any] = []
        self.probe: Probe | None = None
        self.errors: list[BaseException] = []  # handler errors reported to our callback

    def __repr__(self) -> str:
        return f"<{self.face.name} on {self.transport.name}>"

    # listening addresses
    def listen_addresses(self) -> list[Tcp | Unix]:
        t = self.transport
        if t.family == socket.AF_UNIX:
            return [Unix(str(self.tmp_path / f"s{i}.sock")) for i in range(self.face.listeners)]
        assert t.host is not None
        return [Tcp(t.host, 0) for _ in range(self.face.listeners)]

    def engine_options(self) -> dict[str, Any]:
        """The per-connection options, as the engine-level faces take them."""
        opts: dict[str, Any] = {}
        if self.transport.tls:
            opts["ssl_context"] = self.certs.server_context()
        if self.transport.proxy:
            opts["proxy_protocol"] = True
        return opts

    # the interface
    def start(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict[str, int] | None:
        """The face's counters, or None where it has none."""
        return None

    def stop(self, mode: str) -> None:
        """Stop the face (``graceful``, ``abort`` or ``cancel``) and wait until it has
        stopped; raise :class:`FaceStopFailed` (or what the face raised) otherwise."""
        if mode not in self.face.stop_modes:
            raise ValueError(f"{self.face.name} has no stop mode {mode!r}")
        if self.stopped:
            return
        self.stopped = True
        self._stop(mode)

    def _stop(self, mode: str) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        """After the test: stop what is still running, release everything."""
        if not self.stopped:
            self.stop(self.face.stop_modes[0])

    def log_text(self) -> str:
        return ""

    def wait_idle(self, timeout: float = ABORT_WAIT) -> None:
        """Every handler has returned (in-process: the probe) and no connection is open
        (where the face has stats)."""
        if self.probe is not None:
            probe = self.probe
            wait_until(lambda: probe.finished == probe.started, timeout,
                       f"every handler returned ({probe})", probe)
        if self.stats() is not None:
            wait_until(lambda: (self.stats() or {}).get("active") == 0, timeout,
                       f"stats()['active'] back to 0 ({self.stats()})")


def _settled(result: AsyncResult, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``result`` to be set (with a value or an exception)."""
    gevent.wait([result], timeout=timeout)
    return bool(result.ready())


def _stack(g: Any) -> str:
    """Where greenlet ``g`` is blocked (for failure messages)."""
    frame = getattr(g, "gr_frame", None)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(not running)"


class _InProcess(Running):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.probe = Probe()


class NetFace(_InProcess):
    """``net.run_server`` (one listener) and ``net.serve_listeners`` (two, one limit), each
    run by a greenlet in a Switch of its own, with ``drain_timeout=grace`` (where the
    face takes it) and the engine's options as keywords.

    Stops: ``graceful``: ``stop`` (an ``AsyncResult``) set; ``abort``:
    ``stop.set_exception(exc)`` (the face raises ``exc``); ``cancel``: the Switch
    cancelled; ``abort_event``: ``stop`` then serve_listeners' ``abort`` Event."""

    def start(self) -> None:
        self._stop_signal: AsyncResult = AsyncResult()
        self._abort_event = Event()
        ready: AsyncResult = AsyncResult()
        self._done: AsyncResult = AsyncResult()
        self._sw: Switch | None = None
        self._greenlet = gevent.spawn(self._main, ready)
        self.addresses = [a.sockaddr for a in ready.get(timeout=ABORT_WAIT)]

    @property
    def _drains(self) -> bool:
        """The face cuts the handlers at ``drain_timeout`` itself."""
        fn = net.run_server if self.face.name == "run_server" else net.serve_listeners
        return _takes(fn, "drain_timeout")

    def _main(self, ready: AsyncResult) -> None:
        handler = handlers.flow_handler(self.probe)  # type: ignore[arg-type]
        kw: dict[str, Any] = dict(on_error=self.errors.append,
                                  max_connections=self.max_connections,
                                  stop=self._stop_signal, **self.engine_options())
        if self._drains:
            kw["drain_timeout"] = self.grace
        if "abort_event" in self.face.stop_modes:
            kw["abort"] = self._abort_event
        try:
            with Switch(name=f"contract {self.face.name}") as sw:
                self._sw = sw
                lsocks = [net.listen(a, sw=sw, backlog=BACKLOG) for a in self.listen_addresses()]
                ready.set([ls.address for ls in lsocks])
                if self.face.name == "run_server":
                    net.run_server(lsocks[0], handler, **kw)
                else:
                    net.serve_listeners(lsocks, handler, **kw)
        except BaseException as exc:  # handed to stop(), which raises it
            if not ready.ready():
                ready.set_exception(exc)
            self._done.set_exception(exc)
        else:
            self._done.set(None)

    def _stop(self, mode: str) -> None:
        assert self._sw is not None
        if mode == "graceful":
            self._stop_signal.set(None)
            # A face with drain_timeout cuts the handlers itself; without it, the driver
            # cancels the switch after the grace period.
            if not _settled(self._done, self.grace + (ABORT_WAIT if self._drains else 0)):
                self._sw.cancel()
        elif mode == "abort":
            self._stop_signal.set_exception(_Abort("abort"))
        elif mode == "abort_event":
            self._stop_signal.set(None)
            self._abort_event.set()
        else:
            self._sw.cancel()
        if not _settled(self._done, ABORT_WAIT):
            raise FaceStopFailed(f"{self.face.name} did not return within {ABORT_WAIT} s "
                                 f"after the {mode} stop; it is at:\n"
                                 f"{_stack(self._greenlet)}")
        try:
            self._done.get()
        except _Abort:
            if mode != "abort":
                raise
        else:
            if mode == "abort":
                raise FaceStopFailed(f"{self.face.name} returned instead of raising the "
                                     f"exception set on its stop AsyncResult")

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            if not self._greenlet.dead:
                self._greenlet.kill(block=True, timeout=ABORT_WAIT)


class TcpFace(_InProcess):
    """``tcp.Server.create`` (``handler(addr, reader, writer)``) and ``create_sock``
    (``handler(addr, sock)``). For the ``cancel`` stop it lives in a ``Switch`` (``sw=``)
    run by a greenlet of its own; otherwise it has its own switch, as usual."""

    def start(self) -> None:
        sock_face = self.face.name == "tcp.create_sock"
        create = tcp.Server.create_sock if sock_face else tcp.Server.create
        handler = (handlers.sock_handler if sock_face else handlers.streams_handler)(
            self.probe)  # type: ignore[arg-type]
        kw: dict[str, Any] = dict(on_handler_error=lambda addr, exc: self.errors.append(exc),
                                  max_connections=self.max_connections, backlog=BACKLOG,
                                  **self.engine_options())
        where = self.listen_addresses()[0]
        self._holder: gevent.Greenlet | None = None
        self._sw: Switch | None = None
        if self.stop_mode == "cancel":
            ready: AsyncResult = AsyncResult()
            self._holder_done: AsyncResult = AsyncResult()
            self._holder = gevent.spawn(self._hold, create, where, handler, kw, ready)
            self.server = ready.get(timeout=ABORT_WAIT)
        else:
            self.server = create(where, handler, **kw)
        self.addresses = [self.server.listening_on_address.sockaddr]

    def _hold(self, create: Any, where: Any, handler: Any, kw: dict[str, Any],
              ready: AsyncResult) -> None:
        try:
            with Switch(name="contract tcp.Server") as sw:
                self._sw = sw
                ready.set(create(where, handler, sw=sw, **kw))
            # the switch waited until the server was closed and its handlers ended
        except BaseException as exc:
            if not ready.ready():
                ready.set_exception(exc)
            self._holder_done.set_exception(exc)
        else:
            self._holder_done.set(None)

    def stats(self) -> dict[str, int]:
        return self.server.stats()

    def _stop(self, mode: str) -> None:
        server = self.server
        if mode == "graceful":
            server.close()
            if not server.wait(self.grace):
                server.close(close_existing_connections=True)
        elif mode == "abort":
            server.close(close_existing_connections=True)
        else:
            assert self._sw is not None, "the cancel stop needs a server started for it"
            self._sw.cancel()
        if self._holder is not None:
            if not _settled(self._holder_done, ABORT_WAIT):
                raise FaceStopFailed(f"the Switch holding the server did not finish within "
                                     f"{ABORT_WAIT} s after the {mode} stop")
            self._holder_done.get()
        if not server.wait(ABORT_WAIT):
            raise FaceStopFailed(f"wait() still False {ABORT_WAIT} s after the {mode} stop: "
                                 f"{server!r}")

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            if self._holder is not None and not self._holder.dead:
                self._holder.kill(block=True, timeout=ABORT_WAIT)


class StreamServerFace(_InProcess):
    """greenserve's gevent-compatible ``StreamServer``: ``start()``, then
    ``serve_forever(stop_timeout=grace)`` in a greenlet. TLS with ``ssl_context=``, or
    gevent's ``keyfile=``/``certfile=`` (transport ``tlsfiles``)."""

    def start(self) -> None:
        t = self.transport
        addr = self.listen_addresses()[0]
        listener: Any = f"unix:{addr.path}" if isinstance(addr, Unix) else (addr.host, 0)
        tls: dict[str, Any] = {}
        if t.tls_files:
            tls = {"keyfile": str(self.certs.key), "certfile": str(self.certs.cert)}
        elif t.tls:
            tls = {"ssl_context": self.certs.server_context()}
        self.server = StreamServer(listener, handlers.gevent_handler(self.probe),  # type: ignore[arg-type]
                                   backlog=BACKLOG, max_connections=self.max_connections,
                                   proxy_protocol=bool(t.proxy), **tls)
        self.server.start()
        self._greenlet = gevent.spawn(self.server.serve_forever, self.grace)
        sockname = self.server.socket.getsockname()
        self.addresses = [sockname]

    def stats(self) -> dict[str, int]:
        return self.server.stats()

    def _stop(self, mode: str) -> None:
        if mode == "graceful":
            self.server.stop(timeout=self.grace)
        elif mode == "abort":
            self.server.stop(timeout=0)
        else:
            self._greenlet.kill(block=True, timeout=self.grace + ABORT_WAIT)
        self._greenlet.join(ABORT_WAIT)
        if not self._greenlet.dead:
            raise FaceStopFailed(f"serve_forever() did not return within {ABORT_WAIT} s "
                                 f"after the {mode} stop")
        if self._greenlet.exception is not None:
            raise self._greenlet.exception
        if self.server.num_connections:
            raise FaceStopFailed(f"{self.server.num_connections} connections still open "
                                 f"after the {mode} stop")

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            if not self._greenlet.dead:
                self._greenlet.kill(block=True, timeout=ABORT_WAIT)


class _Subprocess(Running):
    """A face in a child process: its stderr is collected by a greenlet."""

    proc: Any = None

    def _spawn(self, cmd: list[str], **kw: Any) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self._lines: list[str] = []
        self._line_added = Event()
        self.exit_code: int | None = None
        self.proc = gsubprocess.Popen(cmd, cwd=ROOT, env=env, stderr=gsubprocess.PIPE,
                                      start_new_session=True, **kw)
        self._reader = gevent.spawn(self._read_stderr)

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self._lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._line_added.set()
        self._line_added.set()

    def log_text(self) -> str:
        return "\n".join(self._lines)

    def wait_for_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            self._line_added.clear()
            for line in self._lines[seen:]:
                if m := regex.search(line):
                    return m
            seen = len(self._lines)
            left = deadline - time.monotonic()
            if left <= 0 or self._reader.dead:
                raise AssertionError(f"{self}: no log line matches {pattern!r}:\n"
                                     f"{self.log_text()}")
            self._line_added.wait(left)

    def _signal_and_wait(self, sig: int, mode: str) -> None:
        self.proc.send_signal(sig)
        deadline = (self.grace if mode in self.face.graceful_modes else 0) + EXIT_WAIT
        try:
            self.exit_code = self.proc.wait(timeout=deadline)
        except gsubprocess.TimeoutExpired:
            raise FaceStopFailed(f"{self} still running {deadline} s after the {mode} "
                                 f"stop:\n{self.log_text()}") from None
        self._reader.join(EXIT_WAIT)
        if self.exit_code != 0:
            raise FaceStopFailed(f"{self} exited with status {self.exit_code} after the "
                                 f"{mode} stop:\n{self.log_text()}")

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            if self.proc is not None:
                if self.proc.poll() is None:
                    try:
                        os.killpg(self.proc.pid, signal.SIGKILL)  # the process and its children
                    except ProcessLookupError:
                        pass
                self.proc.wait(EXIT_WAIT)
                self._reader.join(EXIT_WAIT)
                for f in (self.proc.stdout, self.proc.stderr):
                    if f is not None:
                        f.close()


def _bind_text(addr: Tcp | Unix) -> str:
    """A ``--bind`` value both gunicorn and the command take."""
    if isinstance(addr, Unix):
        return f"unix:{addr.path}"
    return f"[{addr.host}]:{addr.port}" if ":" in addr.host else f"{addr.host}:{addr.port}"


class CliFace(_Subprocess):
    """``python -m greenserve tests.contract.handlers:serve`` with two ``--bind``s; ready
    once it printed its ``listening on`` lines. ``graceful``: SIGTERM
    (``--shutdown-timeout``); ``abort``: SIGTERM then SIGINT (a second signal)."""

    def start(self) -> None:
        t = self.transport
        cmd = [sys.executable, "-m", "greenserve", HANDLER_SPEC, "--log-level", "debug",
               "--shutdown-timeout", str(self.grace), "--backlog", str(BACKLOG)]
        for a in self.listen_addresses():
            cmd += ["--bind", _bind_text(a)]
        if self.max_connections is not None:
            cmd += ["--max-connections", str(self.max_connections)]
        if t.tls:
            cmd += ["--certfile", str(self.certs.cert), "--keyfile", str(self.certs.key)]
        if t.proxy:
            cmd.append("--proxy-protocol")
        self._spawn(cmd, stdout=gsubprocess.PIPE)
        try:
            with gevent.Timeout(START_TIMEOUT, AssertionError(f"{self}: not listening within "
                                                              f"{START_TIMEOUT} s")):
                for _ in range(self.face.listeners):
                    line = self.proc.stdout.readline().decode()
                    if not line.startswith("listening on "):
                        self.proc.wait(EXIT_WAIT)
                        self._reader.join(EXIT_WAIT)
                        raise AssertionError(f"{self}: {line!r}\n{self.log_text()}")
                    self.addresses.append(self._sockaddr(line.split()[-1]))
        except BaseException:
            self.stopped = True  # nothing to stop gracefully: cleanup kills it
            raise

    def _sockaddr(self, text: str) -> Any:
        if text.startswith("unix:"):
            return text[len("unix:"):]
        assert self.transport.host is not None
        return (self.transport.host, int(text.rsplit(":", 1)[1]))

    def _stop(self, mode: str) -> None:
        if mode == "abort":  # a second signal: close every connection at once
            self.proc.send_signal(signal.SIGTERM)
        self._signal_and_wait(signal.SIGTERM if mode == "graceful" else signal.SIGINT, mode)


class GunicornFace(_Subprocess):
    """gunicorn's arbiter with one ``greenserve.gunicorn.TCPWorker`` on two binds;
    ready once the worker logged ``Worker ready`` (``tests/gunicorn_apps/ready_conf.py``).
    ``graceful``: SIGTERM (``--graceful-timeout``); ``abort``: SIGINT (quick stop)."""

    def start(self) -> None:
        from gunicorn.config import KNOWN_SETTINGS

        t = self.transport
        no_control = (["--no-control-socket"]
                      if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
                      else [])
        cmd = [sys.executable, "-m", "gunicorn", *no_control, "-c", str(READY_CONF),
               "-k", "greenserve.gunicorn.TCPWorker", "-w", "1", "--log-level", "info",
               "--graceful-timeout", str(max(1, round(self.grace))),
               "--backlog", str(BACKLOG)]
        for a in self.listen_addresses():
            cmd += ["--bind", _bind_text(a)]
        if self.max_connections is not None:
            cmd += ["--worker-connections", str(self.max_connections)]
        if t.tls:
            cmd += ["--certfile", str(self.certs.cert), "--keyfile", str(self.certs.key)]
        cmd.append(HANDLER_SPEC)
        self._spawn(cmd, stdout=gsubprocess.DEVNULL)
        try:
            urls = self.wait_for_line(r"Listening at: (\S+)")[1].split(",")
            self.wait_for_line(r"Worker ready")
        except BaseException:
            self.stopped = True
            raise
        for url in urls:
            if url.startswith("unix:"):
                self.addresses.append(url[len("unix:"):])
            else:
                assert t.host is not None
                self.addresses.append((t.host, int(url.rsplit(":", 1)[1])))

    def _stop(self, mode: str) -> None:
        self._signal_and_wait(signal.SIGTERM if mode == "graceful" else signal.SIGINT, mode)


_DRIVERS: dict[str, type[Running]] = {
    "run_server": NetFace, "serve_listeners": NetFace, "tcp.create": TcpFace,
    "tcp.create_sock": TcpFace, "StreamServer": StreamServerFace, "gunicorn": GunicornFace,
    "cli": CliFace,
}


@contextmanager
def serving(face_name: str, transport_name: str, tmp_path: Path, certs: Any, *,
            max_connections: int | None = None, grace: float | None = None,
            stop_mode: str | None = None) -> Iterator[Running]:
    """Start ``face_name`` on ``transport_name``; stop it (its first stop mode) and
    release everything at the end unless the test stopped it. ``grace``: the graceful
    stop's deadline (configured at start where the face takes it then); when the test
    means to stop with ``stop_mode`` and that mode should cut at once, it is long, so
    that a stop waiting for it shows."""
    face, transport = FACES[face_name], TRANSPORTS[transport_name]
    assert transport_name in face.transports, (face_name, transport_name)
    # IPv6 is a transport every face promises: a host without ::1 fails these tests
    # (CI's machines have it) rather than skipping them.
    assert transport.family != socket.AF_INET6 or HAS_IPV6, "this host has no ::1"
    if grace is None:
        grace = {"gunicorn": 1.0, "cli": 0.5}.get(face_name, 0.1)
        if stop_mode is not None and stop_mode not in face.graceful_modes:
            grace = LONG_GRACE  # a stop that should cut at once must not wait for it
    running = _DRIVERS[face_name](face, transport, tmp_path, certs,
                                  max_connections=max_connections, grace=grace,
                                  stop_mode=stop_mode)
    try:
        running.start()
        yield running
    except BaseException:
        try:
            running.cleanup()
        except BaseException:
            pass  # the test's own failure is the one to report
        raise
    running.cleanup()
