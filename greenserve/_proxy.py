"""PROXY protocol (HAProxy's, versions 1 and 2) header parsing and reading.

A load balancer speaking the PROXY protocol sends, before any application byte, one
header naming the original client (source) and the address it connected to
(destination). The spec is HAProxy's ``doc/proxy-protocol.txt``; "spec 2.1" etc. below
refer to its sections.

Two layers:

- Pure functions over ``bytes`` (no sockets): :func:`header_length` frames a header
  incrementally (how long is the header at the start of these bytes, or are more bytes
  needed), :func:`parse_v1`, :func:`parse_v2` and :func:`parse_header` decode it into a
  :class:`ProxyInfo`.
- :func:`read_proxy_header` reads exactly one header from a gevent socket, leaving every
  byte after it unread in the socket for the application.

Everything wrong with a header raises :class:`ProxyProtocolError` (a ``ValueError``).

Decisions where the spec leaves room:

- v2 headers whose address/TLV block is longer than :data:`V2_MAX_BLOCK_LENGTH` (4096)
  bytes are rejected as oversized, although the length field allows 65535 (see there).
- ``LOCAL`` (v2) and ``UNKNOWN`` (v1) give ``source = destination = None``: the
  connection's real endpoints apply. So does a v2 ``PROXY`` header with the ``UNSPEC``
  family or transport (spec 2.2: "the receiver should ignore address information").
- TLVs are returned raw, in order, as ``(type, value)`` pairs; they are parsed for v2
  ``PROXY`` headers of a known family. For ``LOCAL`` and the ``UNSPEC`` family the whole
  block is discarded, as spec 2.2 says ("discard the protocol block").
- IPv6 hosts are returned in their canonical compressed form without brackets ("::1").
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal, Protocol, Union

import gevent

from . import _checks
from .address import Tcp, Udp, Unix, from_sockaddr

__all__ = [
    "MAX_HEADER_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_LENGTH",
    "V1_SIGNATURE",
    "V2_MAX_BLOCK_LENGTH",
    "V2_SIGNATURE",
    "ProxyAddress",
    "ProxyInfo",
    "ProxyProtocolError",
    "header_length",
    "parse_header",
    "parse_v1",
    "parse_v2",
    "read_proxy_header",
]

# --- constants -------------------------------------------------------------------------

#: Spec 2.1: "PROXY" followed by a single space starts every v1 header.
V1_SIGNATURE = b"PROXY "
#: Spec 2.1: the worst case line ("PROXY UNKNOWN" + two full IPv6 addresses + two
#: 5-digit ports) is 107 characters including the CRLF, so a receiver never needs more.
V1_MAX_LENGTH = 107
#: Spec 2.2: the 12-byte v2 signature, chosen so that it can't start an HTTP, SMTP, ...
#: request and contains a NUL and a CRLF pair that text protocols reject.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Spec 2.2: signature (12), version/command (1), family/transport (1), length (2).
V2_FIXED_LENGTH = 16
#: Our cap on v2's 16-bit length field (spec 2.2 allows up to 65535). The largest address
#: block (two 108-byte UNIX paths, 216 bytes) still leaves 3880 bytes for TLVs, several
#: times what the spec's TLVs (ALPN, authority <= 255, CRC32C, unique ID <= 128, SSL
#: info with the client certificate's CN, netns) and the cloud vendors' ones (AWS VPC
#: endpoint ID, Azure Private Link ID, GCP PSC) need together. Accepting 64 KiB from an
#: unauthenticated peer before the handler even runs would only serve abuse, and the
#: whole header has to fit in one MSG_PEEK buffer.
V2_MAX_BLOCK_LENGTH = 4096
#: The longest header (either version) that :func:`header_length` accepts.
MAX_HEADER_LENGTH = max(V1_MAX_LENGTH, V2_FIXED_LENGTH + V2_MAX_BLOCK_LENGTH)

# Spec 2.2, 13th byte: high nibble = version (only 2), low nibble = command.
_V2_VERSION = 0x2
_V2_LOCAL = 0x0
_V2_PROXY = 0x1
# Spec 2.2, 14th byte: high nibble = address family, low nibble = transport. "Other
# values are unspecified and must not be emitted ... and must be rejected as invalid".
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0x0, 0x1, 0x2
# Spec 2.2: bytes of the address block per family (src, dst addresses then ports).
_ADDRESS_BLOCK_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
# Spec 2.2: sun_path-style 108-byte NUL-padded UNIX paths.
_UNIX_PATH_LENGTH = 108
# Spec 2.2.x: a TLV is a type byte and a 2-byte big-endian length, then the value.
_TLV_HEADER_LENGTH = 3

#: TLV types of spec 2.2.1-2.2.7 (values are returned raw; these are for lookups).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

# Spec 2.1: a v1 line is US-ASCII; only printable characters may precede the CRLF.
_V1_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
# Spec 2.1: ports are decimal integers in [0..65535]; ASCII digits only (int() would
# also take "+1", " 1", "1_0" and non-ASCII digits).
_V1_PORT = re.compile(r"[0-9]{1,5}")


# --- public types ----------------------------------------------------------------------


class ProxyProtocolError(ValueError):
    """The PROXY protocol header is missing, malformed, oversized, unsupported (version,
    command, family), truncated by EOF, or was not complete in time."""


#: What a header can name as source or destination.
ProxyAddress = Union[Tcp, Udp, Unix]


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """One decoded PROXY protocol header.

    ``source``/``destination`` are ``None`` when the header doesn't carry addresses (v2
    ``LOCAL``, v1 ``UNKNOWN``, v2 ``UNSPEC``): the connection's own endpoints apply then.
    ``tlvs`` are v2's raw ``(type, value)`` pairs in header order (always ``()`` for v1).
    """

    source: ProxyAddress | None
    destination: ProxyAddress | None
    command: Literal["PROXY", "LOCAL"] = "PROXY"
    version: Literal[1, 2] = 2
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of type ``type_``, or ``None`` if there is none."""
        for t, value in self.tlvs:
            if t == type_:
                return value
        return None


# --- framing ---------------------------------------------------------------------------


def header_length(prefix: bytes) -> int | None:
    """How many bytes the PROXY header at the start of ``prefix`` has.

    ``prefix`` is what arrived so far at the start of a connection (it may extend past
    the header). Returns the header's length once it is complete within ``prefix`` (so
    never more than ``len(prefix)``), or ``None`` when more bytes are needed, which
    guarantees that every byte of ``prefix`` belongs to the header. Only the framing is
    checked here; :func:`parse_v1`/:func:`parse_v2` check the rest.

    Raises ProxyProtocolError: no PROXY signature, a v1 line with a non-printable byte or
    longer than 107 bytes, a v2 header with an unsupported version, command, family or
    transport, or a v2 length above :data:`V2_MAX_BLOCK_LENGTH`.
    """
    if not prefix:
        return None
    if V1_SIGNATURE.startswith(prefix[:len(V1_SIGNATURE)]):
        return _v1_length(prefix)
    if V2_SIGNATURE.startswith(prefix[:len(V2_SIGNATURE)]):
        return _v2_length(prefix)
    raise ProxyProtocolError(
        f"no PROXY protocol signature: data starts with {bytes(prefix[:16])!r}"
    )


def _v1_length(prefix: bytes) -> int | None:
    """:func:`header_length` for a prefix that is or starts like ``b"PROXY "``."""
    first_other = _V1_NOT_PRINTABLE.search(prefix, 0, V1_MAX_LENGTH)
    printable_end = first_other.start() if first_other else min(len(prefix), V1_MAX_LENGTH)
    if printable_end > V1_MAX_LENGTH - 2:
        raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
    if printable_end == len(prefix):
        return None
    if prefix[printable_end:printable_end + 1] != b"\r":
        raise ProxyProtocolError(
            f"PROXY v1 line has the non-printable byte {prefix[printable_end:][:1]!r}"
        )
    after_cr = prefix[printable_end + 1:printable_end + 2]
    if not after_cr:
        return None
    if after_cr != b"\n":
        raise ProxyProtocolError("PROXY v1 line has a CR not followed by LF")
    return printable_end + 2


def _v2_length(prefix: bytes) -> int | None:
    """:func:`header_length` for a prefix that is or starts like the v2 signature."""
    if len(prefix) > 12:
        _check_v2_version_command(prefix[12])
    if len(prefix) > 13:
        _check_v2_family(prefix[13])
    if len(prefix) < V2_FIXED_LENGTH:
        return None
    block_length = int.from_bytes(prefix[14:16], "big")
    if block_length > V2_MAX_BLOCK_LENGTH:
        raise ProxyProtocolError(
            f"PROXY v2 header too large: {block_length} bytes of addresses and TLVs "
            f"(at most {V2_MAX_BLOCK_LENGTH} accepted)"
        )
    total = V2_FIXED_LENGTH + block_length
    return total if len(prefix) >= total else None


def _check_v2_version_command(byte: int) -> None:
    """Raises ProxyProtocolError unless ``byte`` is version 2 with LOCAL or PROXY."""
    version, command = byte >> 4, byte & 0x0F
    if version != _V2_VERSION:
        raise ProxyProtocolError(f"unsupported PROXY protocol version {version} (want 2)")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"unsupported PROXY v2 command {command:#x}")


def _check_v2_family(byte: int) -> None:
    """Raises ProxyProtocolError unless ``byte`` is a family/transport of spec 2.2."""
    family, transport = byte >> 4, byte & 0x0F
    if family not in _ADDRESS_BLOCK_LENGTH:
        raise ProxyProtocolError(f"unsupported PROXY v2 address family {family:#x}")
    if transport not in (_T_UNSPEC, _T_STREAM, _T_DGRAM):
        raise ProxyProtocolError(f"unsupported PROXY v2 transport protocol {transport:#x}")


# --- decoding --------------------------------------------------------------------------


def parse_header(data: bytes) -> tuple[ProxyInfo, int] | None:
    """Decode the header at the start of ``data`` (v1 or v2).

    Returns ``(info, header_length)``, or ``None`` if ``data`` holds only part of a
    header. Bytes after the header are ignored.

    Raises ProxyProtocolError: the header is missing, malformed, oversized or unsupported.
    """
    length = header_length(data)
    if length is None:
        return None
    return _parse_complete(bytes(data[:length])), length


def _parse_complete(header: bytes) -> ProxyInfo:
    """Decode a header that :func:`header_length` framed. Raises ProxyProtocolError."""
    return parse_v1(header) if header.startswith(V1_SIGNATURE) else parse_v2(header)


def parse_v1(line: bytes) -> ProxyInfo:
    """Decode one complete v1 header line, CRLF included and nothing after it.

    Raises ProxyProtocolError: not a single valid "PROXY TCP4|TCP6|UNKNOWN ...\\r\\n"
    line of at most 107 bytes (spec 2.1), e.g. bad addresses or ports, a family that
    doesn't match the addresses, or extra/missing fields.
    """
    if not line.startswith(V1_SIGNATURE) or _v1_length(line) != len(line):
        raise ProxyProtocolError(f"not a complete PROXY v1 line: {bytes(line[:120])!r}")
    fields = line[:-2].decode("ascii").split(" ")
    if fields[1] == "UNKNOWN":
        # Spec 2.1: "the receiver must ignore anything presented before the CRLF".
        return ProxyInfo(None, None, "PROXY", 1)
    if len(fields) != 6:
        raise ProxyProtocolError(f"PROXY v1 line needs 6 fields: {line!r}")
    _, proto, src, dst, sport, dport = fields
    version = {"TCP4": 4, "TCP6": 6}.get(proto)
    if version is None:
        raise ProxyProtocolError(f"unsupported PROXY v1 protocol {proto!r}")
    return ProxyInfo(
        _tcp(_v1_host(src, version), _v1_port(sport)),
        _tcp(_v1_host(dst, version), _v1_port(dport)),
        "PROXY",
        1,
    )


def _v1_host(text: str, version: int) -> str:
    """Canonical text of a TCP4/TCP6 address. Raises ProxyProtocolError if invalid."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"invalid address {text!r} in PROXY v1 line") from None
    if address.version != version or "%" in text:  # no IPv6 scope IDs on the wire
        raise ProxyProtocolError(f"{text!r} is not an IPv{version} address in PROXY v1 line")
    return str(address)


def _v1_port(text: str) -> int:
    """The port a v1 field names. Raises ProxyProtocolError if not a port number."""
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(f"invalid port {text!r} in PROXY v1 line")
    return int(text)


def parse_v2(header: bytes) -> ProxyInfo:
    """Decode one complete v2 header: exactly 16 bytes plus its length field's worth.

    Raises ProxyProtocolError: bad signature, unsupported version, command, family or
    transport, a length that doesn't match ``len(header)`` or exceeds
    :data:`V2_MAX_BLOCK_LENGTH`, an address block shorter than its family needs, an
    invalid UNIX path, or TLVs that overrun the block.
    """
    if not header.startswith(V2_SIGNATURE) or _v2_length(header) != len(header):
        raise ProxyProtocolError(f"not a complete PROXY v2 header: {bytes(header[:32])!r}")
    command, family, transport = header[12] & 0x0F, header[13] >> 4, header[13] & 0x0F
    block = bytes(header[V2_FIXED_LENGTH:])
    if command == _V2_LOCAL:
        # Spec 2.2: "discard the protocol block including the family which is ignored".
        return ProxyInfo(None, None, "LOCAL", 2)
    if family == _AF_UNSPEC:
        # Spec 2.2: "The receiver should ignore address information."
        return ProxyInfo(None, None, "PROXY", 2)
    address_length = _ADDRESS_BLOCK_LENGTH[family]
    if len(block) < address_length:
        raise ProxyProtocolError(
            f"PROXY v2 address block has {len(block)} bytes, family {family:#x} needs "
            f"{address_length}"
        )
    tlvs = _parse_tlvs(block[address_length:])
    if transport == _T_UNSPEC:
        return ProxyInfo(None, None, "PROXY", 2, tlvs)
    source, destination = _v2_addresses(family, transport, block[:address_length])
    return ProxyInfo(source, destination, "PROXY", 2, tlvs)


def _v2_addresses(
    family: int, transport: int, block: bytes
) -> tuple[ProxyAddress, ProxyAddress]:
    """Source and destination of a v2 address block of the right length.

    Raises ProxyProtocolError: an invalid UNIX path.
    """
    if family == _AF_UNIX:
        return (_unix(block[:_UNIX_PATH_LENGTH]), _unix(block[_UNIX_PATH_LENGTH:]))
    size = 4 if family == _AF_INET else 16
    ip = ipaddress.IPv4Address if family == _AF_INET else ipaddress.IPv6Address
    cls = Tcp if transport == _T_STREAM else Udp
    ports = block[2 * size:]
    return (
        _inet(cls, str(ip(block[:size])), int.from_bytes(ports[:2], "big")),
        _inet(cls, str(ip(block[size:2 * size])), int.from_bytes(ports[2:4], "big")),
    )


def _unix(raw: bytes) -> Unix:
    """A 108-byte NUL-padded v2 UNIX path as an address.

    A path ends at its first NUL (all 108 bytes without one are a path too, as Linux
    allows); an abstract name (leading NUL) runs up to the trailing NUL padding; all
    NULs is an unnamed socket. Any such name is an address (bytes where it is not
    UTF-8). Raises ProxyProtocolError should the address type still reject one.
    """
    name = raw.rstrip(b"\0") if raw[:1] == b"\0" else raw.split(b"\0", 1)[0]
    try:
        address = from_sockaddr(socket.AF_UNIX, name)
    except (ValueError, TypeError) as exc:
        raise ProxyProtocolError(f"invalid UNIX path in PROXY v2 header: {exc}") from None
    assert isinstance(address, Unix)
    return address


def _tcp(host: str, port: int) -> Tcp:
    """``Tcp(host, port)``. Raises ProxyProtocolError if the address type rejects it."""
    address = _inet(Tcp, host, port)
    assert isinstance(address, Tcp)
    return address


def _inet(cls: type[Tcp] | type[Udp], host: str, port: int) -> Tcp | Udp:
    """``cls(host, port)``. Raises ProxyProtocolError if the address type rejects it."""
    try:
        return cls(host, port)
    except (ValueError, TypeError) as exc:
        raise ProxyProtocolError(f"invalid address in PROXY header: {exc}") from None


def _parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Split the part of a v2 block after the addresses into ``(type, value)`` pairs.

    Raises ProxyProtocolError: a TLV header or value runs past the end of the block.
    """
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _TLV_HEADER_LENGTH:
            raise ProxyProtocolError("truncated TLV header in PROXY v2 header")
        type_ = data[offset]
        length = int.from_bytes(data[offset + 1:offset + 3], "big")
        start = offset + _TLV_HEADER_LENGTH
        if start + length > len(data):
            raise ProxyProtocolError(
                f"TLV {type_:#04x} of {length} bytes overruns the PROXY v2 header"
            )
        tlvs.append((type_, data[start:start + length]))
        offset = start + length
    return tuple(tlvs)


# --- reading from a socket -------------------------------------------------------------


class _RecvSocket(Protocol):
    """What :func:`read_proxy_header` needs of a socket (a gevent socket has it)."""

    def recv(self, bufsize: int, flags: int = ..., /) -> bytes: ...


def read_proxy_header(sock: _RecvSocket, *, timeout: float) -> ProxyInfo:
    """Read one PROXY header (v1 or v2) from the start of a gevent stream socket.

    Consumes exactly the header's bytes: everything after it stays unread in the socket.
    It peeks (``MSG_PEEK``) at what is pending, then consumes the part that is known to
    belong to the header: all of it while the header is incomplete, so the next peek
    waits for new data instead of spinning; exactly up to its end once it is complete.

    Raises ProxyProtocolError: the header is missing, malformed, oversized or
    unsupported; the peer closed the connection before it was complete; or it was not
    complete within ``timeout`` seconds (including a timeout of the socket itself).
    ValueError: ``timeout`` is not positive and finite. TypeError: ``timeout`` is not a
    number. Other ``OSError``\\s of the socket (e.g. ``ConnectionResetError``) propagate.
    """
    _checks.seconds("timeout", timeout)
    timer = gevent.Timeout(timeout)
    try:
        with timer:
            header = _read_header_bytes(sock)
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise ProxyProtocolError(f"PROXY header not complete within {timeout} s") from None
    except TimeoutError:  # the socket's own timeout (socket.timeout)
        raise ProxyProtocolError("PROXY header not complete within the socket's timeout") \
            from None
    return _parse_complete(header)


def _read_header_bytes(sock: _RecvSocket) -> bytes:
    """Consume and return exactly the header's bytes (see :func:`read_proxy_header`).

    Raises ProxyProtocolError: bad framing, or EOF before the header was complete.
    """
    got = b""
    while True:
        pending = sock.recv(MAX_HEADER_LENGTH - len(got), socket.MSG_PEEK)
        if not pending:
            raise ProxyProtocolError(
                f"connection closed after {len(got)} bytes of an incomplete PROXY header"
            )
        length = header_length(got + pending)
        # None: every byte seen belongs to the header, so all pending bytes can go.
        take = len(pending) if length is None else length - len(got)
        got += _recv_exactly(sock, take)
        if length is not None:
            return got


def _recv_exactly(sock: _RecvSocket, n: int) -> bytes:
    """Consume exactly ``n`` bytes that a peek has shown to be pending.

    Raises ProxyProtocolError: EOF (only possible if someone else read the socket).
    """
    chunks: list[bytes] = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise ProxyProtocolError("connection closed inside the PROXY header")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
