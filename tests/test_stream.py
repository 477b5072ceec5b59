"""Tests for greenserve.stream: Reader and Writer on real loopback sockets.

Every test runs on a unix socketpair and on a 127.0.0.1 TCP connection. Synchronisation
is by blocking calls and events (a reader blocked in recv, ``flush``, ``Event.wait``),
never by sleeping. Socket subclasses count ``send``/``recv`` calls, and one caps what a
``recv`` returns to force data across chunk boundaries deterministically.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from gevent import socket as gsocket
from hypothesis import given, settings
from hypothesis import strategies as st

from greenserve import stream
from greenserve.errors import (
    ConnectionReset,
    IncompleteRead,
    LineTooLong,
    WriterBufferAgeExceeded,
)
from greenserve.stream import EAGER_SEND_MIN, Reader, Writer

pytestmark = pytest.mark.timeout(30)

Pair = tuple[gsocket.socket, gsocket.socket]

# Far more than a loopback connection with shrunken buffers can hold in the kernel
# (about 0.5 MiB): a writer with this much pending data to a peer that does not read stalls.
BIG = 4 * 1024 * 1024
SMALL_BUFFER = 65536


# --- sockets -----------------------------------------------------------------------------


def _make_pair(kind: str) -> Pair:
    if kind == "unix":
        a, b = gsocket.socketpair()
        return a, b
    with gsocket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = gsocket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


@pytest.fixture(params=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """(ours, peer): two connected gevent sockets, closed after the test."""
    a, b = _make_pair(request.param)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def stall_pair(pair: Pair) -> Pair:
    """Like ``pair``, with small kernel buffers so that BIG bytes cannot fit in them."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    return a, b


class CountingSocket(gsocket.socket):
    """A gevent socket that counts ``send``/``recv`` calls; ``recv_limit`` caps each recv."""

    def __init__(self, *args: Any, recv_limit: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sends = 0
        self.recvs = 0
        self.recv_limit = recv_limit

    def send(self, *args: Any, **kw: Any) -> int:
        self.sends += 1
        return super().send(*args, **kw)  # type: ignore[no-any-return]

    def recv(self, n: int, *args: Any) -> bytes:
        self.recvs += 1
        if self.recv_limit is not None:
            n = min(n, self.recv_limit)
        return super().recv(n, *args)  # type: ignore[no-any-return]


def counting(sock: gsocket.socket, recv_limit: int | None = None) -> CountingSocket:
    """Move ``sock``'s fd into a CountingSocket (``sock`` is left detached)."""
    return CountingSocket(fileno=sock.detach(), recv_limit=recv_limit)


Counted = Callable[..., CountingSocket]


@pytest.fixture
def counted(pair: Pair) -> Iterator[Counted]:
    """``counted(recv_limit=None)``: ``pair[0]`` as a CountingSocket, closed after the test
    (also when it fails, so a failure is not reported twice as a leaked fd)."""
    made: list[CountingSocket] = []

    def make(recv_limit: int | None = None) -> CountingSocket:
        made.append(counting(pair[0], recv_limit))
        return made[-1]

    yield make
    for sock in made:
        sock.close()


def recv_exactly(sock: gsocket.socket, n: int, into: bytearray | None = None) -> bytes:
    got = bytearray() if into is None else into
    while len(got) < n:
        chunk = sock.recv(min(65536, n - len(got)))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def recv_until_eof(sock: gsocket.socket) -> bytes:
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    return bytes(got)


def pattern(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# --- Reader: read, read_exactly ------------------------------------------------------------


def test_read_returns_what_arrived_then_empty_at_eof(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"hello")
    assert reader.read() == b"hello"
    b.shutdown(socket.SHUT_WR)
    assert reader.read() == b""
    assert reader.read() == b""  # EOF is sticky
    reader.close()


def test_read_returns_buffered_data_first_and_respects_max_bytes(pair: Pair,
                                                                 counted: Counted) -> None:
    _, b = pair
    sock = counted()
    reader = Reader(sock)
    b.sendall(b"line\nabcdefgh")
    assert reader.read_line() == b"line"
    assert reader.read(3) == b"abc"
    assert reader.read() == b"defgh"
    assert sock.recvs == 1
    reader.close()


def test_no_recv_when_the_buffer_already_holds_the_answer(pair: Pair, counted: Counted) -> None:
    _, b = pair
    sock = counted()
    reader = Reader(sock)
    # Loopback delivers sendall's bytes before it returns: one recv gets them all. The
    # peer stays open, so an unneeded recv would block (and time the test out).
    b.sendall(b"one\ntwo\r\nthree\n0123456789")
    assert reader.read_line() == b"one"
    assert reader.read_line() == b"two"
    assert next(reader) == b"three"
    assert reader.read_exactly(4) == b"0123"
    assert reader.read_until(b"6") == b"45"
    assert reader.read(2) == b"78"
    assert reader.read_exactly(1) == b"9"
    assert sock.recvs == 1
    reader.close()


def test_read_exactly_across_many_receives(pair: Pair, counted: Counted) -> None:
    _, b = pair
    reader = Reader(counted(recv_limit=7))
    data = pattern(1000)
    b.sendall(data)
    assert reader.read_exactly(10) == data[:10]
    assert reader.read_exactly(0) == b""
    assert reader.read_exactly(990) == data[10:]
    reader.close()


def test_read_exactly_large(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    data = pattern(BIG)
    sender = gevent.spawn(b.sendall, data)
    assert reader.read_exactly(BIG) == data
    sender.get()
    reader.close()


def test_read_exactly_at_eof_raises_incomplete_read_with_partial(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"abc")
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(IncompleteRead) as info:
        reader.read_exactly(5)
    assert info.value.partial == b"abc"
    assert info.value.expected == 5
    assert isinstance(info.value, EOFError)
    assert reader.read() == b""  # the partial bytes were consumed
    reader.close()


def test_read_reset_by_peer_raises_connection_reset() -> None:
    a, b = _make_pair("tcp")  # a reset (RST) is a TCP notion: no unix variant
    reader = Reader(a)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()  # linger 0: the kernel sends RST
    with pytest.raises(ConnectionReset) as info:
        reader.read()
    assert isinstance(info.value, ConnectionResetError)
    assert isinstance(info.value.__cause__, OSError)
    reader.close()


# --- Reader: lines -------------------------------------------------------------------------


def test_read_line_strips_lf_and_crlf(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"unix\nwindows\r\n\nbare\rcr\n")
    assert reader.read_line() == b"unix"
    assert reader.read_line() == b"windows"
    assert reader.read_line() == b""
    assert reader.read_line() == b"bare\rcr"  # only a \r right before \n belongs to the end
    reader.close()


def test_read_line_final_unterminated_line_then_none(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"first\nlast\r")
    b.shutdown(socket.SHUT_WR)
    assert reader.read_line() == b"first"
    assert reader.read_line() == b"last\r"  # not a line end: returned as is
    assert reader.read_line() is None
    assert reader.read_line() is None
    reader.close()


def test_read_line_none_at_eof_with_nothing_buffered(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.close()
    assert reader.read_line() is None
    assert reader.read_until(b"--") is None
    reader.close()


def test_read_line_waits_for_the_rest_of_a_line(pair: Pair, counted: Counted) -> None:
    _, b = pair
    reader = Reader(counted(recv_limit=1))
    b.sendall(b"sp")
    sender = gevent.spawn(b.sendall, b"lit\r\nnext\n")
    assert reader.read_line() == b"split"
    assert reader.read_line() == b"next"
    sender.get()
    reader.close()


@pytest.mark.parametrize("end", [b"\n", b"\r\n"])
def test_read_line_max_length_is_the_line_without_its_end(pair: Pair, counted: Counted,
                                                            end: bytes) -> None:
    _, b = pair
    reader = Reader(counted(recv_limit=3))
    b.sendall(b"x" * 10 + end + b"y" * 11 + end)
    assert reader.read_line(max_length=10) == b"x" * 10
    with pytest.raises(LineTooLong):
        reader.read_line(max_length=10)
    assert reader.read_line(max_length=11) == b"y" * 11
    reader.close()


def test_line_too_long_consumes_nothing_and_the_reader_stays_usable(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"z" * 100 + b"\nok\n")
    with pytest.raises(LineTooLong) as info:
        reader.read_line(max_length=10)
    assert isinstance(info.value, ValueError)
    assert reader.read_line(max_length=100) == b"z" * 100
    assert reader.read_line() == b"ok"
    reader.close()


def test_line_too_long_against_a_peer_that_never_sends_a_newline(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)

    def endless() -> None:
        chunk = b"x" * 65536
        while True:
            b.sendall(chunk)

    sender = gevent.spawn(endless)
    try:
        # A reader that buffered without bound would wait here forever.
        with gevent.Timeout(10), pytest.raises(LineTooLong):
            reader.read_line(max_length=1000)
    finally:
        sender.kill()
    reader.close()


def test_last_line_too_long_at_eof(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"x" * 11)
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(LineTooLong):
        reader.read_line(max_length=10)
    assert reader.read_line(max_length=11) == b"x" * 11
    assert reader.read_line() is None
    reader.close()


def test_read_until_multibyte_delimiter_split_across_receives(pair: Pair, counted: Counted) -> None:
    _, b = pair
    reader = Reader(counted(recv_limit=1))  # every byte in its own recv
    b.sendall(b"head\r\n\r\nbody--x--")
    b.shutdown(socket.SHUT_WR)
    assert reader.read_until(b"\r\n\r\n") == b"head"
    assert reader.read_until(b"--") == b"body"
    assert reader.read_until(b"--") == b"x"
    assert reader.read_until(b"--") is None
    reader.close()


def test_read_until_limit_and_unterminated_rest(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"abcdef;;ghi")
    b.shutdown(socket.SHUT_WR)
    with pytest.raises(LineTooLong):
        reader.read_until(b";;", max_length=5)
    assert reader.read_until(b";;", max_length=6) == b"abcdef"
    assert reader.read_until(b";;") == b"ghi"
    assert reader.read_until(b";;") is None
    reader.close()


def test_iteration_yields_lines_until_eof(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"a\r\nb\n\nc")
    b.shutdown(socket.SHUT_WR)
    assert list(reader) == [b"a", b"b", b"", b"c"]
    assert list(reader) == []
    reader.close()


_PIECES = st.sampled_from([b"a", b"bc", b"\r", b"\n", b"\r\n", b"--", b"-"])


def _payloads() -> st.SearchStrategy[bytes]:
    return st.lists(_PIECES, max_size=60).map(b"".join)


def _line_model(payload: bytes) -> list[bytes]:
    *lines, rest = payload.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    return [*lines, rest] if rest else lines


def _read_all(payload: bytes, recv_limit: int, read: Any) -> list[bytes]:
    a, b = gsocket.socketpair()
    reader = Reader(counting(a, recv_limit=recv_limit))
    try:
        b.sendall(payload)
        b.shutdown(socket.SHUT_WR)
        out = []
        while (item := read(reader)) is not None:
            out.append(item)
        return out
    finally:
        reader.close()
        b.close()


@settings(max_examples=150, deadline=None)
@given(payload=_payloads(), recv_limit=st.integers(1, 8))
def test_lines_do_not_depend_on_how_data_arrives(payload: bytes, recv_limit: int) -> None:
    assert _read_all(payload, recv_limit, Reader.read_line) == _line_model(payload)


@settings(max_examples=150, deadline=None)
@given(payload=_payloads(), recv_limit=st.integers(1, 8))
def test_read_until_does_not_depend_on_how_data_arrives(payload: bytes, recv_limit: int) -> None:
    *chunks, rest = payload.split(b"--")
    expected = [*chunks, rest] if rest else chunks
    got = _read_all(payload, recv_limit, lambda r: r.read_until(b"--"))
    assert got == expected


# --- Reader: arguments and closing ---------------------------------------------------------


def test_reader_bad_arguments(pair: Pair) -> None:
    a, _ = pair
    reader = Reader(a)
    for bad, exc in [(0, ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError),
                     (1.5, TypeError)]:
        with pytest.raises(exc, match="max_bytes"):
            reader.read(bad)
        with pytest.raises(exc, match="max_length"):
            reader.read_line(bad)
        with pytest.raises(exc, match="max_length"):
            reader.read_until(b"x", bad)
    with pytest.raises(ValueError, match="n must be >= 0"):
        reader.read_exactly(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        reader.read_exactly(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delim"):
        reader.read_until(b"")
    with pytest.raises(TypeError, match="delim"):
        reader.read_until("\n")  # type: ignore[arg-type]
    reader.close()


def test_reader_close_is_idempotent_and_closes_the_socket(pair: Pair) -> None:
    a, b = pair
    reader = Reader(a)
    b.sendall(b"unread\n")
    assert not reader.closed
    reader.close()
    reader.close()
    assert reader.closed
    assert a.fileno() == -1
    for call in (reader.read, reader.read_line, lambda: reader.read_exactly(1)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_reader_context_manager_closes(pair: Pair) -> None:
    a, _ = pair
    with Reader(a) as reader:
        pass
    assert reader.closed and a.fileno() == -1


# --- Writer: sending -----------------------------------------------------------------------


def test_write_is_sent_without_flush(pair: Pair) -> None:
    a, b = pair
    writer = Writer(a)
    writer.write(b"hello ")
    writer.write(bytearray(b"world"))
    writer.write(memoryview(b"!"))
    assert recv_exactly(b, 12) == b"hello world!"  # the peer blocks; the hub sends
    assert writer.bytes_written == 12
    assert writer.bytes_pending == 0
    writer.close()


def test_writes_in_one_hub_iteration_go_out_in_one_send(pair: Pair, counted: Counted) -> None:
    _, b = pair
    sock = counted()
    writer = Writer(sock)
    for i in range(100):
        writer.write(b"%03d," % i)
    assert sock.sends == 0  # write never sends itself
    assert writer.bytes_pending == 400
    writer.flush()
    assert sock.sends == 1
    assert recv_exactly(b, 400) == b"".join(b"%03d," % i for i in range(100))
    writer.write(b"again")  # an idle writer schedules one send again
    writer.flush()
    assert sock.sends == 2
    assert recv_exactly(b, 5) == b"again"
    writer.close()


def test_a_large_write_on_an_idle_writer_is_in_the_kernel_when_write_returns(
        pair: Pair) -> None:
    a, b = pair
    writer = Writer(a)
    data = pattern(EAGER_SEND_MIN)
    writer.write(data)
    # No hub iteration has run: the write itself sent it.
    assert writer.bytes_pending == 0 and writer.bytes_written == len(data)
    assert "idle" in repr(writer)
    writer.write(b"x" * (EAGER_SEND_MIN - 1))  # a smaller one waits for the hub
    assert writer.bytes_pending == EAGER_SEND_MIN - 1
    writer.flush()
    assert recv_exactly(b, 2 * EAGER_SEND_MIN - 1) == data + b"x" * (EAGER_SEND_MIN - 1)
    writer.close()


def test_a_large_write_behind_pending_data_keeps_its_order(pair: Pair) -> None:
    a, b = pair
    writer = Writer(a)
    big = pattern(4 * EAGER_SEND_MIN)
    writer.write(b"head")   # pending until the hub sends it
    writer.write(big)       # so this one must queue behind it, not go out first
    writer.write(b"tail")
    assert writer.bytes_pending == len(big) + 8
    assert recv_exactly(b, len(big) + 8) == b"head" + big + b"tail"
    writer.close()


def test_a_large_write_to_a_reset_peer_fails_the_writer_later(pair: Pair) -> None:
    a, b = pair
    if a.family == socket.AF_UNIX:
        b.close()  # a unix peer that is gone: EPIPE
    else:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # RST
    writer = Writer(a)
    writer.write(pattern(EAGER_SEND_MIN))  # write itself never raises a network error
    assert writer.bytes_pending == EAGER_SEND_MIN  # the kernel refused it: the hub retries
    with pytest.raises(ConnectionReset):
        writer.flush()  # ... and the hub's send found the error
    assert writer.consumer_left.is_set()
    with pytest.raises(ConnectionReset):
        writer.write(b"more")
    writer.close()


def test_empty_write_sends_nothing(pair: Pair, counted: Counted) -> None:
    sock = counted()
    writer = Writer(sock)
    writer.write(b"")
    writer.flush()
    assert sock.sends == 0
    writer.close()


def test_write_never_blocks_even_when_the_peer_does_not_read(stall_pair: Pair) -> None:
    a, b = stall_pair
    writer = Writer(a)
    data = pattern(10 * 1024 * 1024)
    started = time.monotonic()
    for offset in range(0, len(data), 1024 * 1024):
        writer.write(data[offset:offset + 1024 * 1024])
    assert time.monotonic() - started < 5  # only memory copies, no waiting
    # The first write went to the kernel in part (it was large and nothing was pending);
    # the kernel holds well under 1 MiB here, everything else waits in the writer.
    assert len(data) - 1024 * 1024 < writer.bytes_pending < len(data)
    assert recv_exactly(b, len(data)) == data  # everything arrives, in order
    writer.flush()
    assert writer.bytes_pending == 0
    writer.close()


def test_writes_after_a_partly_sent_write_keep_their_order(stall_pair: Pair) -> None:
    a, b = stall_pair
    writer = Writer(a)
    data = pattern(BIG)
    writer.write(data)  # kept without a copy until the hub sends it
    gevent.idle()  # the hub sent what the kernel took: the rest waits for writability
    assert 0 < writer.bytes_pending < len(data)
    writer.write(b"tail")
    writer.write(bytearray(b"!"))
    assert writer.bytes_pending > 5
    assert recv_exactly(b, len(data) + 5) == data + b"tail!"
    writer.flush()
    assert writer.bytes_pending == 0
    writer.close()


def test_flush_waits_until_everything_is_in_the_kernel(stall_pair: Pair) -> None:
    a, b = stall_pair
    writer = Writer(a)
    data = pattern(BIG)
    writer.write(data)
    received = bytearray()
    drainer = gevent.spawn(recv_exactly, b, len(data), received)
    writer.flush()
    assert writer.bytes_pending == 0
    # The kernel holds well under 1 MiB here: flush returned only once the peer had
    # read most of the data.
    assert len(received) >= len(data) - 1024 * 1024
    assert drainer.get(timeout=10) == data
    writer.close()


def test_flush_on_an_idle_writer_returns_at_once(pair: Pair) -> None:
    # "At once": without yielding to the hub, so a greenlet spawned just before (it runs
    # at the hub's next turn) has not run when flush returns.
    a, b = pair
    writer = Writer(a)

    def flush_without_yielding() -> None:
        ran: list[bool] = []
        other = gevent.spawn(ran.append, True)
        writer.flush()
        assert ran == []
        other.join()  # and it does run once this greenlet yields
        assert ran == [True]

    flush_without_yielding()  # nothing written yet
    writer.write(b"sent")
    writer.flush()  # waits for the hub to send it
    flush_without_yielding()  # everything written is sent
    assert recv_exactly(b, 4) == b"sent"
    writer.close()


def test_close_flushes_then_closes(stall_pair: Pair) -> None:
    a, b = stall_pair
    writer = Writer(a)
    data = pattern(BIG)
    writer.write(data)
    drainer = gevent.spawn(recv_until_eof, b)
    writer.close()
    assert writer.closed
    assert a.fileno() == -1
    assert drainer.get(timeout=10) == data  # all data, then EOF


def test_close_gives_up_after_the_flush_timeout(stall_pair: Pair,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = stall_pair
    monkeypatch.setattr(stream, "CLOSE_FLUSH_TIMEOUT", 0.2)
    writer = Writer(a, buffer_age_limit=None)
    writer.write(pattern(BIG))
    flusher = gevent.spawn(writer.flush)
    started = time.monotonic()
    writer.close()  # does not raise: the data is dropped
    assert 0.15 <= time.monotonic() - started < 10
    assert writer.closed and a.fileno() == -1
    assert writer.bytes_pending == 0
    with pytest.raises(ValueError, match="closed"):
        flusher.get(timeout=10)


def test_close_is_idempotent_and_later_writes_raise(pair: Pair) -> None:
    a, b = pair
    writer = Writer(a)
    writer.write(b"bye")
    with writer:
        pass
    writer.close()
    assert writer.closed
    assert recv_until_eof(b) == b"bye"
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"more")
    with pytest.raises(ValueError, match="closed"):
        writer.flush()


# --- Writer: failures ----------------------------------------------------------------------


def test_consumer_left_when_the_peer_closed(pair: Pair) -> None:
    a, b = pair
    failures: list[BaseException] = []
    writer = Writer(a, on_failure=failures.append)
    left = writer.consumer_left
    assert not left.is_set()
    b.close()
    # TCP: the first send is accepted and answered with RST; a later one fails.
    with gevent.Timeout(10), pytest.raises(ConnectionReset) as info:
        for _ in range(100):
            writer.write(b"ping")
            writer.flush()
    assert isinstance(info.value.__cause__, OSError)
    assert left.is_set()
    assert failures == [info.value]
    with pytest.raises(ConnectionReset):
        writer.write(b"more")
    with pytest.raises(ConnectionReset):
        writer.flush()
    writer.close()  # does not raise
    assert len(failures) == 1


def test_buffer_age_limit_fails_the_writer_and_frees_the_connection(stall_pair: Pair) -> None:
    a, _ = stall_pair
    failures: list[BaseException] = []
    writer = Writer(a, buffer_age_limit=0.2, on_failure=failures.append)
    reader = Reader(a)
    blocked_read = gevent.spawn(reader.read)  # the peer sends nothing: blocks
    started = time.monotonic()
    writer.write(pattern(BIG))
    with gevent.Timeout(10):
        with pytest.raises(WriterBufferAgeExceeded) as info:
            writer.flush()
        assert blocked_read.get() == b""  # shutdown woke it with end of file
    assert time.monotonic() - started >= 0.19  # never early (0.01: clock granularity)
    assert "buffer_age_limit" in str(info.value)
    assert isinstance(info.value, OSError)
    assert writer.consumer_left.is_set()  # created after the failure: set at once
    assert failures == [info.value]
    assert writer.bytes_pending == 0
    with pytest.raises(WriterBufferAgeExceeded):
        writer.write(b"more")
    writer.close()
    reader.close()
    assert len(failures) == 1


def test_buffer_age_limit_spares_a_writer_whose_data_was_sent(pair: Pair) -> None:
    a, b = pair
    writer = Writer(a, buffer_age_limit=0.05)
    writer.write(b"data")
    writer.flush()
    assert recv_exactly(b, 4) == b"data"
    # Idle for four times the limit: nothing is pending, so nothing may fail.
    assert not writer.consumer_left.wait(timeout=0.2)
    writer.write(b"more")
    writer.flush()
    writer.close()


def test_closing_the_socket_under_a_stalled_writer_fails_it(stall_pair: Pair) -> None:
    a, _ = stall_pair
    failures: list[BaseException] = []
    writer = Writer(a, buffer_age_limit=None, on_failure=failures.append)
    writer.write(pattern(BIG))
    gevent.idle()  # the hub ran the send callback: the writer waits for writability
    assert 0 < writer.bytes_pending < writer.bytes_written
    Reader(a).close()
    with gevent.Timeout(10), pytest.raises(OSError) as info:
        writer.flush()
    assert info.value.errno == errno.EBADF
    assert failures == [info.value]
    assert not writer.consumer_left.is_set()
    writer.close()


# --- Writer: arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "error"), [
    (0, ValueError), (-1, ValueError), (0.0, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError), ("x", TypeError), (True, TypeError), ([1], TypeError)])
def test_writer_rejects_a_bad_buffer_age_limit(pair: Pair, bad: object,
                                               error: type[Exception]) -> None:
    a, _ = pair
    with pytest.raises(error, match="buffer_age_limit"):
        Writer(a, buffer_age_limit=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [None, 1, 0.5])
def test_writer_accepts_a_good_buffer_age_limit(pair: Pair, limit: float | None) -> None:
    a, _ = pair
    Writer(a, buffer_age_limit=limit).close()


def test_writer_rejects_other_bad_arguments(pair: Pair) -> None:
    a, _ = pair
    with pytest.raises(TypeError, match="on_failure"):
        Writer(a, on_failure=5)  # type: ignore[arg-type]
    writer = Writer(a)
    with pytest.raises(TypeError, match="data must be bytes-like"):
        writer.write("text")  # type: ignore[arg-type]
    assert writer.bytes_written == 0
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        Writer(a)


def test_reader_and_writer_share_one_socket(pair: Pair) -> None:
    a, b = pair
    reader, writer = Reader(a), Writer(a)

    def echo_peer() -> None:
        while line := b.recv(65536):
            b.sendall(line.upper())

    peer = gevent.spawn(echo_peer)
    for word in (b"one\n", b"two\n"):
        writer.write(word)
        assert reader.read_line() == word.strip().upper()
    writer.close()
    reader.close()
    peer.get(timeout=10)


def test_repr(pair: Pair) -> None:
    a, _ = pair
    reader, writer = Reader(a), Writer(a)
    assert "open" in repr(reader) and "idle" in repr(writer)
    writer.close()
    reader.close()
    assert "closed" in repr(reader) and "closed" in repr(writer)


def test_no_fd_is_created_per_writer(pair: Pair) -> None:
    a, _ = pair
    before = set(os.listdir("/proc/self/fd"))
    writers = [Writer(a) for _ in range(10)]
    assert set(os.listdir("/proc/self/fd")) == before
    for writer in writers:
        writer.close()
