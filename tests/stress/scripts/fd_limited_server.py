"""An echo StreamServer under a low RLIMIT_NOFILE (run by tests/stress/test_fd_exhaustion.py).

``python fd_limited_server.py LIMIT``: prints the port, then obeys one command per
line on stdin, answering each with one line on stdout:

- ``stats``: the server's ``stats()`` and the process's open fd count, as JSON.
- ``fill``: open ``/dev/null`` until the fd limit is reached (ballast: fds used by
  something other than connections); answers the count.
- ``free``: close the ballast; answers the count.
- ``stop`` (or end of input): stop the server and exit 0.

Log lines go to stderr, prefixed ``LOG``.
"""

import json
import logging
import os
import resource
import sys

import gevent.os

from greenserve.server import StreamServer

limit = int(sys.argv[1])
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="LOG %(message)s")
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def echo(sock, address):
    while data := sock.recv(65536):
        sock.sendall(data)


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fd_count():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # listing needs an fd of its own: none left
        return None


def fill(ballast):
    while True:
        try:
            ballast.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return


def commands():
    gevent.os.make_nonblocking(0)
    pending = b""
    while True:
        data = gevent.os.nb_read(0, 4096)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            yield line.decode().strip()


server = StreamServer(("127.0.0.1", 0), echo, backlog=1024)
server.start()
print(server.server_port, flush=True)
ballast = []
for command in commands():
    if command == "stats":
        reply({**server.stats(), "fds": fd_count()})
    elif command == "fill":
        fill(ballast)
        reply(len(ballast))
    elif command == "free":
        for fd in ballast:
            os.close(fd)
        reply(len(ballast))
        ballast.clear()
    elif command == "stop":
        break
server.stop(timeout=1)
reply("stopped")
