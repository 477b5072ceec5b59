"""A WSGI application served by gunicorn with greenserve's worker.

    gunicorn -k greenserve.gunicorn.Worker --bind 127.0.0.1:8000 --bind 127.0.0.1:8001 \\
        --worker-connections 1000 --graceful-timeout 30 --pythonpath examples gunicorn_app:app

Try ``curl http://127.0.0.1:8000/`` and ``curl http://127.0.0.1:8000/slow``, then send
SIGTERM to the arbiter while ``/slow`` runs: new connections are refused at once, idle
keep-alive connections are closed at once, and ``/slow`` still gets its answer.
``worker_connections`` is one limit per worker for both binds together. Add
``--certfile cert.pem --keyfile key.pem`` for HTTPS.

The worker monkey-patches its process (``gevent.monkey.patch_all()``) before loading
this module, so blocking stdlib calls here (``time.sleep``, sockets, ``requests``)
yield to other requests instead of blocking the worker.
"""

import os
import time


def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(5)  # patched: only this request waits
    body = f"Hello from greenserve's gunicorn worker (pid {os.getpid()})\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
