"""Item 5, PROXY protocol end to end, through each server face (``tests/test_proxy.py``
covers the parser itself): v1 and v2 headers (IPv4, IPv6, unix, LOCAL/UNKNOWN) give
the handler the original client's address and leave the bytes after the header to
it; a truncated, garbage, oversized or slow header closes the connection without
calling the handler and is counted in ``stats()["handshake_errors"]``."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from greenserve import Tcp, Unix
from greenserve._proxy import V2_SIGNATURE

from .support import Gauge, connect, engine, net_server, stream_server, wait_until

HANDSHAKE_TIMEOUT = 0.3
PAYLOAD = b"GET / HTTP/1.0\r\n\r\n" * 50  # the application's bytes right after the header
COPIES = 10  # each good header, this many connections at once


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if s.version == 4 else 0x21  # TCP over IPv4 / IPv6
    return v2(0x1, family, s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs)


def v2_unix(src: str, dst: str) -> bytes:
    return v2(0x1, 0x31, src.encode().ljust(108, b"\0") + dst.encode().ljust(108, b"\0"))


REAL = None  # expect the connection's real peer (LOCAL / UNKNOWN)
AUTHORITY_TLV = b"\x02" + struct.pack("!H", 11) + b"example.org"

GOOD: list[tuple[str, bytes, Any]] = [
    ("v1 tcp4", b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n", Tcp("192.0.2.7", 40000)),
    ("v1 tcp6", b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 443\r\n", Tcp("2001:db8::7", 40001)),
    ("v1 unknown", b"PROXY UNKNOWN\r\n", REAL),
    ("v2 ipv4", v2_inet("203.0.113.5", "198.51.100.1", 50000, 443), Tcp("203.0.113.5", 50000)),
    ("v2 ipv4 + tlv", v2_inet("203.0.113.6", "198.51.100.1", 50001, 443, AUTHORITY_TLV),
     Tcp("203.0.113.6", 50001)),
    ("v2 ipv6", v2_inet("2001:db8::42", "2001:db8::1", 50002, 443), Tcp("2001:db8::42", 50002)),
    ("v2 unix", v2_unix("/run/client.sock", "/run/haproxy.sock"), Unix("/run/client.sock")),
    ("v2 local", v2(0x0, 0x00, b""), REAL),
]

# (name, bytes sent, then half-close?) - each must close without calling the handler.
BAD: list[tuple[str, bytes, bool]] = [
    ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
    ("v1 truncated at EOF", b"PROXY TCP4 192.0.2.7 ", True),
    ("v1 no CRLF within 107 bytes", b"PROXY " + b"A" * 200, True),
    ("v1 bad address", b"PROXY TCP4 999.1.1.1 198.51.100.1 1 2\r\n", True),
    ("v2 truncated at EOF", v2_inet("203.0.113.5", "198.51.100.1", 1, 2)[:20], True),
    ("v2 bad version", V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12, True),
    ("v2 oversized block", V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 5000) + b"\0" * 64,
     True),
    ("v1 slow (handshake_timeout)", b"PROXY TCP4 ", False),
    ("v2 slow (handshake_timeout)", V2_SIGNATURE[:7], False),
]


def as_text(peer: Any) -> str:
    """The handler's address as text, whatever the face hands over (StreamServer gives
    gevent's ``(host, port)`` tuples and unix paths)."""
    if isinstance(peer, (Tcp, Unix)):
        return str(peer)
    if isinstance(peer, str):
        return str(Unix(peer))
    return str(Tcp(peer[0], peer[1]))


def socket_handler(gauge: Gauge) -> Callable[[Any, Any], None]:
    def handler(sock: Any, peer: Any) -> None:
        with gauge.inside():
            data = bytearray()
            while chunk := sock.recv(65536):
                data += chunk
            sock.sendall(as_text(peer).encode() + b"|" + data)
    return handler


def flow_handler(gauge: Gauge) -> Callable[[Any, Any], None]:
    def handler(flow: Any, peer: Any) -> None:
        with gauge.inside():
            data = bytearray()
            while chunk := flow.read():
                data += chunk
            flow.write(as_text(peer).encode() + b"|" + data)
    return handler


FACES = {
    "engine": (engine, socket_handler),
    "StreamServer": (stream_server, socket_handler),
    "net.serve_listeners": (net_server, flow_handler),
}


def good_client(port: int, header: bytes, expected: Any) -> None:
    with connect(port) as c:
        c.sendall(header + PAYLOAD)
        c.shutdown(socket.SHUT_WR)
        if expected is REAL:
            expected = Tcp(*c.getsockname())
        reply = bytearray()
        while chunk := c.recv(65536):
            reply += chunk
    assert bytes(reply) == str(expected).encode() + b"|" + PAYLOAD


def bad_client(port: int, data: bytes, half_close: bool) -> bytes:
    with connect(port) as c:
        c.sendall(data)
        if half_close:
            c.shutdown(socket.SHUT_WR)
        reply = bytearray()
        try:
            while chunk := c.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread
    return bytes(reply)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("face", list(FACES))
def test_proxy_headers_end_to_end(face: str, record_property: Any) -> None:
    start, make_handler = FACES[face]
    gauge = Gauge()
    with start(make_handler(gauge), proxy_protocol=True,
               handshake_timeout=HANDSHAKE_TIMEOUT) as served:
        good = [gevent.spawn(good_client, served.port, header, expected)
                for _name, header, expected in GOOD for _ in range(COPIES)]
        bad = {name: gevent.spawn(bad_client, served.port, data, half_close)
               for name, data, half_close in BAD}
        gevent.joinall([*good, *bad.values()], timeout=15, raise_error=True)
        assert all(g.successful() for g in good)
        replies = {name: g.value for name, g in bad.items()}
        # The server goes on serving after all that.
        good_client(served.port, GOOD[0][1], GOOD[0][2])
        wait_until(lambda: served.active() <= 0, 5, "every connection closed")
        stats = served.stats()
        errors = list(served.errors)
    assert replies == dict.fromkeys(replies, b""), replies  # closed, nothing answered
    assert gauge.started == gauge.finished == len(GOOD) * COPIES + 1  # never for a bad one
    assert not errors, errors
    if stats:
        assert stats["handshake_errors"] == len(BAD)
        assert stats["accepted"] == len(GOOD) * COPIES + 1 + len(BAD)
        assert stats["handler_errors"] == 0 and stats["active"] == 0
    record_property("stats", stats)
