"""run_server with additional_processes (run by tests/test_net.py).

Each process serves one connection at a time and answers with its pid, so that
held-open connections must land on different processes. SIGTERM sets ``stop``.
"""

import logging
import os
import signal
import sys

import gevent
from gevent.event import Event

from greenserve import Switch, Tcp, net

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="LOG %(message)s")


def handler(flow, addr):
    flow.write(b"%d\n" % os.getpid())
    while flow.read():
        pass


stop = Event()
with Switch() as sw:
    lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
    print(lsock.address.port, flush=True)
    gevent.signal_handler(signal.SIGTERM, stop.set)
    net.run_server(lsock, handler, on_error=lambda exc: logging.error("%r", exc),
                   max_connections=1, additional_processes=int(sys.argv[1]), stop=stop)
print("stopped", flush=True)
