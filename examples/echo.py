"""An Eio-style echo server: ``python examples/echo.py [ADDRESS] [DRAIN]`` (default
127.0.0.1:8000, 5 seconds).

Try it with ``nc 127.0.0.1 8000``. Ctrl-C or SIGTERM stops it: accepting stops at once,
connections still open get DRAIN seconds to finish, then are closed; a second Ctrl-C
(or SIGTERM) closes them at once.
"""

import logging
import signal
import sys

import gevent
from gevent.event import Event

from greenserve import Switch, net

# Long enough for a client in the middle of something to finish; short enough that
# Ctrl-C feels like Ctrl-C.
DEFAULT_DRAIN = 5.0


def echo(flow, addr):
    while data := flow.read():
        flow.write(data)


def main(address="127.0.0.1:8000", drain=DEFAULT_DRAIN):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = Event()
    with Switch() as sw:

        def on_signal():
            if stop.is_set():
                sw.cancel()  # the second signal: every handler is cancelled now
            stop.set()       # the first: stop accepting, let handlers finish

        for sig in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(sig, on_signal)
        lsock = net.listen(address, sw=sw, reuse_addr=True)
        print(f"echo server listening on {lsock.address}", flush=True)
        net.run_server(lsock, echo, max_connections=10_000, stop=stop,
                       drain_timeout=float(drain),
                       on_error=lambda exc: logging.getLogger("echo").warning("%s", exc))
    print("stopped", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
