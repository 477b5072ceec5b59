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
- ``loop.io``/``loop.timer`` watchers started with a greenlet's ``switch``, and the hub
  switched to directly: :class:`Conn`, the servers' lean connection, waits the way
  gevent's ``Waiter`` does, without one.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import select
import socket as _stdsocket
import ssl
import sys
import termios
from time import monotonic as _monotonic
from typing import Any

import gevent
import gevent._socket3
import greenlet
from gevent import monkey
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.exceptions import BlockingSwitchOutError, ConcurrentObjectUseError, InvalidSwitchError

__all__ = [
    "EVENTS",
    "READ",
    "WRITE",
    "Conn",
    "ServedSocket",
    "bytes_received",
    "has_unread",
    "holds",
    "is_plain",
    "kernel_shutdown",
    "peer_gone",
    "queued",
    "raw_accept",
    "raw_send",
    "raw_socket",
    "receive",
    "tls_send_nowait",
    "tls_wrap",
    "wait_readable",
    "wake_loop",
]

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


_SWITCH = greenlet.greenlet.switch
_getcurrent = greenlet.getcurrent
_TIMED_OUT = object()  # what a connection's timer switches into its waiting greenlet
_OWN = object()  # a wait's timeout: the connection's own
_NONBLOCKING = os.O_RDWR | os.O_NONBLOCK
_STREAM_NONBLOCKING = _stdsocket.SOCK_STREAM | _stdsocket.SOCK_NONBLOCK


class Conn:
    """A server's lean connection: the stdlib's socket object, its watchers created
    only when a wait needs them.

    What gevent's socket gives every connection up front (a socket object over the
    stdlib one, a read and a write watcher, a ``Waiter`` per wait, a timeout object per
    timed wait) costs memory and time per connection; a connection that reads its
    request at once, answers and closes needs none of it. Here: one read watcher made
    on the first wait, a write watcher only when the kernel buffer is full, a timer only
    for a wait with a timeout; a wait starts the watcher with the waiting greenlet's
    ``switch`` and switches to the hub directly (the shallowest stack at the blocking
    point: a suspended connection keeps less of it). A gevent socket over the same fd is
    built only when asked (:meth:`gevent_socket`), for code that expects one.

    It has the part of the socket API greenserve uses (``recv``, ``recv_into``,
    ``send``, ``sendall``, ``shutdown``, timeouts, ``fileno``, names and options), with
    gevent's semantics: the calls wait in the calling greenlet (``timeout`` per wait;
    ``0.0``: raise ``BlockingIOError``), and :meth:`close` throws ``EBADF`` into a
    greenlet waiting on it.
    """

    __slots__ = ("_gsock", "_read", "_sock", "_timeout", "_write")

    def __init__(self, fd: int, family: int) -> None:
        """Take over ``fd``, a connected stream socket (closed if this fails)."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, _NONBLOCKING)
            # SOCK_NONBLOCK in the type: the object knows it is non-blocking (one
            # fcntl above instead of a get and a set).
            self._sock = _socket.socket(family, _STREAM_NONBLOCKING, 0, fd)
        except BaseException:
            os.close(fd)
            raise
        self._timeout: float | None = None
        self._read: Any = None
        self._write: Any = None
        self._gsock: gsocket.socket | None = None

    def __repr__(self) -> str:
        return f"<Conn fd={self._sock.fileno()}>"

    # -- the socket API -----------------------------------------------------------------

    @property
    def family(self) -> int:
        return int(self._sock.family)

    @property
    def type(self) -> int:
        return int(self._sock.type)

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def gettimeout(self) -> float | None:
        """The timeout of each wait: this object's, or (once made) the gevent
        socket's, which code holding that socket may change."""
        gsock = self._gsock
        return self._timeout if gsock is None else gsock.timeout

    def settimeout(self, timeout: float | None) -> None:
        if self._gsock is not None:
            self._gsock.settimeout(timeout)
        self._timeout = None if timeout is None else float(timeout)

    timeout = property(gettimeout)

    def recv(self, size: int, flags: int = 0) -> bytes:
        data: bytes = self._retry("recv", self.wait_readable, size, flags)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        n: int = self._retry("recv_into", self.wait_readable, buffer, nbytes, flags)
        return n

    def send(self, data: Any, flags: int = 0) -> int:
        sent: int = self._retry("send", self.wait_writable, data, flags)
        return sent

    def _retry(self, method: str, wait: Any, *args: Any) -> Any:
        # The stdlib socket's call, and a wait whenever it would block. The socket is
        # looked up on every try: a gevent socket made meanwhile (gevent_socket) or a
        # close replaces it.
        while True:
            try:
                return getattr(self._sock, method)(*args)
            except BlockingIOError:
                if self.gettimeout() == 0.0:
                    raise
            wait()

    def receive(self, method: str, arg: Any, wait_first: bool) -> Any:
        """``recv``/``recv_into`` (``method``) of ``arg``, waiting for readability
        first when ``wait_first`` (see :func:`receive`), unless non-blocking. (The
        ``Flow``'s and ``Reader``'s read: :meth:`_retry` spelled out, one call less.)"""
        # The timeout inlined (gettimeout): this runs for nearly every read.
        if wait_first and (self._timeout if self._gsock is None
                           else self._gsock.timeout) != 0.0:
            self.wait_readable()
        while True:
            try:
                return getattr(self._sock, method)(arg)
            except BlockingIOError:
                if self.gettimeout() == 0.0:
                    raise
            self.wait_readable()

    def sendall(self, data: Any) -> None:
        """Send all of ``data``; the timeout bounds the whole call (as gevent's)."""
        view = memoryview(data).cast("B")
        timeout = self.gettimeout()
        deadline = None if not timeout else _monotonic() + timeout
        while view:
            try:
                view = view[self._sock.send(view):]
                continue
            except BlockingIOError:
                if timeout == 0.0:
                    raise
            left = None if deadline is None else deadline - _monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("timed out")
            self.wait_writable(left)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    # -- waiting ------------------------------------------------------------------------

    def wait_readable(self, timeout: Any = _OWN) -> None:
        """Wait until readable (or ``timeout`` seconds, default the connection's:
        ``TimeoutError``)."""
        watcher = self._read
        if watcher is None:
            watcher = self._read = self._watcher(READ)
        if timeout is _OWN:  # gettimeout() inlined: a wait per round trip runs this
            timeout = self._timeout if self._gsock is None else self._gsock.timeout
        _block(watcher, timeout)

    def wait_writable(self, timeout: Any = _OWN) -> None:
        """Wait until writable (or ``timeout``, as :meth:`wait_readable`)."""
        watcher = self._write
        if watcher is None:
            watcher = self._write = self._watcher(WRITE)
        _block(watcher, self.gettimeout() if timeout is _OWN else timeout)

    def _watcher(self, event: int) -> Any:
        fd = self._sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return gevent.get_hub().loop.io(fd, event)

    # -- closing, and gevent's socket on demand -----------------------------------------

    def close(self) -> None:
        """Close (idempotent); a greenlet waiting on the connection gets ``EBADF``, and
        other watchers on the fd (a ``Writer``'s) an event, before the fd closes."""
        if self._sock is _CLOSED:
            return  # closed already (the engine closes what a face closed: no work twice)
        self._cancel_waits()
        if self._gsock is not None:
            self._gsock.close()  # gevent closes the fd, as it does its own
            self._sock = _CLOSED
            return
        raw = self._sock
        fd = raw.fileno()
        if fd < 0:
            return
        self._sock = _CLOSED  # from now on every call raises EBADF
        if gevent.get_hub().loop.closing_fd(fd):
            # Watchers of others on this fd got an event: close it once they ran (as
            # gevent's socket does), or they would watch a closed fd.
            _close_after_watchers(raw)
        else:
            raw.close()

    def _cancel_waits(self) -> None:
        # Before the fd closes (libev must not watch a closed fd): a greenlet waiting
        # gets EBADF. Also when the gevent socket made over this connection closes.
        watcher = self._read
        if watcher is not None:
            self._read = None
            if watcher.active:
                _cancel_wait(watcher)
            else:
                watcher.close()  # _cancel_wait's common case, without the call
        if self._write is not None:
            _cancel_wait(self._write)
            self._write = None

    def gevent_socket(self) -> gsocket.socket:
        """A gevent socket over this connection's fd, made on the first call: both are
        then the same connection (closing either closes it). ``EBADF`` for a connection
        closed before it had one."""
        gsock = self._gsock
        if gsock is None:
            raw = self._sock
            fd = raw.fileno()
            if fd < 0:
                raise OSError(errno.EBADF, "Bad file descriptor")
            gsock = _SharedSocket(raw.family, raw.type, raw.proto, fileno=fd)
            gsock._conn = self
            raw.detach()  # the fd is the gevent socket's now; this object reads through it
            gsock.settimeout(self._timeout)
            self._sock = gsock._sock
            self._gsock = gsock
        return gsock


# What gevent's socket holds once closed (its close checks for it, as ServedSocket's does).
_CLOSED_SOCKET = gevent._socket3._closedsocket
# What a closed Conn holds: a closed stdlib socket, every call of which raises EBADF.
_CLOSED = _socket.socket(_stdsocket.AF_INET, _stdsocket.SOCK_STREAM)
_CLOSED.close()


def _close_after_watchers(raw: _socket.socket) -> None:
    check = gevent.get_hub().loop.check()

    def close() -> None:
        try:
            raw.close()
        finally:
            check.stop()
            check.close()

    check.start(close)


def _block(watcher: Any, timeout: float | None, timeout_exc: BaseException | None = None,
           *, gevents: bool = False) -> None:
    """Suspend the calling greenlet until ``watcher`` fires (``timeout_exc``, by default
    ``TimeoutError``, after ``timeout`` seconds): the watcher switches straight back
    into it. ``gevents``: the watcher belongs to a gevent socket, whose close finds the
    greenlet to throw ``EBADF`` into as its callback's ``__self__``."""
    current = _getcurrent()
    hub = gevent.get_hub()
    if current is hub:
        raise BlockingSwitchOutError("Impossible to call blocking function in the event "
                                     "loop callback")
    if watcher.callback is not None:
        raise ConcurrentObjectUseError(f"This socket is already used by another greenlet: "
                                       f"{watcher.callback!r}")
    timer = None
    if gevents:
        watcher.start(current.switch)
    else:
        # The greenlet type's switch, shared, with the greenlet as the one argument: it
        # switches in (), the empty tuple; a bound method per wait would cost more.
        watcher.start(_SWITCH, current)
    try:
        if timeout is not None:
            timer = hub.loop.timer(timeout)
            timer.start(current.switch, _TIMED_OUT)
        result = _SWITCH(hub)
    finally:
        watcher.stop()
        if timer is not None:
            timer.close()
    if result != ():
        if result is _TIMED_OUT and timer is not None:
            raise timeout_exc if timeout_exc is not None else TimeoutError("timed out")
        raise InvalidSwitchError(f"Invalid switch into {current!r}: {result!r}")


_BLOCK_CODE = _block.__code__


class ServedSocket(gsocket.socket):  # type: ignore[misc]  # gevent is untyped
    """gevent's socket as the faces that hand one to a handler make it (StreamServer,
    the gunicorn workers, ``tcp.Server.create_sock``): the same class to its users, with
    a shallower wait. gevent's waits go through four compiled levels (``wait_on_socket``,
    ``hub.wait``, a ``Waiter``, ``hub.switch``), each of them C stack that a suspended
    greenlet keeps; this one starts the watcher with the greenlet's ``switch`` (what
    gevent's ``cancel_wait`` expects to find) and switches to the hub directly."""

    __slots__ = ()

    def _wait(self, watcher: Any, timeout_exc: BaseException | None = None) -> None:
        if watcher is None:  # closed (as gevent's wait_on_socket says it)
            raise ConcurrentObjectUseError("The socket has already been closed by another "
                                           "greenlet")
        _block(watcher, self.timeout, timeout_exc, gevents=True)

    def close(self) -> None:
        # gevent's close, in one call instead of three (``close``, ``_real_close``,
        # ``_closedsocket.__bool__``): a served socket is closed twice, by the face's
        # close and then by the engine's release.
        self._closed = True  # type: ignore[misc]  # a slot of gevent's class
        if self._io_refs <= 0 and self._sock.__class__ is not _CLOSED_SOCKET:
            self._detach_socket("closed")


def _cancel_wait(watcher: Any) -> None:
    # As gevent's socket close: the greenlet waiting (if any) gets EBADF, from the hub,
    # if it still waits then (its timeout may have ended the wait meanwhile).
    if watcher.active:
        waiter = watcher.args[0]
        watcher.stop()
        gevent.get_hub().loop.run_callback(_throw_if_waiting, waiter, watcher)
    watcher.close()


def _throw_if_waiting(waiter: Any, watcher: Any) -> None:
    frame = waiter.gr_frame  # where the greenlet is suspended
    if frame is not None and frame.f_code is _BLOCK_CODE and \
            frame.f_locals.get("watcher") is watcher:
        waiter.throw(OSError(errno.EBADF, "File descriptor was closed in another greenlet"))


class _SharedSocket(ServedSocket):
    """The gevent socket a :class:`Conn` makes over its own fd: closing or detaching it
    also ends the waits on the ``Conn``'s watchers (gevent's ``_drop_events_and_close``
    cancels only its own)."""

    __slots__ = ("_conn",)
    _conn: Conn | None

    def _drop_events_and_close(self, closefd: bool = True, *args: Any, **kwargs: Any) -> Any:
        conn = getattr(self, "_conn", None)  # unset if closed while being made
        if conn is not None:
            self._conn = None
            conn._cancel_waits()
            if closefd:
                # The connection is closed from now on, although gevent may close the
                # fd a moment later (after other watchers on it, a Writer's, ran): a
                # call on the Conn meanwhile would wait on an fd about to close.
                conn._sock = _CLOSED
        return super()._drop_events_and_close(closefd, *args, **kwargs)


def is_plain(sock: Any) -> bool:
    """A connection without TLS: a gevent socket (or a :class:`ServedSocket`) or a
    :class:`Conn`."""
    cls = sock.__class__
    return cls is gsocket.socket or cls is Conn or cls is ServedSocket or cls is _SharedSocket


def receive(sock: gsocket.socket, method: str, arg: Any, wait_first: bool) -> Any:
    """Call the raw ``recv``/``recv_into`` (``method``) of a plain gevent socket
    (a :class:`Conn` has this as its own :meth:`Conn.receive`, which callers call
    directly).

    The read path of :class:`Flow` and :class:`~greenserve.stream.Reader`: the
    non-blocking call on the raw socket, waiting for readability (with the socket's
    timeout, as gevent's own ``recv`` does) only when it would block, or first when
    ``wait_first``: after a read that came back short the kernel buffer is almost surely
    empty, and a ``recv`` would only fail with ``EAGAIN`` (one syscall per round trip).
    Never for TLS sockets: their SSL object can hold decrypted bytes while the kernel's
    buffer is empty.
    """
    if wait_first and sock.timeout != 0.0:
        sock._wait(sock._read_event)
    while True:
        try:
            return getattr(sock._sock, method)(arg)
        except BlockingIOError:
            if sock.timeout == 0.0:
                raise  # a non-blocking socket: gevent's recv raises too
        sock._wait(sock._read_event)


def raw_send(sock: gsocket.socket | Conn, data: Any) -> int:
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


def _noop() -> None:
    pass


def wake_loop() -> None:
    """Make the loop's next poll return at once, so that callbacks scheduled now (an
    ``Event.set()``'s wake-ups) run before the loop blocks. Needed in a callback that
    may run from the loop's prepare phase, after gevent ran its callback queue there:
    an io event the loop was *fed* (``closing_fd``, when a socket on the fd closes) is
    invoked in that phase, and whatever it schedules would otherwise wait for the next
    real event."""
    gevent.get_hub().loop.timer(0).start(_noop)


def raw_accept(listener: Any) -> Any:
    """The non-blocking ``accept`` of the stdlib socket under a listening gevent
    socket, as a function returning ``(fd, sockaddr)``; ``None`` once closed. (Taken
    once per wake-up, called per connection: no call of ours in between.)"""
    raw = raw_socket(listener)
    return None if raw is None else raw._accept  # type: ignore[attr-defined]


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
