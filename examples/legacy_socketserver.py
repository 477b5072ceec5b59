from gevent import monkey; monkey.patch_all()  # noqa: E702, I001  (before every other import)
# ruff: noqa: E402  (the imports below must come after the patching above)

# A legacy, blocking ``socketserver`` handler served unchanged by greenserve.
#
#     python examples/legacy_socketserver.py [ADDRESS] [GRACE]   (default 127.0.0.1:8000, 5 s)
#
# ``LegacyHandler`` was written for ``socketserver.ThreadingTCPServer``: blocking socket
# calls, ``time.sleep``, ``threading.local`` state, a ``threading.Condition``. After
# ``monkey.patch_all()`` — the first line, so that every module imported afterwards
# (socketserver, threading, your own code) sees the cooperative versions — greenserve's
# StreamServer runs each connection in a greenlet instead of a thread, and all of that
# keeps working, concurrently. Protocol, one command per line:
#
#     ECHO text      -> text
#     SLEEP seconds  -> slept   (a blocking call: other clients are served meanwhile)
#     MEET n         -> met n as host:port, once n clients have come to MEET (each
#                       waits for the others: only concurrent handlers get through)
#
# SIGTERM/SIGINT stop it: no new connections, handlers get GRACE seconds to finish.

import signal
import socketserver
import sys
import threading
import time

import gevent
from gevent.event import Event

from greenserve.server import StreamServer

_local = threading.local()       # per connection (per "thread") state
_meeting = threading.Condition()
_inside = 0


def meet(n: int) -> None:
    """Block until ``n`` handlers have come here (a legacy threading rendezvous)."""
    global _inside
    with _meeting:
        _inside += 1
        _meeting.notify_all()
        if not _meeting.wait_for(lambda: _inside >= n, timeout=30):
            raise TimeoutError(f"only {_inside} of {n} clients met")


class LegacyHandler(socketserver.BaseRequestHandler):
    """Unchanged code from a ThreadingTCPServer application."""

    def handle(self) -> None:
        host, port = self.client_address[:2]
        _local.peer = f"{host}:{port}"
        with self.request.makefile("rb") as lines:
            for line in lines:
                command, _, arg = line.decode().strip().partition(" ")
                if command == "ECHO":
                    reply = arg
                elif command == "SLEEP":
                    time.sleep(float(arg))
                    reply = "slept"
                elif command == "MEET":
                    meet(int(arg))
                    reply = f"met {arg} as {_local.peer}"
                else:
                    reply = f"unknown command {command!r}"
                self.request.sendall(reply.encode() + b"\n")


def main(address: str = "127.0.0.1:8000", grace: str = "5") -> None:
    # socketserver's handler takes (request, client_address, server) and does its work
    # in __init__: that is all the glue there is.
    server = StreamServer(address, lambda sock, addr: LegacyHandler(sock, addr, server))
    server.start()
    print(f"listening on {server.server_host}:{server.server_port}", flush=True)
    stop = Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    stop.wait()
    server.stop(timeout=float(grace))
    print("stopped", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
