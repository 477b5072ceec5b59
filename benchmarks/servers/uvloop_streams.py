"""Echo server: asyncio streams on uvloop's event loop."""

from __future__ import annotations

import argparse

import uvloop

from asyncio_streams import serve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
