"""The one place greenserve reaches into gevent's (and the stdlib socket's) internals.

gevent's public socket API waits in the calling greenlet, which is right for handlers
but wrong for the hub: a hub callback must never wait, and the engine's abort must not
throw into a greenlet blocked on the socket. What greenserve needs below that API is
here, each use with a test in tests/test_gevent_boundary.py that fails if a gevent
release changes it:

- ``sock._sock``: the stdlib socket under a gevent socket (non-blocking at the OS level);
  gevent swaps it for a placeholder when the socket is closed or detached (a TLS wrapper
  takes the fd over).
- ``sock._wait(sock._read_event)``: wait for readability without a timeout object.
- ``_socket.socket._accept()``: accept without building a socket object.
- ``SSLSocket(sock=..., _context=...)``: wrap with a stdlib ``SSLContext`` as is.
- ``SSLSocket._sslobj.write``: one TLS write that never waits (gevent's ``send``
  honours the socket's timeout, not its ``timeout`` argument, and waits).
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import select
import socket as _stdsocket
import ssl
import sys
import termios
from typing import Any

from gevent import monkey
from gevent import socket as gsocket
from gevent import ssl as gssl

__all__ = ["EVENTS", "READ", "WRITE", "accept_raw", "bytes_received", "has_unread", "holds",
           "kernel_shutdown", "peer_gone", "queued", "raw_send", "raw_socket", "receive",
           "tls_send_nowait", "tls_wrap", "wait_readable"]

_LITTLE = sys.byteorder == "little"
# The peer shut down its sending side (Linux: POLLRDHUP; the stdlib names it on Linux).
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
# The standard library's poll, never gevent's (under monkey-patching the CLI and the
# gunicorn workers have it replaced by one that may wait): this must answer now.
_poll = monkey.get_original("select", "poll")

# libev's event masks (a watcher's ``events`` may carry flags of libev's own above them).
READ = 1
WRITE = 2
EVENTS = READ | WRITE


def raw_socket(sock: Any) -> _socket.socket | None:
    """The open stdlib socket under a gevent socket; ``None`` once closed or detached."""
    raw = getattr(sock, "_sock", None)
    if isinstance(raw, _socket.socket) and raw.fileno() >= 0:
        return raw
    return None


def holds(sock: Any, raw: _socket.socket) -> bool:
    """True while the gevent socket ``sock`` still holds ``raw`` (``raw_socket(sock)``
    from before): it was not closed or detached since. Cheap: for hot paths."""
    return sock._sock is raw


def kernel_shutdown(sock: Any, how: int = _stdsocket.SHUT_RDWR, *, quiet: bool = True) -> None:
    """``shutdown(2)`` on a gevent socket, bypassing gevent's ``shutdown``.

    gevent's throws ``EBADF`` into a greenlet blocked on the socket; the kernel's makes
    a blocked ``recv`` return end of file and a blocked ``send`` fail with ``EPIPE``.
    A closed or detached socket (its fd now belongs to a TLS wrapper) is left alone.
    ``quiet``: ignore errors (never connected, the peer gone already); else raise them.
    """
    raw = raw_socket(sock)
    if raw is None:
        if quiet:
            return
        raise OSError(errno.EBADF, "Bad file descriptor")
    try:
        raw.shutdown(how)
    except OSError:
        if not quiet:
            raise


def peer_gone(sock: Any, *, sending_ended: bool = False) -> bool:
    """True if the peer of a connected stream socket has gone, as the kernel's state of
    the connection says (``poll``, never waiting, whatever is still queued to read):
    it reset, or the connection is closed both ways (``POLLHUP``/``POLLERR``). With
    ``sending_ended``, also when the peer only finished sending (``POLLRDHUP``: its end
    of file), for an error that is about its data ending. False while the connection is
    alive (a peer that half-closed and waits for an answer is alive), or when ``sock``
    is closed (nothing to ask)."""
    raw = raw_socket(sock)
    if raw is None:
        return False
    poller = _poll()
    poller.register(raw.fileno(), _POLLRDHUP)
    events = poller.poll(0)
    mask = events[0][1] if events else 0
    if mask & (select.POLLHUP | select.POLLERR):
        return True
    return sending_ended and bool(mask & _POLLRDHUP)


def receive(sock: gsocket.socket, method: str, arg: Any, wait_first: bool) -> Any:
    """Call the raw ``recv``/``recv_into`` (``method``) of a plain gevent socket.

    The one read path of :class:`Flow` and :class:`~greenserve.stream.Reader`: the
    non-blocking call on the raw socket, waiting for readability (with the socket's
    timeout, as gevent's own ``recv`` does) only when it would block, or first when
    ``wait_first``: after a read that came back short the kernel buffer is almost surely
    empty, and a ``recv`` would only fail with ``EAGAIN`` (one syscall per round trip).
    Never for TLS sockets: their SSL object can hold decrypted bytes while the kernel's
    buffer is empty.
    """
    if wait_first:
        sock._wait(sock._read_event)
    while True:
        try:
            return getattr(sock._sock, method)(arg)
        except BlockingIOError:
            if sock.timeout == 0.0:
                raise  # a non-blocking socket: gevent's recv raises too
        sock._wait(sock._read_event)


def raw_send(sock: gsocket.socket, data: Any) -> int:
    """One non-blocking ``send`` on the stdlib socket under a plain gevent socket
    (``BlockingIOError`` when the kernel takes nothing; ``EBADF`` once closed)."""
    return sock._sock.send(data)


# struct tcp_info (linux/tcp.h): the u64 tcpi_bytes_received sits at this offset
# (Linux >= 4.1); a shorter answer means an older kernel: unknown.
_TCP_INFO_BYTES_RECEIVED = 128
_TCP_INFO_SIZE = 256


def bytes_received(sock: Any) -> int | None:
    """How many bytes a TCP connection has received so far (the kernel's count, read or
    not); ``None`` for other sockets, a closed one, or a kernel that does not say."""
    raw = raw_socket(sock)
    if raw is None or raw.family not in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
        return None
    try:
        info = raw.getsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
        return None
    return int.from_bytes(info[_TCP_INFO_BYTES_RECEIVED:_TCP_INFO_BYTES_RECEIVED + 8],
                          "little" if _LITTLE else "big")


def queued(sock: Any) -> int:
    """Bytes received and not read yet, in the kernel's buffer (``FIONREAD``); 0 for a
    closed socket."""
    raw = raw_socket(sock)
    if raw is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(raw.fileno(), termios.FIONREAD, b"\0" * 4),
                              sys.byteorder, signed=True)
    except OSError:
        return 0


def has_unread(sock: Any) -> bool:
    """Whether a read of ``sock`` would return at once: decrypted bytes in a TLS
    wrapper, the kernel's bytes, or end of file (peeked, never consumed, never waiting).
    A connection for which this is true is not idle: a message or its end is there."""
    raw = raw_socket(sock)
    if raw is None:
        return False
    if isinstance(sock, gssl.SSLSocket) and sock._sslobj is not None and sock.pending():
        return True
    try:
        raw.recv(1, _stdsocket.MSG_PEEK)
    except BlockingIOError:
        return False  # nothing yet
    except OSError:
        return True  # a reset: the read fails at once
    return True  # a byte, or end of file


def wait_readable(sock: gsocket.socket) -> None:
    """Block the calling greenlet until ``sock`` is readable (honours its timeout)."""
    sock._wait(sock._read_event)


def accept_raw(raw: _socket.socket) -> tuple[int, Any]:
    """Non-blocking ``accept`` of a stdlib listening socket: ``(fd, sockaddr)``."""
    return raw._accept()  # type: ignore[attr-defined]


def tls_wrap(sock: gsocket.socket, ctx: ssl.SSLContext, *, server_side: bool,
             server_hostname: str | None) -> gssl.SSLSocket:
    """Wrap a connected gevent socket with ``ctx``, without a handshake yet. The wrapper
    takes over the fd: ``sock`` is detached (closed in gevent's eyes) on success."""
    try:
        return gssl.SSLSocket(sock=sock, server_side=server_side,
                              server_hostname=server_hostname,
                              do_handshake_on_connect=False, _context=ctx)
    except BaseException as exc:
        _close_half_built(exc)
        raise


def _close_half_built(exc: BaseException) -> None:
    # gevent's SSLSocket takes the fd over (detaching ``sock``) before it checks that the
    # peer is connected; when that check raises (a peer that reset at once), the
    # half-built wrapper would hold the fd until garbage collection. Its __init__ frame,
    # in the traceback, still has it: close it now.
    init = gssl.SSLSocket.__init__.__code__
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is init:
            half = tb.tb_frame.f_locals.get("self")
            if half is not None:
                half.close()
        tb = tb.tb_next


def tls_send_nowait(tls: gssl.SSLSocket, data: Any) -> tuple[int, int]:
    """One TLS write that never waits: ``(bytes taken, event to wait for)``.

    The event is 0 when everything was taken, else ``WRITE`` (the kernel buffer is
    full) or ``READ`` (the TLS layer needs the peer's data first). OpenSSL requires
    the retry to start with the same bytes: callers keep the unsent data as it is.
    Raises ``OSError`` (``EBADF`` for a closed wrapper; ``ssl.SSLError`` and the
    socket's errors as they come).
    """
    sslobj = tls._sslobj
    if sslobj is None or tls.fileno() < 0:
        raise OSError(9, "Bad file descriptor")  # closed or unwrapped
    try:
        return sslobj.write(data), 0
    except ssl.SSLWantWriteError:
        return 0, WRITE
    except ssl.SSLWantReadError:
        return 0, READ
