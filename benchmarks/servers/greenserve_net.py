"""Echo server: greenserve.net.run_server (Eio-style face) under a greenserve.Switch;
--speedups installs the C accelerator first (docs/speedups.md)."""

from __future__ import annotations

import argparse
import sys

import greenserve
from greenserve import net

CHUNK = 65536  # same read size for every server in the benchmark


def handle(flow: greenserve.Flow, addr: object) -> None:
    try:
        while data := flow.read(CHUNK):
            flow.write(data)
    except OSError:
        pass  # ConnectionReset: the client reset the connection


def ignore(exc: BaseException) -> None:
    pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--speedups", action="store_true", help="greenserve.speedups.install()")
    args = parser.parse_args()
    if args.speedups:
        from greenserve import speedups

        if not speedups.install():  # the runner reports the row n/a, with this reason
            sys.exit(f"greenserve.speedups not installed: {speedups.reason()}")
    with greenserve.Switch() as sw:
        lsock = net.listen(greenserve.Tcp("127.0.0.1", args.port), sw=sw, reuse_addr=True)
        print("LISTENING", lsock.address.port, flush=True)
        net.run_server(lsock, handle, on_error=ignore)


if __name__ == "__main__":
    main()
