"""Echo server: gevent.server.StreamServer with a gevent.pool.Pool(10000) (the baseline)."""

from __future__ import annotations

import argparse

import gevent.pool
import gevent.server

CHUNK = 65536  # same read size for every server in the benchmark


def handle(sock, addr):
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass  # the client reset the connection: nothing to echo to


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = gevent.server.StreamServer(
        ("127.0.0.1", args.port), handle, spawn=gevent.pool.Pool(10000)
    )
    server.start()
    print("LISTENING", server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
