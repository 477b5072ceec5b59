"""Small shared helpers for the tests: real loopback sockets only."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gevent import socket as gsocket

from greenserve import Switch, Tcp, net
from greenserve.flow import Flow


@contextmanager
def connected_pair() -> Iterator[tuple[Flow, Flow]]:
    """A (client, server) pair of Flows over 127.0.0.1, closed afterwards."""
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        client = net.connect(lsock.address, sw=sw)
        server, _ = lsock.accept(sw=sw)
        lsock.close()
        yield client, server


def client(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> gsocket.socket:
    """A connected gevent client socket."""
    return gsocket.create_connection((host, port), timeout=timeout)


def reset(sock: socket.socket | gsocket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def recv_all(sock: gsocket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def closed_by_server(sock: socket.socket | gsocket.socket, timeout: float = 5.0) -> bool:
    """True if the server closed the connection within ``timeout`` seconds: end of file,
    or a reset (it closed with data unread). False if it is still open then. What the
    server sends before closing (a TLS alert) is read and dropped. The socket's own
    timeout is left as it was."""
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:  # socket.timeout: nothing arrived, not even end of file
        pass
    finally:
        sock.settimeout(previous)
    return False


def shut_down_reading(sock: Any) -> None:
    """``shutdown(SHUT_RD)`` on ``sock``'s kernel socket, through a duplicate of its fd
    (shutdown acts on the socket that both fds share), closed afterwards. A listening
    socket so shut down fails ``accept`` with ``EINVAL``: broken under its server."""
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        dup.shutdown(socket.SHUT_RD)
    finally:
        dup.close()


def make_acceptor(listeners: list[Any], handler: Any, *, sw: Switch, **kw: Any) -> Any:
    """An engine over ``listeners``: keyword arguments that are server options (limits,
    TLS, PROXY, idle timeout) go into its ``ServerOptions``, the rest to ``Acceptor``."""
    from dataclasses import fields

    from greenserve._acceptor import Acceptor, ServerOptions

    names = {f.name for f in fields(ServerOptions)}
    options = ServerOptions(**{k: v for k, v in kw.items() if k in names})
    rest = {k: v for k, v in kw.items() if k not in names}
    return Acceptor(listeners, handler, options, sw=sw, **rest)


def tls_over(raw: Any, ctx: Any, hostname: str | None = "localhost", *,
             server_side: bool = False) -> Any:
    """A gevent TLS socket over the connected gevent socket ``raw`` (a client, or the
    server side), handshake done: through greenserve's one gevent boundary, as the
    library wraps its own sockets."""
    from greenserve import _gevent

    tls = _gevent.tls_wrap(raw, ctx, server_side=server_side,
                           server_hostname=None if server_side else hostname)
    try:
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
