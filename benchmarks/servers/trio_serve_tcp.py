"""Echo server: trio.serve_tcp with a SocketStream handler."""

from __future__ import annotations

import argparse
from functools import partial

import trio

CHUNK = 65536  # same read size for every server in the benchmark


async def handle(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(CHUNK):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass  # the client reset the connection


async def serve(port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))
        print("LISTENING", listeners[0].socket.getsockname()[1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    trio.run(serve, args.port)


if __name__ == "__main__":
    main()
