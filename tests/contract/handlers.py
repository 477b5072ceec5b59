"""The handler contract every face runs, whatever its handler signature.

A client sends one request line; the handler answers according to its command:

``peer``
    one line naming the peer the handler was given (:func:`peer_text`), then the handler
    returns (the face closes the connection).
``echo``
    everything after the line is sent back until the client closes.
``big N``
    N bytes of a fixed pattern (:func:`block`), written in 64 KiB writes, then a flush
    where the face has one; then the handler returns.
``hold``
    one line ``held K`` (K: handlers holding right now, this one included), then it
    blocks until the client sends anything (answered with ``bye``) or goes away.
``mark TEXT``
    writes ``contract-mark TEXT`` on the process's stderr, then answers ``marked``: a
    subprocess face's log is in order, so the mark splits it into before and after.

The handler is written as users write theirs (greenserve's own ``echo`` built-in, the
README's examples): it does not catch the errors of its own connection. A reset peer
raises out of it, and what happens then is the face's business.

This module is imported by the subprocess faces too (``tests.contract.handlers:serve``
for the command and for gunicorn's ``TCPWorker``): stdlib and greenserve only.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from typing import Any

from gevent.event import Event

from greenserve.address import Tcp, Unix

BLOCK = 65536
MAX_LINE = 1024


def block(i: int) -> bytes:
    """The ``i``-th 64 KiB block of what ``big`` sends: distinct per block, so a
    reordered, repeated or lost block changes the digest."""
    return hashlib.sha256(b"block %d" % i).digest() * (BLOCK // 32)


def big_digest(n: int) -> str:
    """The SHA-256 of the ``n`` bytes ``big n`` sends."""
    h = hashlib.sha256()
    for i, size in _blocks(n):
        h.update(block(i)[:size])
    return h.hexdigest()


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(i, min(BLOCK, n - off)) for i, off in enumerate(range(0, n, BLOCK))]


def _unix_bytes(path: str | bytes) -> bytes:
    return path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")


def peer_text(peer: Any) -> bytes:
    """The peer a handler was given, in one canonical form for every face:
    ``tcp <host> <port>`` or ``unix <hex of the path's bytes>`` (empty: unnamed).

    greenserve's faces give ``Tcp``/``Unix`` objects; ``StreamServer`` gives gevent's
    ``(host, port[, flow, scope])`` tuples and unix paths (``str``, or ``bytes``)."""
    if isinstance(peer, Tcp):
        return b"tcp %s %d" % (peer.host.encode(), peer.port)
    if isinstance(peer, Unix):
        return b"unix " + _unix_bytes(peer.path).hex().encode()
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(peer[1], int):
        return b"tcp %s %d" % (str(peer[0]).encode(), peer[1])
    if isinstance(peer, (str, bytes)):
        return b"unix " + _unix_bytes(peer).hex().encode()
    return b"other " + repr(peer).encode()


class Probe:
    """What the handlers did, seen from inside them: how many hold now, the most that
    ever held at once, how many started and finished, how they ended. ``changed`` is set
    on every change (a waiter clears it, then checks its condition)."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.started = 0
        self.finished = 0
        self.ended_with: list[str] = []  # repr of what ended a handler other than a return
        self.changed = Event()

    def _note(self) -> None:
        self.changed.set()

    def __repr__(self) -> str:
        return (f"<Probe running={self.running} peak={self.peak} started={self.started} "
                f"finished={self.finished} ended_with={self.ended_with}>")


# -- connections as each face hands them over ---------------------------------------------


class Conn:
    """The three things the protocol needs: receive (``b""`` at end of file), send (all
    of it, or buffered), flush (where the face buffers)."""

    def recv(self) -> bytes:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass


class FlowConn(Conn):
    """A ``greenserve.Flow`` (``net``, gunicorn's ``TCPWorker``, the command)."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow

    def recv(self) -> bytes:
        data: bytes = self.flow.read(BLOCK)
        return data

    def send(self, data: bytes) -> None:
        self.flow.write(data)


class SockConn(Conn):
    """A gevent socket, plain or TLS (``tcp.Server.create_sock``, ``StreamServer``)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def recv(self) -> bytes:
        data: bytes = self.sock.recv(BLOCK)
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class StreamConn(Conn):
    """A ``tcp.Reader`` and ``tcp.Writer`` (``tcp.Server.create``): writes never block,
    ``flush`` waits until the kernel took everything."""

    def __init__(self, reader: Any, writer: Any) -> None:
        self.reader, self.writer = reader, writer

    def recv(self) -> bytes:
        data: bytes = self.reader.read(BLOCK)
        return data

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def flush(self) -> None:
        self.writer.flush()


# -- the protocol ------------------------------------------------------------------------


def _read_line(conn: Conn) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise ValueError(f"request line longer than {MAX_LINE} bytes: {buf[:40]!r}...")
        data = conn.recv()
        if not data:
            return None, b""
        buf += data
    line, _, rest = buf.partition(b"\n")
    return line.strip(), rest


def run(conn: Conn, peer: Any, probe: Probe) -> None:
    """Serve one connection by the contract (see the module docstring)."""
    probe.started += 1
    probe._note()
    try:
        _run(conn, peer, probe)
    except BaseException as exc:
        probe.ended_with.append(repr(exc))
        raise
    finally:
        probe.finished += 1
        probe._note()


def _run(conn: Conn, peer: Any, probe: Probe) -> None:
    line, rest = _read_line(conn)
    if line is None:
        return
    cmd, *args = line.split()
    if cmd == b"peer":
        conn.send(peer_text(peer) + b"\n")
    elif cmd == b"echo":
        if rest:
            conn.send(rest)
        while data := conn.recv():
            conn.send(data)
    elif cmd == b"big":
        for i, size in _blocks(int(args[0])):
            conn.send(block(i)[:size])
    elif cmd == b"mark":
        sys.stderr.write(f"contract-mark {b' '.join(args).decode()}\n")
        sys.stderr.flush()
        conn.send(b"marked\n")
    elif cmd == b"hold":
        probe.running += 1
        probe.peak = max(probe.peak, probe.running)
        probe._note()
        try:
            conn.send(b"held %d\n" % probe.running)
            conn.flush()
            released = rest or conn.recv()
        finally:
            probe.running -= 1
            probe._note()
        if released:
            conn.send(b"bye\n")
    else:
        conn.send(b"unknown command %r\n" % line)
    conn.flush()


# -- the handler as each face calls it --------------------------------------------------------


def flow_handler(probe: Probe) -> Callable[[Any, Any], None]:
    """``handler(flow, addr)``: ``net.run_server``/``serve_listeners``, gunicorn, the CLI."""
    def handler(flow: Any, addr: Any) -> None:
        run(FlowConn(flow), addr, probe)
    return handler


def streams_handler(probe: Probe) -> Callable[[Any, Any, Any], None]:
    """``handler(addr, reader, writer)``: ``tcp.Server.create``."""
    def handler(addr: Any, reader: Any, writer: Any) -> None:
        run(StreamConn(reader, writer), addr, probe)
    return handler


def sock_handler(probe: Probe) -> Callable[[Any, Any], None]:
    """``handler(addr, sock)``: ``tcp.Server.create_sock``."""
    def handler(addr: Any, sock: Any) -> None:
        run(SockConn(sock), addr, probe)
    return handler


def gevent_handler(probe: Probe) -> Callable[[Any, Any], None]:
    """``handle(socket, address)``: ``StreamServer`` (gevent's signature)."""
    def handle(sock: Any, address: Any) -> None:
        run(SockConn(sock), address, probe)
    return handle


# The subprocess faces load this: ``tests.contract.handlers:serve``. One process, one
# server: the module-level probe is that server's (``hold`` reports its count).
PROBE = Probe()
serve = flow_handler(PROBE)
