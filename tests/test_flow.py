"""greenserve.Flow over real loopback sockets."""

from __future__ import annotations

import gevent
import pytest

from greenserve import ConnectionReset, Switch, Tcp, net
from greenserve.flow import Flow

from .helpers import connected_pair, reset


def test_read_write_round_trip() -> None:
    with connected_pair() as (c, s):
        c.write(b"hello")
        assert s.read() == b"hello"
        s.write(bytearray(b"back"))
        assert c.read(2) == b"ba"
        assert c.read() == b"ck"


def test_write_sends_everything() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers
    with connected_pair() as (c, s):
        writer = gevent.spawn(c.write, memoryview(payload))
        got = bytearray()
        while len(got) < len(payload):
            got += s.read()
        writer.get()
        assert got == payload


def test_read_into() -> None:
    with connected_pair() as (c, s):
        c.write(b"abcdef")
        buf = bytearray(4)
        n = s.read_into(buf)
        assert (n, bytes(buf[:n])) == (4, b"abcd")


def test_read_returns_empty_at_eof_after_shutdown_send() -> None:
    with connected_pair() as (c, s):
        c.write(b"last")
        c.shutdown("send")
        assert s.read() == b"last"
        assert s.read() == b""
        s.write(b"still open the other way")
        assert c.read() == b"still open the other way"


def test_shutdown_receive_and_both_and_bad_value() -> None:
    with connected_pair() as (c, s):
        s.shutdown("receive")
        s.shutdown("both")
        assert c.read() == b""
        with pytest.raises(ValueError, match="how"):
            c.shutdown("sideways")


def test_reset_becomes_connection_reset() -> None:
    with connected_pair() as (c, s):
        reset(c.socket)
        with pytest.raises(ConnectionReset) as info:
            s.read()
        assert isinstance(info.value, ConnectionResetError)


def test_write_to_closed_peer_becomes_connection_reset() -> None:
    with connected_pair() as (c, s):
        reset(c.socket)
        with pytest.raises(ConnectionReset):
            for _ in range(100):  # the first writes may still be buffered
                s.write(b"x" * 65536)


def test_peer_and_local() -> None:
    with connected_pair() as (c, s):
        assert isinstance(c.peer, Tcp) and c.peer == s.local
        assert s.peer == c.local
        assert c.peer.host == "127.0.0.1"


def test_close_is_idempotent_and_detaches_from_switch() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        flow = net.connect(lsock.address, sw=sw)
        assert not flow.closed
        fd = flow.fileno()
        assert fd >= 0
        flow.close()
        flow.close()
        assert flow.closed
        assert not sw._hooks or all(h.fn != flow.close for h in sw._hooks.values())


def test_switch_closes_flows_it_owns() -> None:
    with Switch() as sw:
        lsock = net.listen(Tcp("127.0.0.1", 0), sw=sw)
        flow = net.connect(lsock.address, sw=sw)
        server, _ = lsock.accept(sw=sw)
    assert flow.closed and server.closed and lsock.closed


def test_context_manager_closes() -> None:
    with connected_pair() as (c, _s), Flow(c.socket.dup()) as dup:
        assert not dup.closed
    assert dup.closed
