"""Echo server: greenserve.tcp.Server.create (Async-style face).

--max-accepts-per-batch is passed through to the server (scenario f).
"""

from __future__ import annotations

import argparse

from greenserve import tcp

CHUNK = 65536  # same read size for every server in the benchmark


def handle(addr: object, reader: tcp.Reader, writer: tcp.Writer) -> None:
    while data := reader.read(CHUNK):
        writer.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-accepts-per-batch", type=int, default=None)
    args = parser.parse_args()
    options = {}
    if args.max_accepts_per_batch is not None:
        options["max_accepts_per_batch"] = args.max_accepts_per_batch
    server = tcp.Server.create(
        tcp.WhereToListen.bind_to("127.0.0.1", args.port),
        handle,
        on_handler_error="ignore",  # a client reset is not a benchmark failure
        **options,
    )
    print("LISTENING", server.listening_on, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
