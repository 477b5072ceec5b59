"""A line-based key-value server on ``greenserve.tcp`` (Jane Street Async's ``Tcp.Server``).

    python examples/kv_server.py [--bind ADDRESS] [--max-connections N] [--max-line BYTES]
                                 [--grace SECONDS]

``--bind`` takes anything ``greenserve.parse_address`` takes (default 127.0.0.1:8000).
Try it with ``nc 127.0.0.1 8000``. One command per line, one answer line per command:

    SET key value   -> OK               (the value is the rest of the line, spaces included)
    GET key         -> VALUE value      or NOT_FOUND
    DEL key         -> DELETED          or NOT_FOUND
    KEYS            -> KEYS key1 key2   (sorted)
    QUIT            -> BYE, then the server closes the connection

Anything else is answered with an ``ERR ...`` line. A line longer than ``--max-line``
bytes is answered with ``ERR line too long`` and the connection is closed.

SIGINT/SIGTERM stop it gracefully: the listening socket is closed at once, connected
clients get ``--grace`` seconds to finish, then their connections are closed. A second
SIGINT/SIGTERM closes them at once.
"""

import argparse
import functools
import logging
import signal

import gevent

from greenserve import LineTooLong, tcp

log = logging.getLogger("kv")


class Usage(Exception):
    """A known command with the wrong arguments; the message is its usage."""


def cmd_set(store, args):
    key, space, value = args.partition(" ")
    if not key or not space:
        raise Usage("SET key value")
    store[key] = value
    return "OK"


def cmd_get(store, args):
    key = single_key(args, "GET key")
    return f"VALUE {store[key]}" if key in store else "NOT_FOUND"


def cmd_del(store, args):
    key = single_key(args, "DEL key")
    return "DELETED" if store.pop(key, None) is not None else "NOT_FOUND"


def cmd_keys(store, args):
    if args:
        raise Usage("KEYS")
    return " ".join(["KEYS", *sorted(store)])


def single_key(args, usage):
    if not args or " " in args:
        raise Usage(usage)
    return args


COMMANDS = {"SET": cmd_set, "GET": cmd_get, "DEL": cmd_del, "KEYS": cmd_keys}


def execute(store, line):
    """Run one command line against ``store`` and return the answer line."""
    name, _, args = line.partition(" ")
    command = COMMANDS.get(name.upper())
    if command is None:
        return f"ERR unknown command {name!r}"
    try:
        return command(store, args)
    except Usage as usage:
        return f"ERR usage: {usage}"


def serve_client(store, max_line, addr, reader, writer):
    """One connection, in its own greenlet. When this returns (or raises), the server
    closes the writer (flushing what is still buffered) and then the reader."""
    log.info("%s connected", addr)
    try:
        while (raw := reader.read_line(max_length=max_line)) is not None:
            try:
                line = raw.decode()
            except UnicodeDecodeError:
                writer.write(b"ERR line is not UTF-8\n")
                continue
            if line.upper() == "QUIT":
                writer.write(b"BYE\n")
                return
            writer.write(execute(store, line).encode() + b"\n")  # buffered: never blocks
    except LineTooLong:
        # The reader refuses to buffer more than about max_line bytes: answer and hang up.
        log.warning("%s sent a line longer than %d bytes: closing", addr, max_line)
        writer.write(b"ERR line too long\n")
    finally:
        log.info("%s disconnected", addr)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="A line-based key-value server.")
    parser.add_argument("--bind", default="127.0.0.1:8000", help="address to listen on")
    parser.add_argument("--max-connections", type=int, default=1000,
                        help="clients served at once; more wait in the listen backlog")
    parser.add_argument("--max-line", type=int, default=1024, help="longest command line")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds clients get to finish after SIGINT/SIGTERM")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Shared by every connection. Greenlets switch only where they block (reads), so a
    # command runs from start to end without another one in between: no lock is needed.
    store = {}
    server = tcp.Server.create(
        args.bind, functools.partial(serve_client, store, args.max_line),
        max_connections=args.max_connections,
        # A bug in serve_client is logged; the server goes on serving the others.
        on_handler_error=lambda addr, exc: log.error("%s: handler failed", addr, exc_info=exc))

    def on_signal():
        if server.is_closed:
            # The second signal: close the clients' connections too, now.
            server.close(close_existing_connections=True)
        server.close()  # the first: stop accepting, keep the clients

    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, on_signal)
    print(f"kv server listening on {server.listening_on_address}", flush=True)

    server.close_finished.wait()  # until a signal closes the listening socket
    print(f"stopping: {server.num_connections} connection(s) open, "
          f"{args.grace} s to finish", flush=True)
    if not server.wait(timeout=args.grace):  # every handler returned in time?
        log.info("closing %d connection(s) still open", server.num_connections)
        server.close(close_existing_connections=True)  # handlers get greenserve.Cancelled
        server.wait()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
