"""Sockets as users hold them: ``Flow`` (a connected stream), ``ListeningSocket`` and
``DatagramSocket``.

Each wraps a gevent socket and translates its errors through :mod:`greenserve.errors`.
Each may be owned by a :class:`~greenserve.Switch` (``sw.attach``): it is then closed
when the switch finishes, and closing it earlier detaches it.
"""

from __future__ import annotations

import errno
import socket as _stdsocket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import Any, Protocol

from gevent import socket as gsocket

from . import _bind, _gevent
from .address import Address, Fd, Tcp, Udp, Unix, from_sockaddr
from .errors import reraise
from .switch import ReleaseHook, Switch

_Conn = _gevent.Conn

__all__ = ["DatagramSocket", "Flow", "ListeningSocket", "Reclaimer", "open_listener"]

_SHUTDOWN = {"send": _stdsocket.SHUT_WR, "receive": _stdsocket.SHUT_RD,
             "both": _stdsocket.SHUT_RDWR}

# Default read size: one 64 KiB chunk is what the kernel hands back for a busy TCP
# socket on loopback, so a larger buffer buys nothing and a smaller one costs syscalls.
DEFAULT_READ_SIZE = 65536


class _Owned:
    """Close-once and switch-ownership bookkeeping shared by the socket wrappers."""

    __slots__ = ("_closed", "_hook", "_sock", "_unlink")

    def __init__(self, sock: gsocket.socket, unlink: _bind.Bound | None = None) -> None:
        self._sock = sock
        self._hook: ReleaseHook | None = None
        self._closed = False
        self._unlink = unlink

    def _own(self, sw: Switch | None) -> None:
        if sw is not None:
            self._hook = sw.on_release(self.close)

    @property
    def socket(self) -> gsocket.socket:
        """The underlying gevent socket."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def close(self) -> None:
        """Close the socket (idempotent) and detach it from its switch."""
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._sock.close()
        if self._unlink is not None:
            _bind.unlink_if_ours(*self._unlink)
            self._unlink = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Reclaimer(Protocol):
    """What a server offers the connections it accepted (see :meth:`Flow.idle`)."""

    def reclaimable(self, conn: Any, reclaim: Any = None) -> None: ...
    def busy(self, conn: Any) -> None: ...


class ReclaimMarks:
    """The idle mark a server's connection gives its server (``Flow.idle``,
    ``Reader.idle``): one rule for both. The class using it has ``_reclaimer`` (the
    server, or None), ``_sock``, ``_idle`` (marked now) and ``_heard`` (a byte was
    read: before that a connection is new, not idle)."""

    # No slots of its own: Flow and Reader hold these four in theirs (an empty base
    # keeps their instances without a __dict__: memory per connection).
    __slots__ = ()
    _reclaimer: Reclaimer | None
    _sock: Any
    _idle: bool
    _heard: bool

    @contextmanager
    def _idle_while(self, *, buffered: bool) -> Iterator[None]:
        reclaimer = self._reclaimer
        if reclaimer is None or self._idle or not self._heard or buffered:
            yield  # new (its first message may be on its way), or bytes are buffered
            return
        self._idle = True  # type: ignore[misc]  # a slot of the subclass (see above)
        reclaimer.reclaimable(self._sock)
        try:
            yield
        finally:
            self._busy()

    def _busy(self) -> None:
        if self._idle:
            self._idle = False  # type: ignore[misc]  # a slot of the subclass
            assert self._reclaimer is not None
            self._reclaimer.busy(self._sock)


class Flow(_Owned, ReclaimMarks):
    """A connected stream socket (TCP or unix).

    Error handling: ``ECONNRESET``/``EPIPE``/``ECONNABORTED`` raise ``ConnectionReset``.
    Resource handling: the flow owns its socket; :meth:`close` (or the owning switch)
    closes it.
    """

    __slots__ = ("__weakref__", "_drained", "_heard", "_idle", "_local", "_peer", "_plain",
                 "_reclaimer")

    def __init__(self, sock: gsocket.socket | _gevent.Conn, *,
                 peer: Tcp | Unix | None = None, sw: Switch | None = None,
                 reclaimer: Reclaimer | None = None) -> None:
        # _Owned.__init__ spelled out (a flow is made per connection: one call less)
        self._sock = sock
        self._hook: ReleaseHook | None = None
        self._closed = False
        self._unlink = None
        self._peer = peer
        self._reclaimer = reclaimer  # the server that accepted it (see idle())
        self._idle = False
        self._heard = False  # a byte was read: from then on it may be idle
        self._local: Tcp | Unix | None = None
        # True after a read that returned less than asked: the kernel buffer is then
        # almost surely empty, so the next read waits for readability first instead of
        # paying for a recv() that fails with EAGAIN (one syscall per round trip).
        # Not for TLS: decrypted bytes can wait in the SSL object with the kernel empty.
        self._drained = False
        self._plain = _gevent.is_plain(sock)
        if sw is not None:
            self._own(sw)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<Flow {state} peer={self._peer}>"

    @property
    def socket(self) -> gsocket.socket:
        """The underlying gevent socket (a server's connection makes it on first use:
        until then the flow runs on a leaner object over the same fd)."""
        sock = self._sock
        if sock.__class__ is _gevent.Conn:
            return sock.gevent_socket()
        return sock

    @property
    def peer(self) -> Tcp | Unix:
        """The remote address."""
        if self._peer is None:
            try:
                self._peer = from_sockaddr(self._sock.family, self._sock.getpeername())
            except OSError as exc:
                reraise(exc)
        return self._peer

    @property
    def local(self) -> Tcp | Unix:
        """The local address."""
        if self._local is None:
            try:
                self._local = from_sockaddr(self._sock.family, self._sock.getsockname())
            except OSError as exc:
                reraise(exc)
        return self._local

    def idle(self) -> AbstractContextManager[None]:
        """Say "this connection waits for the peer's next message" while inside.

        A server at its connection limit (``max_connections``) with a client waiting
        may then close this connection to admit that client (a read blocked inside gets
        end of file, and the peer too): the connections idle the longest first, one for
        each new client, and never one whose next message has begun to arrive, nor one
        that has not sent anything yet (a new connection: its first message may be on
        its way). Idle ends with the first byte read, or on leaving the block. Use it
        around the read of the next request of a keep-alive protocol::

            while True:
                with flow.idle():
                    line = flow.read()   # b"" also when the server reclaimed it
                if not line:
                    return
                ...                      # the request: never reclaimed here

        Outside a server (or with ``reclaim_idle=False``) it does nothing.
        """
        return self._idle_while(buffered=False)

    def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        """Read up to ``max_bytes``; ``b""`` at end of file."""
        sock = self._sock
        try:
            if sock.__class__ is _Conn:  # a server's lean connection: its read directly
                data: bytes = sock.receive("recv", max_bytes, self._drained)
            elif self._plain:
                data = _gevent.receive(sock, "recv", max_bytes, self._drained)
            else:
                data = self._sock.recv(max_bytes)
        except OSError as exc:
            reraise(exc)
        self._drained = self._plain and 0 < len(data) < max_bytes
        if data:
            self._heard = True
            if self._idle:
                self._busy()  # the next message arrived: no longer idle
        return data

    def read_into(self, buffer: Any) -> int:
        """Read into ``buffer`` (a writable buffer); return the count, 0 at end of file."""
        sock = self._sock
        try:
            if sock.__class__ is _Conn:
                n: int = sock.receive("recv_into", buffer, self._drained)
            elif self._plain:
                n = _gevent.receive(sock, "recv_into", buffer, self._drained)
            else:
                n = self._sock.recv_into(buffer)
        except OSError as exc:
            reraise(exc)
        self._drained = self._plain and 0 < n < len(buffer)
        if n:
            self._heard = True
            if self._idle:
                self._busy()  # the next message arrived: no longer idle
        return n

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``, blocking this greenlet until the kernel took it."""
        sock = self._sock
        if self._plain and (data.__class__ is bytes or data.__class__ is bytearray):
            # One raw send first: the kernel almost always takes a whole reply at once,
            # and gevent's sendall adds three Python calls and a memoryview to that.
            try:
                sent = _gevent.raw_send(sock, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                reraise(exc)
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        try:
            sock.sendall(data)
        except OSError as exc:
            reraise(exc)

    def shutdown(self, how: str) -> None:
        """Shut down ``"send"`` (the peer sees end of file), ``"receive"`` or ``"both"``."""
        try:
            flag = _SHUTDOWN[how]
        except (KeyError, TypeError):
            raise ValueError(f"how must be 'send', 'receive' or 'both', not {how!r}") from None
        try:
            # The kernel's shutdown, not gevent's (which throws EBADF into any greenlet
            # blocked on the socket): a reader blocked in another greenlet sees end of file.
            _gevent.kernel_shutdown(self._sock, flag, quiet=False)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer already went away: nothing to shut
                reraise(exc)


class ListeningSocket(_Owned):
    """A bound, listening stream socket.

    Resource handling: :meth:`close` closes it and, for a unix path this process bound,
    removes the path if it is still our socket (same device and inode).
    """

    __slots__ = ("__weakref__", "_address")

    def __init__(self, sock: gsocket.socket, *, sw: Switch | None = None,
                 unlink: _bind.Bound | None = None) -> None:
        super().__init__(sock, unlink)
        self._address = from_sockaddr(sock.family, sock.getsockname())
        self._own(sw)

    def __repr__(self) -> str:
        return f"<ListeningSocket {self._address}{' closed' if self._closed else ''}>"

    @property
    def address(self) -> Tcp | Unix:
        """The address really bound (port 0 resolved to the chosen port)."""
        return self._address

    def accept(self, *, sw: Switch) -> tuple[Flow, Tcp | Unix]:
        """Wait for a connection; return ``(flow, peer_address)``, the flow owned by ``sw``."""
        try:
            conn, raw = self._sock.accept()
        except OSError as exc:
            reraise(exc, f"accepting on {self._address}")
        try:
            peer = from_sockaddr(conn.family, raw)  # whatever name the peer bound
            return Flow(conn, peer=peer, sw=sw), peer
        except BaseException:
            conn.close()  # not yet owned by a Flow: nobody else would close it
            raise


class DatagramSocket(_Owned):
    """A UDP or unix datagram socket."""

    __slots__ = ("__weakref__",)

    def __init__(self, sock: gsocket.socket, *, sw: Switch | None = None,
                 unlink: _bind.Bound | None = None) -> None:
        super().__init__(sock, unlink)
        self._own(sw)

    def __repr__(self) -> str:
        return f"<DatagramSocket {self.address if not self._closed else 'closed'}>"

    @property
    def address(self) -> Udp | Unix | None:
        """The local address: ``None`` for an unbound unix client socket; an unbound UDP
        one reports the wildcard address with port 0 (``udp:0.0.0.0:0``) until it sends."""
        name = self._sock.getsockname()
        if self._sock.family == _stdsocket.AF_UNIX and not name:
            return None
        result = from_sockaddr(self._sock.family, name, datagram=True)
        assert isinstance(result, (Udp, Unix))
        return result

    def send(self, addr: Udp | Unix, data: bytes | bytearray | memoryview) -> None:
        """Send one datagram to ``addr``."""
        if not isinstance(addr, (Udp, Unix)):
            raise TypeError(f"addr must be Udp or Unix, not {type(addr).__name__}")
        try:
            self._sock.sendto(data, addr.sockaddr)
        except OSError as exc:
            reraise(exc, f"sending to {addr}")

    def recv(self, buffer: Any) -> tuple[Udp | Unix, int]:
        """Receive one datagram into ``buffer``; return ``(sender, nbytes)``."""
        try:
            n, raw = self._sock.recvfrom_into(buffer)
        except OSError as exc:
            reraise(exc)
        # A unix sender may be unbound (raw is None), abstract or a name that is not
        # UTF-8: from_sockaddr takes them all.
        return from_sockaddr(self._sock.family, raw, datagram=True), n


# -- creating listening sockets ------------------------------------------------------------


def _inherited(fd: int) -> gsocket.socket:
    sock = gsocket.socket(fileno=fd)
    if sock.type != _stdsocket.SOCK_STREAM or not sock.getsockopt(
            _stdsocket.SOL_SOCKET, _stdsocket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError(f"fd://{fd} is not a listening stream socket")
    return sock


def open_listener(addr: Address, *, backlog: int, reuse_addr: bool = False,
                  reuse_port: bool = False, sw: Switch | None = None) -> ListeningSocket:
    """Bind and listen on ``addr`` (``Tcp``, ``Unix`` or ``Fd``); nothing leaks on failure.

    Raises ``ValueError`` for a ``Udp`` address or a bad ``backlog``; ``OSError``
    (e.g. ``EADDRINUSE``, with a note naming the address) when binding fails.
    """
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int, not {type(backlog).__name__}")
    if backlog < 0:
        raise ValueError(f"backlog must be >= 0, not {backlog}")
    if isinstance(addr, Fd):
        try:
            sock = _inherited(addr.fd)
        except OSError as exc:  # not an open fd (EBADF), not a socket (ENOTSOCK)
            reraise(exc, f"listening on {addr}")
        try:
            sock.listen(backlog)
        except OSError as exc:
            sock.detach()  # the fd stays open: it is still its owner's
            reraise(exc, f"listening on {addr}")
        return ListeningSocket(sock, sw=sw)
    if not isinstance(addr, (Tcp, Unix)):
        raise ValueError(f"cannot listen on {addr}: a stream address (tcp/unix/fd) is needed")
    sock = gsocket.socket(addr.family, _stdsocket.SOCK_STREAM)
    try:
        unlink = _bind.bind(sock, addr, reuse_addr, reuse_port)
        if isinstance(addr, Tcp):
            # Accepted sockets inherit it (Linux): the engine then needs no setsockopt
            # per connection.
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reraise(exc, f"listening on {addr}")
    except BaseException:
        sock.close()
        raise
    return ListeningSocket(sock, sw=sw, unlink=unlink)
