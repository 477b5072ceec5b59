"""Buffered ``Reader`` and ``Writer`` over a connected gevent socket (Jane Street Async style).

``Reader`` keeps one ``bytearray`` and a read offset: a line is found with
``bytearray.find`` from the offset and copied out once; the consumed prefix is dropped
only when more data must be received (once per ``recv``, never per line), and the
buffer is emptied as soon as everything in it was consumed, so an idle connection holds
no receive buffer. A read never calls ``recv`` when the buffer already holds what the
caller asked for.

``Writer`` never blocks in ``write``. Its send path is a small state machine driven by the
hub, with no greenlet per writer:

- ``_IDLE``: nothing buffered. The first ``write`` appends to the buffer and schedules ONE
  hub callback (``loop.run_callback``) -> ``_SCHEDULED``. Except a ``bytes`` write of at
  least ``EAGER_SEND_MIN`` bytes: it is sent at once, in the caller's greenlet, with one
  non-blocking ``send`` on the raw socket; only what the kernel did not take is buffered
  (any error, even ``EAGAIN``, leaves it all to the hub's send, which reports it).
- ``_SCHEDULED``: further writes only append. When the callback runs (same hub iteration)
  everything written so far goes out in one non-blocking ``send``: small writes are
  coalesced. All sent -> ``_IDLE``; the kernel took only part of it -> ``_WAITING``.
- ``_WAITING``: an io watcher (``loop.io(fd, WRITE)``) sends more on each writability, and,
  with a ``buffer_age_limit``, a repeating hub timer checks how old the oldest unsent byte
  is. Drained -> ``_IDLE`` (watcher and timer stopped: an idle writer costs no wake-ups).

Errors found by the hub (a reset peer, the age limit) are stored; ``write`` and ``flush``
raise them afterwards.
"""

from __future__ import annotations

import errno
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, NoReturn, Union

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl
from gevent.event import Event

from . import _checks, _gevent
from .errors import (
    ConnectionReset,
    IncompleteRead,
    LineTooLong,
    WriterBufferAgeExceeded,
    translate,
)
from .flow import DEFAULT_READ_SIZE, Reclaimer, ReclaimMarks

__all__ = [
    "CLOSE_FLUSH_TIMEOUT",
    "DEFAULT_BUFFER_AGE_LIMIT",
    "DEFAULT_MAX_LENGTH",
    "Reader",
    "Writer",
]

# What ``recv`` asks for when the Reader buffers: one 64 KiB chunk is what the kernel
# hands back for a busy loopback/TCP socket (see flow.DEFAULT_READ_SIZE).
RECV_SIZE = DEFAULT_READ_SIZE

# Default bound on a line (or a read_until chunk). Far above real protocol lines (nginx
# caps HTTP header lines at 8 KiB, SMTP at 1000 bytes), and it bounds what a peer that
# never sends a newline can make us hold to about max_length + one RECV_SIZE chunk.
DEFAULT_MAX_LENGTH = 65536

# Async's Writer default (``buffer_age_limit = `At_most (Time.Span.of_min 2.)``): a peer
# that has not taken a byte in two minutes is gone, not slow.
DEFAULT_BUFFER_AGE_LIMIT = 120.0

# close() waits at most this long for buffered data to reach the kernel. It matches
# gunicorn's default graceful_timeout (30 s): a server shutting down gracefully is killed
# after that anyway, and one slow client must not hold a close (and its fd) longer.
CLOSE_FLUSH_TIMEOUT = 30.0

# A stalled writer's age is checked this many times per buffer_age_limit: the failure
# comes at most limit/4 late, for four timer wake-ups per limit while data is stuck
# (none while the writer is idle or the kernel takes everything at once).
AGE_CHECKS_PER_LIMIT = 4

# A write of at least this many bytes made while nothing is pending goes to the kernel at
# once (one non-blocking send in the writer's greenlet) instead of waiting for the hub:
# it fills several TCP segments by itself, so merging it with the writes around it saves
# no packet, while the deferred send costs a hub callback per write. Smaller writes are
# coalesced as before.
EAGER_SEND_MIN = 4096

# The most plaintext one TLS record carries (RFC 8446 section 5.1): the Writer hands the
# TLS layer this much at a time, so that what went out is counted as it goes.
TLS_RECORD = 16384

_CR = 13  # b"\r"[0]
# The buffer of a Reader or Writer with nothing in it: shared, immutable.
_EMPTY = b""
_Conn = _gevent.Conn  # a server's lean connection (it has its own receive)

# Writer states (see the module docstring).
_IDLE, _SCHEDULED, _WAITING = 0, 1, 2

Buffer = Union[bytes, bytearray, memoryview]


def _bad_size(name: str, value: object, minimum: int) -> NoReturn:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    raise ValueError(f"{name} must be >= {minimum}, not {value}")


def _closed_error(what: str) -> ValueError:
    # Using a stream you closed is a programming error: ValueError, as for closed files.
    return ValueError(f"I/O operation on closed {what}")


class Reader(ReclaimMarks):
    """Buffered reading from a connected stream socket: bytes, exact counts, lines.

    ``sock`` is a connected gevent stream socket (TCP, unix or TLS). Each method blocks
    only the calling greenlet. Only one greenlet may read at a time.

    Resource handling: the reader owns ``sock``; :meth:`close` closes it. When a
    :class:`Writer` shares the socket, close the writer first (its ``close`` flushes), or
    its unsent data is lost and it fails with ``EBADF``.

    Error handling: ``ECONNRESET`` (and the other "flow broken" errors) raise
    :class:`~greenserve.errors.ConnectionReset`, other socket errors their ``OSError``
    (both via :func:`greenserve.errors.reraise`); :meth:`read_exactly` raises
    :class:`~greenserve.errors.IncompleteRead` at end of file; :meth:`read_line` and
    :meth:`read_until` raise :class:`~greenserve.errors.LineTooLong`. Reading after
    :meth:`close` raises ``ValueError``. Arguments are checked: a size that is not an
    int raises ``TypeError``, one out of range ``ValueError``.
    """

    __slots__ = ("_buf", "_closed", "_drained", "_eof", "_error", "_heard", "_idle", "_plain",
                 "_pos", "_reclaimer", "_sock")

    def __init__(self, sock: gsocket.socket, *, reclaimer: Reclaimer | None = None) -> None:
        self._sock = sock
        self._reclaimer = reclaimer  # the server that accepted it (see idle())
        self._idle = False
        self._heard = False  # a byte was received: from then on it may be idle
        # Nothing buffered: the empty bytes object, shared (an idle connection holds no
        # buffer of its own); a bytearray from the first receive that keeps bytes.
        self._buf: bytes | bytearray = _EMPTY
        self._pos = 0          # bytes before this offset were consumed
        self._eof = False      # recv returned b"": it never returns data again
        self._closed = False
        self._error: BaseException | None = None  # the reset this socket's recv raised
        # As in Flow: after a short recv the kernel buffer is almost surely empty, so
        # the next one waits for readability first rather than failing with EAGAIN.
        # Not for TLS sockets, whose SSL object can hold decrypted bytes.
        self._drained = False
        self._plain = _gevent.is_plain(sock)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "eof" if self._eof else "open"
        return f"<Reader {state} buffered={len(self._buf) - self._pos}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    # -- reading ------------------------------------------------------------------------

    def read(self, max_bytes: int = DEFAULT_READ_SIZE) -> bytes:
        """Return between 1 and ``max_bytes`` bytes, or ``b""`` at end of file.

        Buffered data is returned first, without calling ``recv``; with nothing
        buffered this is one ``recv(max_bytes)``.
        """
        if max_bytes.__class__ is not int or max_bytes < 1:
            _bad_size("max_bytes", max_bytes, 1)
        pos = self._pos
        if pos < len(self._buf):
            return self._take(min(max_bytes, len(self._buf) - pos))
        if self._closed:
            raise _closed_error("Reader")
        if self._eof:
            return b""
        data = self._recv(max_bytes)
        if not data:
            self._eof = True
        return data

    def read_exactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes.

        Raises ``IncompleteRead`` if the stream ends first; its ``partial`` holds the
        bytes that did arrive (they are consumed).
        """
        if n.__class__ is not int or n < 0:
            _bad_size("n", n, 0)
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise IncompleteRead(self._take(len(self._buf) - self._pos), n)
        return self._take(n)

    def read_line(self, max_length: int = DEFAULT_MAX_LENGTH) -> bytes | None:
        """Return the next line without its ``\\n`` or ``\\r\\n``; ``None`` at end of file.

        A last line without a line end, followed by end of file, is returned as is.
        A line (without its line end) longer than ``max_length`` bytes raises
        ``LineTooLong`` as soon as that is known, so a peer cannot make the reader buffer
        more than about ``max_length`` plus one receive. Nothing is consumed then: the
        reader stays usable (read the data with :meth:`read`, or retry with a larger
        ``max_length``).
        """
        if max_length.__class__ is not int or max_length < 1:
            _bad_size("max_length", max_length, 1)
        buf = self._buf
        start = self._pos
        # Unbounded find (cheaper than passing an end): the buffer itself is bounded.
        end = buf.find(b"\n", start)
        if end < 0:
            # Room for max_length bytes and a "\r" before the "\n".
            end = self._find(b"\n", max_length, slack=1)
            if end < 0:
                return self._take_last(max_length)
            buf = self._buf
            start = self._pos
        stop = end - 1 if end > start and buf[end - 1] == _CR else end
        if stop - start > max_length:
            raise LineTooLong(f"line longer than max_length={max_length} bytes")
        line = bytes(buf[start:stop])
        end += 1
        if end == len(buf):  # _advance, inlined on this hot path
            self._buf = _EMPTY
            self._pos = 0
        else:
            self._pos = end
        return line

    def read_until(self, delim: bytes, max_length: int = DEFAULT_MAX_LENGTH) -> bytes | None:
        """Return the bytes before the next ``delim`` (consumed, not returned).

        End of file and ``max_length`` work as in :meth:`read_line`: ``None`` at end of
        file with nothing buffered, the unterminated rest at end of file, and
        ``LineTooLong`` (nothing consumed) when ``delim`` does not start within
        ``max_length`` bytes.
        """
        if not isinstance(delim, (bytes, bytearray)):
            raise TypeError(f"delim must be bytes, not {type(delim).__name__}")
        if not delim:
            raise ValueError("delim must not be empty")
        if max_length.__class__ is not int or max_length < 1:
            _bad_size("max_length", max_length, 1)
        delim = bytes(delim)
        start = self._pos
        end = self._buf.find(delim, start)
        if end < 0:
            end = self._find(delim, max_length)
            if end < 0:
                return self._take_last(max_length)
            start = self._pos
        elif end - start > max_length:
            raise LineTooLong(f"no {delim!r} within max_length={max_length} bytes")
        chunk = bytes(self._buf[start:end])
        self._advance(end + len(delim))
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        """Iterate over lines (as :meth:`read_line` returns them) until end of file."""
        return self

    def __next__(self) -> bytes:
        line = self.read_line()
        if line is None:
            raise StopIteration
        return line

    def idle(self) -> AbstractContextManager[None]:
        """Say "this connection waits for the peer's next message" while inside.

        A server at its connection limit with a client waiting may then close this
        connection to admit that client (a read blocked inside returns end of file):
        the longest idle first, one for each new client, and never one whose next
        message has begun to arrive, nor one that has sent nothing yet (new: its first
        message may be on its way). Idle ends with the first byte received, or on
        leaving the block; with bytes already buffered the connection is not idle at
        all. For a line protocol::

            while True:
                with reader.idle():
                    line = reader.read_line()   # None also when the server reclaimed it
                if line is None:
                    return
                ...                             # the request: never reclaimed here

        Outside a server (or with ``reclaim_idle=False``) it does nothing.
        """
        return self._idle_while(buffered=self._pos < len(self._buf))

    # -- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and drop buffered data. Idempotent.

        A read blocked in another greenlet raises ``OSError`` (``EBADF``).
        """
        if self._closed:
            return
        self._closed = True
        self._buf = _EMPTY
        self._pos = 0
        self._sock.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- buffer helpers -----------------------------------------------------------------

    def _recv(self, size: int) -> bytes:
        sock = self._sock
        try:
            if sock.__class__ is _Conn:  # a server's lean connection: its read directly
                data: bytes = sock.receive("recv", size, self._drained)
            elif self._plain:
                data = _gevent.receive(sock, "recv", size, self._drained)
            else:
                data = sock.recv(size)
        except OSError as exc:
            new = translate(exc)
            if new is exc:
                raise
            self._error = new  # lets a server tell this socket's reset from others
            raise new from exc
        self._drained = self._plain and 0 < len(data) < size
        if data:
            self._heard = True
            if self._idle:
                self._busy()  # the next message arrived: no longer idle
        return data

    def _fill(self) -> bool:
        """Receive one chunk into the buffer; False at end of file."""
        if self._closed:
            raise _closed_error("Reader")
        if self._eof:
            return False
        if self._pos:
            # The only compaction: once per recv, and only the unconsumed tail moves.
            del self._buf[: self._pos]  # type: ignore[union-attr]  # bytes only when empty
            self._pos = 0
        data = self._recv(RECV_SIZE)
        if not data:
            self._eof = True
            return False
        if self._buf.__class__ is bytes:
            self._buf = bytearray(data)
        else:
            self._buf += data
        return True

    def _find(self, delim: bytes, max_length: int, slack: int = 0) -> int:
        """Receive until ``delim`` starts within ``max_length + slack`` bytes of the offset.

        Called after the buffered bytes were searched in vain. Returns the index of
        ``delim`` in the buffer, -1 at end of file; raises ``LineTooLong`` once that
        many bytes and a whole ``delim`` are buffered without it.
        """
        width = max_length + slack + len(delim)
        while True:
            have = len(self._buf) - self._pos
            if have >= width:
                raise LineTooLong(f"no {delim!r} within max_length={max_length} bytes")
            # Earlier bytes were searched; a delimiter may straddle the old end.
            searched = max(0, have - len(delim) + 1)
            if not self._fill():
                return -1
            pos = self._pos
            end = self._buf.find(delim, pos + searched, pos + width)
            if end >= 0:
                return end

    def _take_last(self, max_length: int) -> bytes | None:
        """At end of file: the unterminated rest, or None when nothing is left."""
        have = len(self._buf) - self._pos
        if not have:
            return None
        if have > max_length:
            raise LineTooLong(f"last line longer than max_length={max_length} bytes")
        return self._take(have)

    def _take(self, n: int) -> bytes:
        pos = self._pos
        data = bytes(self._buf[pos:pos + n])
        self._advance(pos + n)
        return data

    def _advance(self, pos: int) -> None:
        if pos == len(self._buf):
            # All consumed: release the memory now (idle connections hold no buffer).
            self._buf = _EMPTY
            self._pos = 0
        else:
            self._pos = pos


class Writer:
    """Buffered, never-blocking writing to a connected stream socket.

    ``write`` appends to a buffer and returns at once; the hub sends the data without
    an explicit flush (all writes made in one hub iteration go out in one ``send``).
    A ``bytes`` write of at least :data:`EAGER_SEND_MIN` bytes made while nothing is
    pending goes to the kernel at once (one non-blocking ``send``, never waiting).
    :meth:`flush` waits until everything written so far is in the kernel.

    ``sock`` is a connected gevent stream socket. ``buffer_age_limit`` (seconds, or
    ``None`` for no limit) bounds how long written data may stay unsent: when the peer
    stops reading for that long, the writer fails with ``WriterBufferAgeExceeded``, shuts
    the socket down (a greenlet blocked reading the same socket gets end of file) and
    sets :attr:`consumer_left`. ``on_failure(exc)``, if given, is called once when the
    writer fails (for any reason); it runs in the hub and must not block.

    Resource handling: the writer owns ``sock``; :meth:`close` flushes (at most
    :data:`CLOSE_FLUSH_TIMEOUT` seconds) and closes it. A failed writer keeps the socket
    open (only shut down) until :meth:`close`. Unsent data is dropped when the writer
    fails or the close times out. Closing the socket by other means while data is
    pending fails the writer with ``OSError`` (``EBADF``).

    Error handling: ``write`` never raises a network error itself; errors found while
    sending are stored and raised by every later ``write`` and ``flush``:
    ``ConnectionReset`` when the peer is gone (``EPIPE``/``ECONNRESET``, also sets
    :attr:`consumer_left`), ``WriterBufferAgeExceeded``, or the socket's ``OSError``.
    After :meth:`close`, ``write`` and ``flush`` raise ``ValueError`` (or the stored
    error). ``close`` itself does not raise for a failed writer. A bad
    ``buffer_age_limit`` raises ``ValueError``, a non-callable ``on_failure`` ``TypeError``.
    """

    __slots__ = ("_age_limit", "_age_marks", "_buf", "_callback", "_closed", "_consumer_left",
                 "_error", "_flushers", "_head", "_on_failure",
                 "_raw", "_sent", "_sock", "_state", "_timer", "_watcher", "_written")

    def __init__(self, sock: gsocket.socket,
                 buffer_age_limit: float | None = DEFAULT_BUFFER_AGE_LIMIT, *,
                 on_failure: Callable[[BaseException], object] | None = None) -> None:
        self._age_limit = _checks.seconds("buffer_age_limit", buffer_age_limit, optional=True)
        if on_failure is not None and not callable(on_failure):
            raise TypeError(f"on_failure must be callable or None, not "
                            f"{type(on_failure).__name__}")
        fd = sock.fileno()
        if fd < 0:
            raise ValueError("sock is closed")
        self._sock = sock
        # A plain socket's non-blocking stdlib socket (a gevent socket's, or a lean
        # connection's) sends without a wrapper; a TLS socket must go through its SSL
        # object.
        self._raw: Any = _gevent.raw_socket(sock) if _gevent.is_plain(sock) else None
        # As the Reader's: shared and empty until bytes must wait in it.
        self._buf: bytes | bytearray = _EMPTY
        # A bytes object written while nothing was pending is kept as is (no copy into
        # _buf) until the hub sends it; while _head is set, _buf is empty.
        self._head: bytes | None = None
        self._state = _IDLE
        self._callback: Any = None   # the scheduled hub callback (_SCHEDULED)
        self._watcher: Any = None    # io watcher, created on the first stall, then reused
        self._timer: Any = None      # age timer, likewise
        self._age_marks: deque[tuple[float, int]] | None = None
        self._flushers: list[tuple[int, Event]] | None = None
        self._error: BaseException | None = None
        self._closed = False
        # Created on first access; True: the peer left before anyone asked.
        self._consumer_left: Event | bool | None = None
        self._on_failure = on_failure
        self._written = 0
        self._sent = 0

    def __repr__(self) -> str:
        state = ("closed" if self._closed else "failed" if self._error is not None
                 else ("idle", "scheduled", "waiting")[self._state])
        return f"<Writer {state} written={self._written} pending={self.bytes_pending}>"

    # -- state --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def bytes_written(self) -> int:
        """Bytes passed to :meth:`write` so far."""
        return self._written

    @property
    def bytes_pending(self) -> int:
        """Bytes buffered, not yet in the kernel (0 after failure or close: dropped)."""
        head = self._head
        return len(self._buf) + (len(head) if head is not None else 0)

    @property
    def consumer_left(self) -> Event:
        """Set when the peer is gone: a send failed with ``EPIPE``/``ECONNRESET``, or the
        ``buffer_age_limit`` was exceeded. (A peer that leaves is only noticed when
        data is sent to it.)"""
        event = self._consumer_left
        if isinstance(event, Event):
            return event
        made = self._consumer_left = Event()
        if event is True:
            made.set()
        return made

    # -- writing ------------------------------------------------------------------------

    def write(self, data: Buffer) -> None:
        """Append ``data`` (bytes-like) to the buffer; never blocks.

        The data is sent by the hub soon after (no flush needed). Raises the stored
        error if the writer failed, ``ValueError`` if it is closed.
        """
        if self._error is not None or self._closed:
            self._raise_unusable()
        buf = self._buf
        head = self._head
        if type(data) is bytes and head is None and not buf:
            size = len(data)
            self._written += size
            if size >= EAGER_SEND_MIN and self._state == _IDLE:
                sent = self._send_now(data)
                if sent == size:
                    return
                data = data[sent:]
            self._head = data  # immutable: nothing to copy (the common echo case)
            pending = bool(data)
        else:
            if buf.__class__ is bytes:
                buf = self._buf = bytearray()
            if head is not None:
                buf += head  # a second write in this hub iteration: coalesce
                self._head = None
            before = len(buf)
            try:
                buf += data
            except TypeError:
                raise TypeError(f"data must be bytes-like, not {type(data).__name__}") from None
            self._written += len(buf) - before
            pending = bool(buf)
        if self._state == _IDLE and pending:
            self._state = _SCHEDULED
            self._callback = gevent.get_hub().loop.run_callback(self._on_scheduled)

    def flush(self) -> None:
        """Block until every byte written so far is in the kernel.

        Raises the writer's error if it failed (before or while waiting), and
        ``ValueError`` if it is (or gets) closed before the data was sent.
        """
        if self._error is not None or self._closed:
            self._raise_unusable()
        target = self._written
        if self._sent < target:
            self._wait_sent(target, None)
            if self._error is not None or self._sent < target:
                self._raise_unusable()

    def close(self) -> None:
        """Flush (at most :data:`CLOSE_FLUSH_TIMEOUT` seconds), then close the socket.

        Idempotent; a second call returns at once. Does not raise when the writer
        failed or the flush timed out (the unsent data is dropped). If the calling
        greenlet is killed while flushing, the socket is still closed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None and self._sent < self._written:
                self._wait_sent(self._written, CLOSE_FLUSH_TIMEOUT)
        finally:
            self._release()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _raise_unusable(self) -> NoReturn:
        if self._error is not None:
            # A fresh traceback each time: the stored error is raised again and again.
            raise self._error.with_traceback(None)
        raise _closed_error("Writer")

    def _send_now(self, data: bytes) -> int:
        """The eager send of a large write on an idle writer: what the kernel takes now.
        Sends only on a plain socket; anything but success (``EAGAIN``, an error) sends
        nothing here, and the hub's send retries it (and reports an error there)."""
        try:
            raw = self._plain_raw()
            if raw is None:
                return 0
            sent: int = raw.send(data)
        except OSError:
            return 0
        self._sent += sent
        return sent

    # -- the send path (runs in the hub) ------------------------------------------------

    def _on_scheduled(self) -> None:
        self._callback = None
        self._send()

    def _send(self) -> None:
        """Send what the kernel takes now; then go idle or wait for writability."""
        buf = self._buf
        head = self._head
        data = buf if head is None else head
        raw = self._raw
        want = _gevent.WRITE
        sock = self._sock
        try:
            if raw is not None and _gevent.holds(sock, raw):
                sent = raw.send(data)
            elif isinstance(self._sock, gssl.SSLSocket):
                sent, want = self._send_tls(data)
            elif raw is not None:
                sent = self._plain_raw().send(data)  # EBADF once closed
            else:
                # A subclass of gevent's socket: its own send (timeout=0.0: never wait,
                # this is the hub).
                sent = self._sock.send(data, 0, 0.0)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(_translated(exc))
            return
        if head is not None:
            self._head = None
            if sent < len(head):
                buf = self._buf = bytearray(memoryview(head)[sent:])
        elif sent:
            del buf[:sent]  # type: ignore[union-attr]  # bytes only when empty
        if sent:
            self._sent += sent
            if self._flushers:
                self._wake_flushers()
        if buf:
            self._wait_for(want or _gevent.WRITE)
        else:
            self._buf = _EMPTY  # an idle writer holds no buffer
            self._become_idle()

    def _plain_raw(self) -> Any:
        """The stdlib socket to send on (``None`` for TLS). It changes when a server's
        lean connection gets its gevent socket; ``EBADF`` once the socket is closed."""
        raw = self._raw
        if raw is None or _gevent.holds(self._sock, raw):
            return raw
        raw = _gevent.raw_socket(self._sock)
        if raw is None:
            raise OSError(errno.EBADF, "Bad file descriptor")
        self._raw = raw
        return raw

    def _send_tls(self, data: Buffer) -> tuple[int, int]:
        """Send what the TLS layer takes now, one record's worth per SSL write: OpenSSL
        (without partial writes) reports a write only once all of it is out, so a large
        buffer would count as unsent, age and flush included, until its very end.
        Never gevent's SSLSocket.send here: it waits (by the socket's timeout, not its
        argument), and the hub must not wait."""
        # Copies, not memoryview slices: an error's traceback would keep a slice, and
        # with it an export that forbids resizing the buffer (a copy of 16 KiB costs
        # little next to encrypting it; OpenSSL accepts the retry from a moved buffer).
        sent = 0
        while sent < len(data):
            n, want = _gevent.tls_send_nowait(self._sock, data[sent:sent + TLS_RECORD])
            sent += n
            if want:
                return sent, want
        return sent, 0

    def _wait_for(self, event: int) -> None:
        """Send again when the socket is ready: writable, or (TLS only, rarely: the
        TLS layer needs the peer's bytes first) readable."""
        watcher = self._watcher
        if watcher is not None and watcher.events & _gevent.EVENTS != event:
            watcher.close()  # a TLS write waited for the other event last time
            watcher = self._watcher = None
        if watcher is None:
            watcher = self._watcher = gevent.get_hub().loop.io(self._sock.fileno(), event)
        if self._state == _WAITING and watcher.active:
            return
        self._state = _WAITING
        watcher.start(self._send)
        if self._age_limit is not None and not (self._timer is not None and self._timer.active):
            self._start_age_checks(self._age_limit)

    def _become_idle(self) -> None:
        if self._state == _WAITING:
            self._watcher.stop()
            if self._timer is not None:
                self._timer.stop()
        self._state = _IDLE

    # -- buffer age ---------------------------------------------------------------------

    def _start_age_checks(self, limit: float) -> None:
        # Marks are (time, bytes written by then). Every byte counted in a mark was
        # written at or before its time, so a mark not yet fully sent whose time is
        # `limit` old proves a byte unsent for at least `limit`: no false alarms.
        loop = gevent.get_hub().loop
        if self._timer is None:
            period = limit / AGE_CHECKS_PER_LIMIT
            self._timer = loop.timer(period, period)
            self._age_marks = deque()
        loop.update_now()
        marks = self._age_marks
        assert marks is not None
        marks.clear()
        marks.append((loop.now(), self._written))
        self._timer.start(self._check_age)

    def _check_age(self) -> None:
        marks = self._age_marks
        limit = self._age_limit
        assert marks is not None and limit is not None
        while marks and marks[0][1] <= self._sent:
            marks.popleft()
        now = gevent.get_hub().loop.now()
        if marks and now - marks[0][0] >= limit:
            # The kernel's shutdown, not gevent's (which would throw EBADF into a
            # greenlet reading this socket; the kernel's gives it end of file).
            _gevent.kernel_shutdown(self._sock)
            self._fail(WriterBufferAgeExceeded(
                f"{self.bytes_pending} bytes unsent for more than "
                f"buffer_age_limit={limit} s: "
                f"the peer stopped reading"))
        else:
            marks.append((now, self._written))

    # -- failure, flushers, release -----------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        self._error = exc
        self._stop_sending()
        if isinstance(exc, (ConnectionReset, WriterBufferAgeExceeded)):
            if isinstance(self._consumer_left, Event):
                self._consumer_left.set()
            else:
                self._consumer_left = True
        if self._flushers:
            self._wake_flushers(everyone=True)
            # A failure found by a send the loop was fed (the fd closing under a
            # stalled writer) runs before the loop's poll: wake the flushers first.
            _gevent.wake_loop()
        if self._on_failure is not None:
            self._call_on_failure(self._on_failure, exc)

    def _call_on_failure(self, callback: Callable[[BaseException], object],
                         exc: BaseException) -> None:
        try:
            callback(exc)
        except Exception:
            # Nobody to raise to in the hub: report it the way gevent reports errors.
            gevent.get_hub().handle_error(self, *sys.exc_info())

    def _wait_sent(self, target: int, timeout: float | None) -> None:
        """Block until ``target`` bytes are sent, the writer failed, or ``timeout``."""
        done = Event()
        entry = (target, done)
        if self._flushers is None:
            self._flushers = []
        self._flushers.append(entry)
        try:
            done.wait(timeout)
        finally:
            if entry in self._flushers:
                self._flushers.remove(entry)

    def _wake_flushers(self, everyone: bool = False) -> None:
        flushers = self._flushers
        if not flushers:
            return
        keep = []
        for target, done in flushers:
            if everyone or target <= self._sent:
                done.set()
            else:
                keep.append((target, done))
        flushers[:] = keep

    def _stop_sending(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
        if self._state == _WAITING:
            self._become_idle()
        else:
            self._state = _IDLE
        self._buf = _EMPTY
        self._head = None

    def _release(self) -> None:
        self._stop_sending()
        for watcher in (self._watcher, self._timer):
            if watcher is not None:
                watcher.close()
        self._watcher = self._timer = None
        if self._flushers:
            self._wake_flushers(everyone=True)
        self._sock.close()


def _translated(exc: OSError) -> OSError:
    new = translate(exc)
    if new is not exc:
        new.__cause__ = exc
    return new
