"""The ``greenserve`` command: serve a ``handler(flow, addr)`` on one or more addresses.

``greenserve HANDLER [--bind ADDR ...] [--max-connections N] [--backlog N]
[--processes N] [--log-level LEVEL] [--certfile F --keyfile F] [--proxy-protocol]
[--idle-timeout S] [--shutdown-timeout S] [--unix-mode MODE]``

``HANDLER`` is ``module:callable`` or a built-in: ``echo``, ``discard``, ``daytime``.
Bad input (unknown handler, bad address, port in use, ...) prints one line on stderr
and exits with status 2. The first SIGTERM/SIGINT stops gracefully: accepting stops at
once, running connections get ``--shutdown-timeout`` seconds, then are closed; a
second one closes them at once. Either way the exit status is 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import gevent
from gevent.event import Event

from . import _tls, net, speedups
from ._version import __version__
from .address import Address, Fd, Tcp, Unix, parse_address
from .flow import Flow, ListeningSocket, open_listener
from .switch import Switch

__all__ = ["BUILTINS", "main"]

log = logging.getLogger("greenserve")

DEFAULT_BIND = "127.0.0.1:8000"
# Clients served at once per process: far above what one greenlet per connection
# costs (about 10 KiB each), far below the default fd limits a service raises.
DEFAULT_MAX_CONNECTIONS = 10_000
# The kernel caps it at net.core.somaxconn (4096 on current Linux).
DEFAULT_BACKLOG = 1024
# Long enough for a request in flight to finish; short enough for a deploy's restart.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# systemd's socket activation passes its sockets from fd 3 on (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
# Every log line carries the pid: with --processes, several processes write to stderr.
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# gevent's StreamServer reads "*" as every IPv4 interface; so does --bind.
ANY_HOST = "*"


def echo(flow: Flow, addr: Any) -> None:
    """Send back everything received. Between messages the connection is idle: at
    --max-connections it may be closed for a waiting client (see Flow.idle)."""
    while True:
        with flow.idle():
            data = flow.read()
        if not data:
            return
        flow.write(data)


def discard(flow: Flow, addr: Any) -> None:
    """Read and drop everything (RFC 863); idle between reads, as echo."""
    while True:
        with flow.idle():
            data = flow.read()
        if not data:
            return


def daytime(flow: Flow, addr: Any) -> None:
    """Send the current time as text and close (RFC 867)."""
    flow.write(time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n").encode())


# A peer that resets or goes away escapes these handlers as ConnectionReset /
# BrokenPipeError: the engine logs that at DEBUG with the peer's address, not them.
BUILTINS: dict[str, Callable[[Flow, Any], None]] = {
    "echo": echo, "discard": discard, "daytime": daytime,
}


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value == float("inf"):  # NaN and inf too
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
        return value
    return convert


def file_mode(text: str) -> int:
    """An octal file mode: ``660``, ``0660`` or ``0o660`` (permission bits only)."""
    digits = text[2:] if text.lower().startswith("0o") else text
    try:
        mode = int(digits, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (000 to 777)")
    return mode


def _parser() -> _Parser:
    p = _Parser(prog="greenserve", description="Serve a handler(flow, addr) over TCP/unix.")
    p.add_argument("handler", help="module:callable, called as handler(flow, addr) for each "
                                   "connection, or a built-in: echo, discard, daytime")
    p.add_argument("--bind", "-b", action="append", metavar="ADDR",
                   help="address to listen on, repeatable: HOST:PORT, [IPV6]:PORT, *:PORT "
                        "(every IPv4 interface), unix:PATH, fd://N (default: "
                        f"{DEFAULT_BIND}, or systemd's sockets when LISTEN_FDS is set)")
    p.add_argument("--max-connections", type=_positive(int), default=DEFAULT_MAX_CONNECTIONS,
                   metavar="N", help="connections served at once, per process; more wait "
                                     "in the listen backlog (default: %(default)s)")
    p.add_argument("--backlog", type=_positive(int), default=DEFAULT_BACKLOG, metavar="N",
                   help="listen backlog of each socket (default: %(default)s)")
    p.add_argument("--processes", type=_positive(int), default=1, metavar="N",
                   help="serving processes sharing the sockets (default: %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="logging level on stderr (default: %(default)s)")
    _connection_options(p)
    p.add_argument("--version", action="version", version=f"greenserve {__version__}",
                   help="print the version and exit")
    return p


def _connection_options(p: _Parser) -> None:
    """What each connection gets: TLS, PROXY, timeouts, reclaiming, socket file modes."""
    p.add_argument("--certfile", metavar="FILE",
                   help="serve TLS with this PEM certificate chain (default: none, plain TCP)")
    p.add_argument("--keyfile", metavar="FILE",
                   help="PEM private key for --certfile (default: the key in --certfile)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="expect a PROXY protocol v1/v2 header on every connection "
                        "(default: off)")
    p.add_argument("--idle-timeout", type=_positive(float), metavar="S",
                   help="close a connection whose read or write waits more than S seconds "
                        "(default: none)")
    p.add_argument("--shutdown-timeout", type=_positive(float),
                   default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="S",
                   help="on the first SIGTERM/SIGINT, give open connections S seconds, then "
                        "close them; a second signal closes them at once "
                        f"(default: {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    p.add_argument("--no-speedups", dest="speedups", action="store_false",
                   help="do not install the C accelerator of greenlet stack chunks "
                        "(docs/speedups.md); GREENSERVE_SPEEDUPS=0 does the same (default: "
                        "installed where it was built)")
    p.add_argument("--no-reclaim-idle", dest="reclaim_idle", action="store_false",
                   help="at --max-connections, never close an idle connection (one waiting "
                        "for its client's next message) to admit a waiting client (default: "
                        "the longest idle is closed, one for each waiting client)")
    p.add_argument("--unix-mode", type=file_mode, metavar="MODE",
                   help="file mode of the unix: socket files, octal, e.g. 660 or 0o660 "
                        "(default: 777 minus the umask)")


def load_handler(spec: str) -> Callable[[Flow, Any], object]:
    """A built-in name or ``module:callable``; ``UsageError`` otherwise."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"unknown handler {spec!r}: use a built-in "
                         f"({', '.join(BUILTINS)}) or module:callable")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m`` does: find the user's module
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for handler {spec!r}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UsageError(f"handler {spec!r}: {module_name!r} has no {attr!r}")
    if not callable(target):
        raise UsageError(f"handler {spec!r} is not callable")
    return target  # type: ignore[no-any-return,unused-ignore]


def systemd_binds(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """``fd://N`` addresses for sockets passed by systemd (``LISTEN_FDS``), if for us."""
    count = environ.get("LISTEN_FDS")
    pid = environ.get("LISTEN_PID")
    if not count or (pid and pid != str(os.getpid())):
        return []
    try:
        n = int(count)
    except ValueError:
        raise UsageError(f"LISTEN_FDS={count!r} is not a number") from None
    return [f"fd://{SD_LISTEN_FDS_START + i}" for i in range(n)]


def parse_bind(text: str) -> Address:
    """A ``--bind`` value as an address to listen on; ``UsageError`` for anything else.

    ``*:PORT`` (also ``tcp://*:PORT``) is every IPv4 interface, as in gevent's
    StreamServer.
    """
    host, sep, port = text.removeprefix("tcp://").rpartition(":")
    candidate = f"0.0.0.0:{port}" if sep and host == ANY_HOST else text
    try:
        addr = parse_address(candidate)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad --bind {text!r}: {exc}") from None
    if not isinstance(addr, (Tcp, Unix, Fd)):
        raise UsageError(f"bad --bind {text!r}: {addr} is a datagram address; greenserve "
                         f"serves stream sockets (tcp, unix, fd)")
    return addr


def _open_listeners(binds: Sequence[str], backlog: int, unix_mode: int | None,
                    sw: Switch) -> list[ListeningSocket]:
    """Bind every address (all checked first); the sockets belong to ``sw``."""
    addresses = [parse_bind(text) for text in binds]
    ours = [a for a in addresses if isinstance(a, Unix) and not a.abstract]
    if unix_mode is not None and not ours:
        raise UsageError("--unix-mode needs a --bind unix:PATH (a socket file to set it on)")
    listeners = []
    for addr in addresses:
        try:
            with _umask_for(addr, unix_mode):
                ls = open_listener(addr, backlog=backlog, reuse_addr=not isinstance(addr, Fd),
                                   sw=sw)
            listeners.append(ls)
            if unix_mode is not None and addr in ours:
                assert isinstance(addr, Unix)
                os.chmod(addr.path, unix_mode)
        except (OSError, ValueError) as exc:
            text = str(exc)
            raise UsageError(text if str(addr) in text else
                             f"cannot listen on {addr}: {text}") from None
    return listeners


@contextmanager
def _umask_for(addr: Address, unix_mode: int | None) -> Iterator[None]:
    """While binding a unix socket file with ``--unix-mode``, a umask that creates it
    with no more permissions than asked (the chmod after the bind makes it exact)."""
    if unix_mode is None or not isinstance(addr, Unix) or addr.abstract:
        yield
        return
    old = os.umask(0o777 & ~unix_mode)
    try:
        yield
    finally:
        os.umask(old)


def _tls_context(args: argparse.Namespace) -> Any:
    if args.keyfile and not args.certfile:
        raise UsageError("--keyfile needs --certfile")
    if not args.certfile:
        return None
    try:
        return _tls.context_from_files(args.certfile, args.keyfile)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load --certfile {args.certfile!r}: {exc}") from None


class Shutdown:
    """What SIGTERM and SIGINT do: the first sets ``stop`` (accepting stops, running
    connections get ``--shutdown-timeout``; run_server logs ``stopping: N connections,
    up to S s``), the second sets ``abort`` (every connection is closed at once).

    With ``--processes``, the children inherit the signal watchers: there they do
    nothing, as each child is told by the parent what to do (SIGTERM / SIGQUIT).
    """

    def __init__(self) -> None:
        self.stop = Event()
        self.abort = Event()
        self.pid = os.getpid()
        self.signals = 0

    def __call__(self) -> None:
        if os.getpid() != self.pid:
            return  # an inherited watcher in a --processes child
        self.signals += 1
        if self.signals == 1:
            self.stop.set()
        else:
            self.abort.set()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, self)


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT."""
    handler = load_handler(args.handler)
    ssl_context = _tls_context(args)
    binds = args.bind or systemd_binds(os.environ) or [DEFAULT_BIND]
    shutdown = Shutdown()
    with Switch(name="greenserve") as sw:
        listeners = _open_listeners(binds, args.backlog, args.unix_mode, sw)
        shutdown.install()
        for ls in listeners:
            print(f"listening on {ls.address}", flush=True)
        log.info("serving %s on %s", args.handler,
                 ", ".join(str(ls.address) for ls in listeners))
        net.serve_listeners(
            listeners, handler, on_error=_log_error, max_connections=args.max_connections,
            additional_processes=args.processes - 1, stop=shutdown.stop,
            abort=shutdown.abort, drain_timeout=args.shutdown_timeout,
            ssl_context=ssl_context, proxy_protocol=args.proxy_protocol,
            idle_timeout=args.idle_timeout, reclaim_idle=args.reclaim_idle)
        log.info("stopped")


def _log_error(exc: Exception) -> None:
    log.error("handler failed", exc_info=exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``greenserve`` and ``python -m greenserve``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=LOG_FORMAT)
        speedups.install_default(args.speedups)  # before --processes forks: children keep it
        run(args)
    except UsageError as exc:
        print(f"greenserve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a listening socket broke while serving (logged already)
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        print(f"greenserve: error: {exc}{notes}", file=sys.stderr)
        return 1
    return 0
