"""greenserve's error classes, and the one place where socket ``OSError``\\s are translated.

Every network error is an ``OSError`` (so legacy ``except OSError`` and
``except ConnectionError`` keep working) with a precise meaning:

- ``ConnectionFailure`` and its subclasses: a connection could not be established.
- ``ConnectionReset``: an established flow was broken by the world (the peer reset it,
  or a write hit a closed pipe); data may have been lost.
- ``AddressLookupFailed``: name resolution failed.

Context (which address we were connecting to, whose connection a handler was serving)
is added with ``add_note``, never by rewriting the message. The translation lives in
:func:`translate` and :func:`translating`; nothing else in greenserve maps ``errno``
values to classes.
"""

from __future__ import annotations

import errno
import socket
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import gevent

__all__ = [
    "AddressLookupFailed",
    "Cancelled",
    "ConnectInterrupted",
    "ConnectTimeout",
    "ConnectionFailure",
    "ConnectionReset",
    "IncompleteRead",
    "LineTooLong",
    "NetError",
    "NoMatchingAddresses",
    "Refused",
    "WriterBufferAgeExceeded",
]


class NetError(OSError):
    """Base class of greenserve's network errors."""


class ConnectionFailure(NetError, ConnectionError):
    """A connection could not be established."""


class Refused(ConnectionFailure, ConnectionRefusedError):
    """The peer refused the connection (``ECONNREFUSED``)."""


class ConnectTimeout(ConnectionFailure, TimeoutError):
    """A connection attempt did not complete within its timeout."""


class NoMatchingAddresses(ConnectionFailure):
    """The name resolved, but to no address usable for the request."""


class ConnectInterrupted(ConnectionFailure):
    """The ``interrupt`` event fired before the connection was made."""


class AddressLookupFailed(NetError, socket.gaierror):
    """``getaddrinfo`` failed or returned nothing."""


class ConnectionReset(NetError, ConnectionResetError):
    """An established flow broke: ``ECONNRESET``, ``EPIPE`` or ``ECONNABORTED``."""


class WriterBufferAgeExceeded(NetError):
    """A ``Writer``'s unflushed data became older than its ``buffer_age_limit``."""


class IncompleteRead(EOFError):
    """``read_exactly`` reached end of file; ``partial`` holds the bytes that did arrive."""

    def __init__(self, partial: bytes, expected: int) -> None:
        super().__init__(f"end of file after {len(partial)} of {expected} bytes")
        self.partial = partial
        self.expected = expected


class LineTooLong(ValueError):
    """No line end (or delimiter) was found within ``max_length`` bytes."""


class Cancelled(gevent.GreenletExit):  # type: ignore[misc]  # gevent is untyped
    """Raised in a fiber (or a switch's body) when its switch is cancelled.

    A ``BaseException``: ``except Exception`` does not catch it. Code that catches it
    must re-raise it after cleaning up.
    """


# errno values that mean "the established flow is broken".
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
# TLS's words for a flow the peer broke: its connection ended without a close_notify
# (the socket's reset or end of file, as the TLS layer reports them).
_TLS_BROKEN = (ssl.SSLEOFError, ssl.SSLZeroReturnError)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10 (which has ``__notes__`` but no method)."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # pragma: no cover - exercised on 3.10 only
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


def _converted(exc: OSError, cls: type[OSError]) -> OSError:
    new = cls(exc.errno, exc.strerror) if exc.errno is not None else cls(*exc.args)
    for note in getattr(exc, "__notes__", ()):
        add_note(new, note)
    return new


def translate(exc: OSError, *, connecting: bool = False) -> OSError:
    """Return the greenserve error for ``exc`` (``exc`` itself when it has none).

    ``connecting=True`` means the error came from establishing a connection: a timeout
    then becomes :class:`ConnectTimeout` and a reset :class:`ConnectionFailure`.
    The caller raises the result ``from exc``.
    """
    if isinstance(exc, NetError):
        return exc
    if isinstance(exc, socket.gaierror):
        return _converted(exc, AddressLookupFailed)
    code = exc.errno
    if code == errno.ECONNREFUSED:
        return _converted(exc, Refused)
    if connecting:
        if isinstance(exc, TimeoutError) or code == errno.ETIMEDOUT:
            new = _converted(exc, ConnectTimeout)
            if not new.args:
                new.args = ("connection attempt timed out",)
            return new
        if code in _RESET_ERRNOS or code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return _converted(exc, ConnectionFailure)
        return exc
    if code in _RESET_ERRNOS or isinstance(exc, _TLS_BROKEN):
        return _converted(exc, ConnectionReset)
    return exc


def reraise(exc: OSError, note: str | None = None, *, connecting: bool = False) -> NoReturn:
    """Raise the translation of ``exc`` (chained ``from exc``), with ``note`` added.

    Call it from the ``except`` block that caught ``exc``.
    """
    new = translate(exc, connecting=connecting)
    if note is not None:
        add_note(new, note)
    if new is exc:
        raise exc
    raise new from exc


@contextmanager
def translating(note: str | None = None, *, connecting: bool = False) -> Iterator[None]:
    """Translate ``OSError``\\s raised in the block (see :func:`translate`).

    ``note`` is added to the raised error, e.g. ``"connecting to tcp:127.0.0.1:80"``.
    """
    try:
        yield
    except OSError as exc:
        reraise(exc, note, connecting=connecting)
