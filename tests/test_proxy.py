"""Tests for greenserve._proxy: the PROXY protocol (v1 text, v2 binary) header reader.

The parser is tested on bytes (spec examples, hand-written v2 headers, hypothesis
properties against a small encoder written here); the socket reader on real loopback
sockets (a unix socketpair and a 127.0.0.1 TCP connection), synchronised through the
reader's own peeks, never with sleeps.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import gevent
import gevent.queue
import gevent.socket
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenserve._proxy import (
    MAX_HEADER_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_NOOP,
    V1_MAX_LENGTH,
    V2_MAX_BLOCK_LENGTH,
    V2_SIGNATURE,
    ProxyAddress,
    ProxyInfo,
    ProxyProtocolError,
    header_length,
    parse_header,
    parse_v1,
    parse_v2,
    read_proxy_header,
)
from greenserve.address import Tcp, Udp, Unix, from_sockaddr

pytestmark = pytest.mark.timeout(60)

APP_DATA = b"GET / HTTP/1.0\r\nHost: example\r\n\r\n"
UNNAMED = from_sockaddr(socket.AF_UNIX, "")

# --- a small encoder (independent of the module under test) ----------------------------

FAMILY = {"unspec": 0x0, "inet": 0x1, "inet6": 0x2, "unix": 0x3}
TRANSPORT = {"unspec": 0x0, "stream": 0x1, "dgram": 0x2}


def encode_v1(source: Tcp | None, destination: Tcp | None) -> bytes:
    """A v1 line; ``None`` addresses give ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in source.host else "TCP4"
    text = (f"PROXY {proto} {source.host} {destination.host} "
            f"{source.port} {destination.port}\r\n")
    return text.encode("ascii")


def _v2_address(address: ProxyAddress) -> tuple[bytes, bytes]:
    """(address bytes, port bytes) of one side of a v2 address block."""
    if isinstance(address, Unix):
        return address.path.encode().ljust(108, b"\0"), b""
    return ipaddress.ip_address(address.host).packed, address.port.to_bytes(2, "big")


def encode_v2(command: Literal["PROXY", "LOCAL"], family: str, transport: str,
              source: ProxyAddress | None = None, destination: ProxyAddress | None = None,
              tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """A v2 header; addresses are left out when ``None``."""
    block = b""
    if source is not None and destination is not None:
        src, sport = _v2_address(source)
        dst, dport = _v2_address(destination)
        block = src + dst + sport + dport
    for type_, value in tlvs:
        block += bytes([type_]) + len(value).to_bytes(2, "big") + value
    return (V2_SIGNATURE + bytes([0x20 | (command == "PROXY"),
                                  FAMILY[family] << 4 | TRANSPORT[transport]])
            + len(block).to_bytes(2, "big") + block)


# --- spec examples: v1 -------------------------------------------------------------------

V1_MAX_UNKNOWN = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                  b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")

V1_EXAMPLES = {
    "v1-tcp4": (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     ProxyInfo(Tcp("192.168.0.1", 56324), Tcp("192.168.0.11", 443), "PROXY", 1)),
    "v1-tcp4-max": (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     ProxyInfo(Tcp("255.255.255.255", 65535), Tcp("255.255.255.255", 65535), "PROXY", 1)),
    "v1-tcp6": (b"PROXY TCP6 ffff:f::ffff 2001:db8:0:0:0:0:0:1 0 80\r\n",
     ProxyInfo(Tcp("ffff:f::ffff", 0), Tcp("2001:db8::1", 80), "PROXY", 1)),
    "v1-tcp6-mapped": (b"PROXY TCP6 ::1 ::ffff:10.0.0.1 1234 5678\r\n",
     ProxyInfo(Tcp("::1", 1234), Tcp(str(ipaddress.ip_address("::ffff:10.0.0.1")), 5678),
               "PROXY", 1)),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", ProxyInfo(None, None, "PROXY", 1)),
    "v1-unknown-max": (V1_MAX_UNKNOWN, ProxyInfo(None, None, "PROXY", 1)),
}


@pytest.mark.parametrize(("line", "expected"), V1_EXAMPLES.values(), ids=V1_EXAMPLES)
def test_v1_spec_examples(line: bytes, expected: ProxyInfo) -> None:
    assert parse_v1(line) == expected
    assert header_length(line) == len(line)
    assert header_length(line + APP_DATA) == len(line)
    assert parse_header(line + APP_DATA) == (expected, len(line))
    assert expected.tlvs == () and expected.tlv(PP2_TYPE_ALPN) is None


def test_v1_longest_line_is_107_bytes() -> None:
    assert len(V1_MAX_UNKNOWN) == V1_MAX_LENGTH == 107
    too_long = V1_MAX_UNKNOWN.replace(b"65535 65535", b"65535 655350")
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        header_length(too_long)
    # Oversized is detected without waiting for the CRLF that will never fit.
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        header_length(b"PROXY " + b"x" * 100)
    assert header_length(b"PROXY " + b"x" * 99) is None
    assert header_length(b"PROXY " + b"x" * 99 + b"\r") is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                # LF without CR
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n",             # CR without LF
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",             # double space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",             # trailing space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",                # missing field
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",            # extra field
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                      # v6 under TCP4
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",              # v4 under TCP6
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",             # scope ID
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",            # octet out of range
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",             # leading zero octet
    b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",            # name, not address
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",          # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",             # negative port
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",             # signed port
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n",            # int() would take this
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",       # non-ASCII digit
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",              # no such protocol
    b"PROXY UNKNOWNX\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",                  # no CRLF
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",              # signature is case-sensitive
    b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
])
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_v1(line)
    try:
        assert parse_header(line) is None
    except ProxyProtocolError:
        pass


def test_v1_parser_wants_exactly_one_line() -> None:
    line, expected = V1_EXAMPLES["v1-tcp4"]
    with pytest.raises(ProxyProtocolError):
        parse_v1(line + b"extra")
    assert parse_header(line + b"extra") == (expected, len(line))


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    # Spec 2.1: the receiver must ignore anything presented before the CRLF.
    assert parse_v1(b"PROXY UNKNOWN whatever 1 2 3\r\n") == ProxyInfo(None, None, "PROXY", 1)


def test_v1_non_printable_bytes_fail_early() -> None:
    with pytest.raises(ProxyProtocolError, match="non-printable"):
        header_length(b"PROXY TCP4 \x00")
    with pytest.raises(ProxyProtocolError, match="non-printable"):
        header_length(b"PROXY TCP4 \xff")


# --- spec examples: v2 -------------------------------------------------------------------

V2_IPV4 = (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 168, 0, 1, 192, 168, 0, 11])
           + (56324).to_bytes(2, "big") + (443).to_bytes(2, "big"))
V2_IPV6_UDP = (V2_SIGNATURE + b"\x21\x22\x00\x24"
               + ipaddress.ip_address("2001:db8::1").packed
               + ipaddress.ip_address("::1").packed + b"\x13\x88\x00\x35")
V2_UNIX = (V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/run/client.sock".ljust(108, b"\0")
           + b"/run/haproxy.sock".ljust(108, b"\0"))
V2_UNIX_ABSTRACT = (V2_SIGNATURE + b"\x21\x32\x00\xd8" + b"\0abstract\0name".ljust(108, b"\0")
                    + b"\0" * 108)
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"
V2_LOCAL_WITH_BLOCK = (V2_SIGNATURE + b"\x20\x11\x00\x0f" + b"\x7f\x00\x00\x01" * 2
                       + b"\x00\x01\x00\x02" + b"\x04\x00\x00")
V2_UNSPEC = V2_SIGNATURE + b"\x21\x00\x00\x05" + b"ignored"[:5]
V2_TLVS_BLOCK = (b"\x0a\x00\x00\x01\x0a\x00\x00\x02\x30\x39\x01\xbb"
                 + b"\x01\x00\x02h2"                    # ALPN
                 + b"\x02\x00\x0bexample.com"           # authority
                 + b"\x04\x00\x03\x00\x00\x00"          # NOOP
                 + b"\xea\x00\x00"                      # custom, empty
                 + b"\x05\x00\x04uid1")                 # unique ID
V2_TLVS = V2_SIGNATURE + b"\x21\x11" + len(V2_TLVS_BLOCK).to_bytes(2, "big") + V2_TLVS_BLOCK

V2_EXAMPLES = {
    "v2-tcp4": (V2_IPV4,
                ProxyInfo(Tcp("192.168.0.1", 56324), Tcp("192.168.0.11", 443), "PROXY", 2)),
    "v2-udp6": (V2_IPV6_UDP, ProxyInfo(Udp("2001:db8::1", 5000), Udp("::1", 53), "PROXY", 2)),
    "v2-unix": (V2_UNIX,
                ProxyInfo(Unix("/run/client.sock"), Unix("/run/haproxy.sock"), "PROXY", 2)),
    "v2-unix-abstract": (V2_UNIX_ABSTRACT,
                         ProxyInfo(Unix("\0abstract\0name"), UNNAMED, "PROXY", 2)),
    "v2-local": (V2_LOCAL, ProxyInfo(None, None, "LOCAL", 2)),
    "v2-local-with-block": (V2_LOCAL_WITH_BLOCK, ProxyInfo(None, None, "LOCAL", 2)),
    "v2-unspec": (V2_UNSPEC, ProxyInfo(None, None, "PROXY", 2)),
    "v2-tlvs": (V2_TLVS, ProxyInfo(Tcp("10.0.0.1", 12345), Tcp("10.0.0.2", 443), "PROXY", 2,
                                   ((0x01, b"h2"), (0x02, b"example.com"), (0x04, b"\0\0\0"),
                                    (0xEA, b""), (0x05, b"uid1")))),
}


@pytest.mark.parametrize(("header", "expected"), V2_EXAMPLES.values(), ids=V2_EXAMPLES)
def test_v2_examples(header: bytes, expected: ProxyInfo) -> None:
    assert parse_v2(header) == expected
    assert header_length(header) == len(header)
    assert header_length(header + APP_DATA) == len(header)
    assert parse_header(header + APP_DATA) == (expected, len(header))


def test_v2_tlv_lookup() -> None:
    info = parse_v2(V2_TLVS)
    assert info.tlv(PP2_TYPE_ALPN) == b"h2"
    assert info.tlv(PP2_TYPE_AUTHORITY) == b"example.com"
    assert info.tlv(PP2_TYPE_NOOP) == b"\0\0\0"
    assert info.tlv(0x20) is None


def test_v2_unix_path_stops_at_first_nul() -> None:
    header = (V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/a\0junk".ljust(108, b"\0")
              + b"/b".ljust(108, b"\0"))
    assert parse_v2(header) == ProxyInfo(Unix("/a"), Unix("/b"), "PROXY", 2)


def test_v2_unix_paths_are_whatever_the_kernel_allows() -> None:
    # A 108-byte path without a NUL (Linux binds it) and a path that is not UTF-8 are
    # addresses like any other: the peer is represented, not refused.
    full = b"/" + b"p" * 107
    header = (V2_SIGNATURE + b"\x21\x31\x00\xd8" + full + b"\xff".ljust(108, b"\0"))
    info = parse_v2(header)
    assert info.source == Unix(full.decode()) and info.destination == Unix(b"\xff")


def test_v2_encoder_matches_hand_written_headers() -> None:
    assert encode_v2("PROXY", "inet", "stream", Tcp("192.168.0.1", 56324),
                     Tcp("192.168.0.11", 443)) == V2_IPV4
    assert encode_v2("LOCAL", "unspec", "unspec") == V2_LOCAL


def test_v2_size_cap() -> None:
    def with_block_length(n: int) -> bytes:
        tlv = b"\xe0" + (n - 3).to_bytes(2, "big") + b"x" * (n - 3)
        return V2_SIGNATURE + b"\x21\x00" + n.to_bytes(2, "big") + tlv

    largest = V2_SIGNATURE + b"\x21\x11" + V2_MAX_BLOCK_LENGTH.to_bytes(2, "big")
    assert header_length(largest) is None
    ok = V2_SIGNATURE + b"\x21\x11" + V2_MAX_BLOCK_LENGTH.to_bytes(2, "big") + bytes(12) \
        + b"\xe0" + (V2_MAX_BLOCK_LENGTH - 15).to_bytes(2, "big") \
        + b"x" * (V2_MAX_BLOCK_LENGTH - 15)
    assert header_length(ok) == len(ok) == MAX_HEADER_LENGTH
    assert parse_v2(ok).tlvs == ((0xE0, b"x" * (V2_MAX_BLOCK_LENGTH - 15)),)
    # Oversized is detected from the 16 fixed bytes alone.
    for n in (V2_MAX_BLOCK_LENGTH + 1, 65535):
        with pytest.raises(ProxyProtocolError, match="too large"):
            header_length(with_block_length(n)[:16])
        with pytest.raises(ProxyProtocolError, match="too large"):
            parse_v2(with_block_length(n))


@pytest.mark.parametrize(("header", "match"), [
    (V2_SIGNATURE + b"\x11\x11\x00\x00", "version"),
    (V2_SIGNATURE + b"\x31\x11\x00\x00", "version"),
    (V2_SIGNATURE + b"\x22\x11\x00\x00", "command"),
    (V2_SIGNATURE + b"\x2f\x11\x00\x00", "command"),
    (V2_SIGNATURE + b"\x21\x41\x00\x00", "family"),
    (V2_SIGNATURE + b"\x20\xf0\x00\x00", "family"),
    (V2_SIGNATURE + b"\x21\x13\x00\x00", "transport"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "needs 12"),
    (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "needs 36"),
    (V2_SIGNATURE + b"\x21\x31\x00\x24" + bytes(36), "needs 216"),
    (V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14), "truncated TLV"),
    (V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x02x", "overruns"),
    (V2_IPV4[:-1], "not a complete"),
    (V2_IPV4 + b"x", "not a complete"),
    (b"\r\n\r\n\x00\r\nquit\n\x21\x11\x00\x00", "not a complete"),
])
def test_v2_malformed(header: bytes, match: str) -> None:
    with pytest.raises(ProxyProtocolError, match=match):
        parse_v2(header)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"\r\n\r\n\x00\r\nQUIZ", b"PROXy", b"\n",
])
def test_no_signature(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError, match="signature"):
        header_length(data)
    with pytest.raises(ProxyProtocolError):
        parse_header(data)


def test_wrong_parser_for_version() -> None:
    with pytest.raises(ProxyProtocolError):
        parse_v1(V2_IPV4)
    with pytest.raises(ProxyProtocolError):
        parse_v2(V1_EXAMPLES["v1-tcp4"][0])


def test_empty_prefix_needs_more() -> None:
    assert header_length(b"") is None
    assert parse_header(b"") is None
    for fn in (parse_v1, parse_v2):
        with pytest.raises(ProxyProtocolError):
            fn(b"")


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyProtocolError, ValueError)


# --- hypothesis: generated headers --------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
path_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
                    min_size=1, max_size=40)
unix_paths = st.one_of(
    path_text.filter(lambda p: len(p.encode()) <= 107),
    path_text.map(lambda p: "\0" + p).filter(lambda p: len(p.encode()) <= 107),
)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=6)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, ProxyInfo]:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        return encode_v1(None, None), ProxyInfo(None, None, "PROXY", 1)
    hosts = ipv4 if kind == "TCP4" else ipv6
    src, dst = Tcp(draw(hosts), draw(ports)), Tcp(draw(hosts), draw(ports))
    return encode_v1(src, dst), ProxyInfo(src, dst, "PROXY", 1)


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, ProxyInfo]:
    command: Literal["PROXY", "LOCAL"] = draw(st.sampled_from(["PROXY", "LOCAL"]))
    family = draw(st.sampled_from(list(FAMILY)))
    transport = draw(st.sampled_from(list(TRANSPORT)))
    tlvs = tuple(draw(tlv_lists))
    src: ProxyAddress | None = None
    dst: ProxyAddress | None = None
    if family == "unix":
        src, dst = Unix(draw(unix_paths)), Unix(draw(unix_paths))
    elif family != "unspec":
        hosts = ipv4 if family == "inet" else ipv6
        cls = Udp if transport == "dgram" else Tcp
        src, dst = cls(draw(hosts), draw(ports)), cls(draw(hosts), draw(ports))
    if family == "unspec":
        tlvs = ()  # no address block: the block would be ignored anyway
    header = encode_v2(command, family, transport, src, dst, tlvs)
    if command == "LOCAL" or family == "unspec":
        expected = ProxyInfo(None, None, command, 2)
    elif transport == "unspec":
        expected = ProxyInfo(None, None, "PROXY", 2, tlvs)
    else:
        expected = ProxyInfo(src, dst, "PROXY", 2, tlvs)
    return header, expected


valid_headers = st.one_of(v1_headers(), v2_headers())
FAST = settings(deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(valid_headers, st.binary(max_size=200))
def test_round_trip(case: tuple[bytes, ProxyInfo], trailing: bytes) -> None:
    header, expected = case
    parse = parse_v1 if expected.version == 1 else parse_v2
    assert parse(header) == expected
    assert header_length(header) == len(header)
    assert header_length(header + trailing) == len(header)
    assert parse_header(header + trailing) == (expected, len(header))


@FAST
@given(valid_headers, st.data())
def test_truncated_headers_need_more(case: tuple[bytes, ProxyInfo], data: st.DataObject) -> None:
    header, expected = case
    cut = data.draw(st.integers(0, len(header) - 1), label="cut")
    truncated = header[:cut]
    assert header_length(truncated) is None
    assert parse_header(truncated) is None
    parse = parse_v1 if expected.version == 1 else parse_v2
    with pytest.raises(ProxyProtocolError):
        parse(truncated)


def _outcome(fn: Callable[[bytes], Any], data: bytes) -> Any:
    """``fn(data)``, or the ProxyProtocolError class it raised; anything else propagates."""
    try:
        return fn(data)
    except ProxyProtocolError:
        return ProxyProtocolError


def _check_only_proxy_errors(data: bytes) -> None:
    length = _outcome(header_length, data)
    assert length is None or length is ProxyProtocolError or 0 < length <= len(data)
    for fn in (parse_v1, parse_v2):
        result = _outcome(fn, data)
        assert result is ProxyProtocolError or isinstance(result, ProxyInfo)
        if isinstance(result, ProxyInfo):  # a parser accepts only a whole header
            assert length == len(data)
    result = _outcome(parse_header, data)
    if result is not None and result is not ProxyProtocolError:
        info, n = result
        assert isinstance(info, ProxyInfo) and n == length


# Random bytes, and random bytes after each signature (to get past the first check).
signatures = st.sampled_from([
    b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
    V2_SIGNATURE, V2_SIGNATURE + b"\x21", V2_SIGNATURE + b"\x20",
    V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x21\x21", V2_SIGNATURE + b"\x21\x31",
])
v1_text = st.text(st.sampled_from("0123456789abcdef.: \r\n"), max_size=60).map(str.encode)
noisy = st.builds(lambda sig, tail: sig + tail, signatures, st.one_of(st.binary(), v1_text))


@FAST
@given(noisy)
def test_random_bytes_raise_only_proxy_errors(data: bytes) -> None:
    _check_only_proxy_errors(data)


@FAST
@given(valid_headers, st.data())
def test_mutated_headers_raise_only_proxy_errors(
    case: tuple[bytes, ProxyInfo], data: st.DataObject
) -> None:
    header = bytearray(case[0])
    index = data.draw(st.integers(0, len(header) - 1), label="index")
    header[index] = data.draw(st.integers(0, 255), label="byte")
    _check_only_proxy_errors(bytes(header))
    _check_only_proxy_errors(bytes(header[:index + 1]))


@FAST
@given(st.one_of(noisy, valid_headers.map(lambda c: c[0]),
                 st.builds(lambda c, t: c[0] + t, valid_headers, st.binary(max_size=20))))
def test_header_length_is_consistent_over_prefixes(data: bytes) -> None:
    """What the socket reader relies on: ``None`` for a prefix means every byte of it
    belongs to the header, and a length, once known, doesn't change as bytes arrive."""
    full = _outcome(header_length, data)
    for k in range(len(data) + 1):
        part = _outcome(header_length, data[:k])
        if isinstance(full, int):
            assert part == (full if k >= full else None)
        elif full is None:
            assert part is None
        else:
            assert part is None or part is ProxyProtocolError


# --- the socket reader ---------------------------------------------------------------------


@pytest.fixture(params=["unix", "tcp"])
def conn(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """(client, server) ends of a real loopback stream connection (gevent sockets)."""
    if request.param == "unix":
        client, server = gevent.socket.socketpair()
    else:
        listener = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = gevent.socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def read_to_eof(sock: Any) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


ALL_EXAMPLES = V1_EXAMPLES | V2_EXAMPLES


@pytest.mark.parametrize(("header", "expected"), ALL_EXAMPLES.values(), ids=ALL_EXAMPLES)
def test_socket_reads_exactly_the_header(
    conn: tuple[Any, Any], header: bytes, expected: ProxyInfo
) -> None:
    client, server = conn
    client.sendall(header + APP_DATA)
    client.shutdown(socket.SHUT_WR)
    assert read_proxy_header(server, timeout=5) == expected
    assert read_to_eof(server) == APP_DATA


def test_socket_header_then_application_bytes_later(conn: tuple[Any, Any]) -> None:
    client, server = conn
    client.sendall(V2_TLVS)
    assert read_proxy_header(server, timeout=5) == V2_EXAMPLES["v2-tlvs"][1]
    client.sendall(b"later")
    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(server) == b"later"


class PeekSpy:
    """Wraps a socket; reports each ``MSG_PEEK`` result on a queue and counts them."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.peeks: gevent.queue.Queue[bytes] = gevent.queue.Queue()
        self.peek_count = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data: bytes = self.sock.recv(bufsize, flags)
        if flags & socket.MSG_PEEK:
            self.peek_count += 1
            self.peeks.put(data)
        return data


def _pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, start = [], 0
    for size in sizes:
        out.append(data[start:start + size])
        start += size
    return [p for p in out if p] + ([data[start:]] if data[start:] else [])


PIECES_CASES = ["v1-tcp6", "v2-tlvs", "v2-unix"]


@pytest.mark.parametrize(("header", "expected"), [ALL_EXAMPLES[k] for k in PIECES_CASES],
                         ids=PIECES_CASES)
@pytest.mark.parametrize("split", ["bytewise", "uneven"])
def test_socket_assembles_a_header_sent_in_pieces(
    conn: tuple[Any, Any], header: bytes, expected: ProxyInfo, split: str
) -> None:
    client, server = conn
    sizes = [1] * (len(header) - 1) if split == "bytewise" else [3, 10, 2, 1, 20]
    pieces = _pieces(header + APP_DATA, sizes)
    # The application bytes travel with the header's last piece.
    assert len(b"".join(pieces[:-1])) < len(header) <= len(b"".join(pieces))
    spy = PeekSpy(server)

    def write() -> None:
        for i, piece in enumerate(pieces):
            client.sendall(piece)
            if i < len(pieces) - 1:
                spy.peeks.get()  # the reader has seen this piece: send the next one
        client.shutdown(socket.SHUT_WR)

    writer = gevent.spawn(write)
    try:
        assert read_proxy_header(spy, timeout=10) == expected
        writer.get(timeout=5)
    finally:
        writer.kill()
    assert read_to_eof(server) == APP_DATA
    # One peek per piece: the reader waits for new data instead of re-peeking.
    assert spy.peek_count == len(pieces)


@pytest.mark.parametrize("partial", [V2_IPV4[:10], V2_IPV4[:20], b"PROXY TCP4 1.2.3.4"])
def test_socket_timeout_on_half_a_header(conn: tuple[Any, Any], partial: bytes) -> None:
    client, server = conn
    client.sendall(partial)
    start = time.monotonic()
    with pytest.raises(ProxyProtocolError, match=r"not complete within 0\.2 s"):
        read_proxy_header(server, timeout=0.2)
    assert 0.15 <= time.monotonic() - start < 2


def test_socket_own_timeout_is_a_proxy_error(conn: tuple[Any, Any]) -> None:
    client, server = conn
    server.settimeout(0.05)
    client.sendall(b"PROXY ")
    with pytest.raises(ProxyProtocolError, match="not complete"):
        read_proxy_header(server, timeout=5)


def test_socket_outer_timeout_is_not_swallowed(conn: tuple[Any, Any]) -> None:
    _, server = conn
    outer = gevent.Timeout(0.05)
    with pytest.raises(gevent.Timeout) as info, outer:
        read_proxy_header(server, timeout=5)
    assert info.value is outer


@pytest.mark.parametrize("partial", [b"", V2_IPV4[:5], V2_IPV4[:-1], b"PROXY TCP4 1.2.3.4 "])
def test_socket_eof_before_the_header_is_complete(conn: tuple[Any, Any], partial: bytes) -> None:
    client, server = conn
    client.sendall(partial)
    client.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    with pytest.raises(ProxyProtocolError, match="closed"):
        read_proxy_header(server, timeout=5)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(("data", "match"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "signature"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "port"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "too large"),
    (b"PROXY UNKNOWN " + b"x" * 200, "longer than 107"),
])
def test_socket_bad_header_fails_without_waiting(
    conn: tuple[Any, Any], data: bytes, match: str
) -> None:
    client, server = conn
    client.sendall(data)  # and keep the connection open: no EOF to help
    with pytest.raises(ProxyProtocolError, match=match):
        read_proxy_header(server, timeout=5)


@pytest.mark.parametrize(("timeout", "error"), [
    (0, ValueError), (-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (None, TypeError), ("1", TypeError), (True, TypeError),
])
def test_socket_bad_timeout_argument(conn: tuple[Any, Any], timeout: Any, error: type) -> None:
    _, server = conn
    with pytest.raises(error, match="timeout"):
        read_proxy_header(server, timeout=timeout)
