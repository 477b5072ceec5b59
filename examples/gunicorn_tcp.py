"""A raw TCP handler run by gunicorn's arbiter on greenserve's engine.

    gunicorn -k greenserve.gunicorn.TCPWorker --bind 127.0.0.1:9000 -w 2 \\
        --worker-connections 10000 --pythonpath examples gunicorn_tcp:handler

Try it with ``nc 127.0.0.1 9000``: every line comes back. gunicorn supervises the
workers (restarts, ``max_requests`` counted in connections, SIGHUP reloads); SIGTERM
refuses new connections at once and gives open ones ``--graceful-timeout`` seconds.
"""

import logging

log = logging.getLogger("gunicorn.error")


def handler(flow, addr):
    """Echo every line; ``flow`` is a greenserve.Flow, ``addr`` the client's address."""
    log.info("connection from %s", addr)
    while data := flow.read():
        flow.write(data)
