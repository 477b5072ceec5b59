"""A UDP echo server: ``python examples/udp_echo.py [ADDRESS]`` (default udp://127.0.0.1:8001).

Try it with ``nc -u 127.0.0.1 8001``. Ctrl-C or SIGTERM stops it.
"""

import signal
import sys

import gevent

from greenserve import Cancelled, Switch, net


def serve(sw, address):
    sock = net.datagram_socket(address, sw=sw, reuse_addr=True)
    print(f"udp echo server listening on {sock.address}", flush=True)
    buf = bytearray(65536)
    while True:
        sender, n = sock.recv(buf)
        sock.send(sender, memoryview(buf)[:n])


def main(address="udp://127.0.0.1:8001"):
    with Switch() as sw:
        for sig in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(sig, sw.cancel)
        try:
            serve(sw, address)
        except Cancelled:
            print("stopped", flush=True)
            raise


if __name__ == "__main__":
    main(*sys.argv[1:])
