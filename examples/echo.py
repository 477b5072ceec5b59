"""An Eio-style echo server: ``python examples/echo.py [ADDRESS]`` (default 127.0.0.1:8000).

Try it with ``nc 127.0.0.1 8000``. Ctrl-C or SIGTERM stops it gracefully: accepting
stops at once and connections still open are given their handlers' time to finish.
"""

import logging
import signal
import sys

import gevent
from gevent.event import Event

from greenserve import Switch, net


def echo(flow, addr):
    while data := flow.read():
        flow.write(data)


def main(address="127.0.0.1:8000"):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    with Switch() as sw:
        lsock = net.listen(address, sw=sw, reuse_addr=True)
        print(f"echo server listening on {lsock.address}", flush=True)
        net.run_server(lsock, echo, max_connections=10_000, stop=stop,
                       on_error=lambda exc: logging.getLogger("echo").warning("%s", exc))
    print("stopped", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
