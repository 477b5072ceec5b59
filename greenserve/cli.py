"""The ``greenserve`` command: serve a ``handler(flow, addr)`` on one or more addresses.

``greenserve HANDLER [--bind ADDR ...] [--max-connections N] [--backlog N]
[--processes N] [--log-level LEVEL] [--certfile F --keyfile F] [--proxy-protocol]
[--idle-timeout S] [--shutdown-timeout S]``

``HANDLER`` is ``module:callable`` or a built-in: ``echo``, ``discard``, ``daytime``.
Bad input (unknown handler, bad address, port in use, ...) prints one line on stderr
and exits with status 2. SIGTERM/SIGINT stop gracefully (exit status 0): accepting stops
at once, running connections get ``--shutdown-timeout`` seconds, then are closed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import gevent
from gevent.event import Event

from . import _tls, net
from ._version import __version__
from .address import Fd, parse_address
from .flow import Flow, ListeningSocket, open_listener
from .switch import Switch

__all__ = ["BUILTINS", "main"]

log = logging.getLogger("greenserve")

DEFAULT_BIND = "127.0.0.1:8000"
# Long enough for a request in flight to finish; short enough for a deploy's restart.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
# systemd's socket activation passes its sockets from fd 3 on (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3


def echo(flow: Flow, addr: Any) -> None:
    """Send back everything received."""
    while data := flow.read():
        flow.write(data)


def discard(flow: Flow, addr: Any) -> None:
    """Read and drop everything (RFC 863)."""
    while flow.read():
        pass


def daytime(flow: Flow, addr: Any) -> None:
    """Send the current time as text and close (RFC 867)."""
    flow.write(time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n").encode())


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
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    return convert


def _parser() -> _Parser:
    p = _Parser(prog="greenserve", description="Serve a handler(flow, addr) over TCP/unix.")
    p.add_argument("handler", help="module:callable, or a built-in: echo, discard, daytime")
    p.add_argument("--bind", "-b", action="append", metavar="ADDR",
                   help=f"address to listen on (repeatable; default {DEFAULT_BIND}, "
                        "or systemd's LISTEN_FDS when set)")
    p.add_argument("--max-connections", type=_positive(int), default=10_000, metavar="N")
    p.add_argument("--backlog", type=_positive(int), default=1024, metavar="N")
    p.add_argument("--processes", type=_positive(int), default=1, metavar="N",
                   help="serving processes sharing the sockets (default 1)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("--certfile", help="serve TLS with this certificate (PEM)")
    p.add_argument("--keyfile", help="private key for --certfile (PEM)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="expect a PROXY protocol (v1/v2) header on every connection")
    p.add_argument("--idle-timeout", type=_positive(float), metavar="S",
                   help="close connections that receive nothing for S seconds")
    p.add_argument("--shutdown-timeout", type=_positive(float),
                   default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="S",
                   help="on SIGTERM/SIGINT, close connections still open after S seconds")
    p.add_argument("--version", action="version", version=f"greenserve {__version__}")
    return p


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


def _open_listeners(binds: Sequence[str], backlog: int, sw: Switch) -> list[ListeningSocket]:
    addresses = []
    for text in binds:
        try:
            addresses.append(parse_address(text))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"bad --bind {text!r}: {exc}") from None
    listeners = []
    for addr in addresses:
        try:
            listeners.append(open_listener(addr, backlog=backlog, reuse_addr=not isinstance(
                addr, Fd), sw=sw))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot listen on {addr}: {exc}") from None
    return listeners


def _tls_context(args: argparse.Namespace) -> Any:
    if args.keyfile and not args.certfile:
        raise UsageError("--keyfile needs --certfile")
    if not args.certfile:
        return None
    try:
        return _tls.context_from_files(args.certfile, args.keyfile)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load --certfile {args.certfile!r}: {exc}") from None


def run(args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT."""
    handler = load_handler(args.handler)
    ssl_context = _tls_context(args)
    binds = args.bind or systemd_binds(os.environ) or [DEFAULT_BIND]
    stop = Event()
    with Switch(name="greenserve") as sw:
        listeners = _open_listeners(binds, args.backlog, sw)
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, stop.set)
        for ls in listeners:
            print(f"listening on {ls.address}", flush=True)
        log.info("serving %s on %s (pid %d)", args.handler,
                 ", ".join(str(ls.address) for ls in listeners), os.getpid())
        net.serve_listeners(
            listeners, handler, on_error=_log_error, max_connections=args.max_connections,
            additional_processes=args.processes - 1, stop=stop,
            drain_timeout=args.shutdown_timeout, ssl_context=ssl_context,
            proxy_protocol=args.proxy_protocol, idle_timeout=args.idle_timeout)
        log.info("stopped")


def _log_error(exc: Exception) -> None:
    log.error("handler failed", exc_info=exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``greenserve`` and ``python -m greenserve``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run(args)
    except UsageError as exc:
        print(f"greenserve: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a listening socket broke while serving (logged already)
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        print(f"greenserve: error: {exc}{notes}", file=sys.stderr)
        return 1
    return 0
