"""A run_server echo server with a tiny fd limit (run by tests/test_net.py)."""

import logging
import resource
import sys

from greenserve import Switch, Tcp, net

limit = int(sys.argv[1])
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="LOG %(message)s")
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def echo(flow, addr):
    while data := flow.read():
        flow.write(data)


with Switch() as sw:
    lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw, backlog=1024)
    print(lsock.address.port, flush=True)
    net.run_server(lsock, echo, on_error=lambda exc: logging.error("handler: %r", exc))
