"""greenserve.errors: the class tree of docs/errors.md and the one OSError translation."""

from __future__ import annotations

import errno
import socket

import gevent
import pytest

import greenserve
from greenserve import errors
from greenserve.errors import translate, translating

BASES = {
    "NetError": (OSError,),
    "ConnectionFailure": (errors.NetError, ConnectionError),
    "Refused": (errors.ConnectionFailure, ConnectionRefusedError),
    "ConnectTimeout": (errors.ConnectionFailure, TimeoutError),
    "NoMatchingAddresses": (errors.ConnectionFailure,),
    "ConnectInterrupted": (errors.ConnectionFailure,),
    "AddressLookupFailed": (errors.NetError, socket.gaierror),
    "ConnectionReset": (errors.NetError, ConnectionResetError),
    "WriterBufferAgeExceeded": (errors.NetError,),
    "IncompleteRead": (EOFError,),
    "LineTooLong": (ValueError,),
    "Cancelled": (gevent.GreenletExit,),
}


@pytest.mark.parametrize(("name", "bases"), BASES.items())
def test_class_tree(name: str, bases: tuple[type, ...]) -> None:
    cls = getattr(errors, name)
    assert cls.__bases__ == bases
    assert getattr(greenserve, name) is cls


def test_cancelled_is_not_an_exception() -> None:
    assert not issubclass(greenserve.Cancelled, Exception)
    assert issubclass(greenserve.Cancelled, BaseException)


def test_incomplete_read_keeps_partial() -> None:
    exc = errors.IncompleteRead(b"ab", 5)
    assert exc.partial == b"ab" and exc.expected == 5
    assert "2 of 5" in str(exc)


@pytest.mark.parametrize(
    ("code", "connecting", "cls"),
    [
        (errno.ECONNREFUSED, False, errors.Refused),
        (errno.ECONNREFUSED, True, errors.Refused),
        (errno.ECONNRESET, False, errors.ConnectionReset),
        (errno.EPIPE, False, errors.ConnectionReset),
        (errno.ECONNABORTED, False, errors.ConnectionReset),
        (errno.ETIMEDOUT, True, errors.ConnectTimeout),
        (errno.ECONNRESET, True, errors.ConnectionFailure),
        (errno.EHOSTUNREACH, True, errors.ConnectionFailure),
    ],
)
def test_translate_errno(code: int, connecting: bool, cls: type) -> None:
    original = OSError(code, "boom")
    new = translate(original, connecting=connecting)
    assert type(new) is cls
    assert new.errno == code and new.strerror == "boom"


def test_translate_leaves_other_errors_alone() -> None:
    for exc in (OSError(errno.EBADF, "x"), OSError(errno.ETIMEDOUT, "x"), OSError("plain")):
        assert translate(exc) is exc


def test_translate_timeout_while_connecting() -> None:
    new = translate(TimeoutError("timed out"), connecting=True)
    assert isinstance(new, errors.ConnectTimeout) and isinstance(new, TimeoutError)


def test_translate_gaierror() -> None:
    new = translate(socket.gaierror(socket.EAI_NONAME, "unknown"))
    assert isinstance(new, errors.AddressLookupFailed) and isinstance(new, socket.gaierror)
    assert new.errno == socket.EAI_NONAME


def test_translating_chains_and_notes() -> None:
    with pytest.raises(errors.Refused) as info, \
            translating("connecting to tcp:127.0.0.1:1", connecting=True):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert info.value.__notes__ == ["connecting to tcp:127.0.0.1:1"]
    # legacy code that catches the builtin classes keeps working
    assert isinstance(info.value, ConnectionRefusedError)
    assert isinstance(info.value, ConnectionError)


def test_translating_adds_note_to_untranslated() -> None:
    with pytest.raises(OSError) as info, translating("doing x"):
        raise OSError(errno.EBADF, "bad")
    assert type(info.value) is OSError
    assert info.value.__notes__ == ["doing x"]


def test_real_reset_is_translated() -> None:
    # A real RST: the client closes with SO_LINGER 0 while data is unread.
    a, b = socket.socketpair(socket.AF_UNIX)
    a.close()
    with pytest.raises(errors.ConnectionReset), translating():
        b.send(b"x")  # EPIPE on a unix pair whose peer is gone
    b.close()
