"""Addresses: ``Tcp``, ``Udp``, ``Unix`` (and ``Fd`` for an inherited socket), and
:func:`parse_address`, which turns what users type into one of them.

``str()`` of an address is its canonical text (``tcp:127.0.0.1:8080``,
``tcp:[::1]:8080``, ``unix:/run/x.sock``, ``udp:127.0.0.1:53``, ``fd://3``) and
``parse_address(str(a)) == a`` for every address ``a`` (but the unnamed unix peer,
``unix:``). A unix name that is not printable text (an abstract name, bytes that are
not UTF-8, control characters) is written quoted: ``unix:"\\x00name"``.
"""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from typing import Any, Literal, Union, overload

__all__ = ["Address", "Fd", "StreamAddress", "Tcp", "Udp", "Unix", "as_accepted",
           "from_sockaddr", "parse_address"]

_set_field = object.__setattr__  # how a frozen dataclass sets its own fields


def _check_host(host: object, cls: str) -> None:
    if not isinstance(host, str):
        raise TypeError(f"{cls}: host must be a str, not {type(host).__name__}")
    if not host:
        raise ValueError(f"{cls}: host must not be empty")


def _check_port(port: object, cls: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{cls}: port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"{cls}: port {port} is out of range 0-65535")


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Inet:
    __slots__ = ()
    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        """The address as the ``socket`` module takes it."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Tcp(_Inet):
    """A TCP address: ``Tcp("127.0.0.1", 8080)``. Port 0 asks the OS to choose."""

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_host(self.host, "Tcp")
        _check_port(self.port, "Tcp")

    def __str__(self) -> str:
        return f"tcp:{_host_text(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class Udp(_Inet):
    """A UDP address: ``Udp("127.0.0.1", 53)``."""

    host: str
    port: int

    def __post_init__(self) -> None:
        _check_host(self.host, "Udp")
        _check_port(self.port, "Udp")

    def __str__(self) -> str:
        return f"udp:{_host_text(self.host)}:{self.port}"


# sockaddr_un.sun_path on Linux. The kernel takes all of it for any name: an abstract
# one (its leading NUL included) and a file path too, which then has no terminating
# NUL (the socket module refuses to bind or connect to such a path, but a peer
# written in C can bind one, and accept() then reports it).
_SUN_PATH = 108


def _unix_name(path: object) -> bytes:
    """The bytes of a unix socket name given as ``str`` (file-system encoding, as the
    ``socket`` module encodes it: surrogate escapes stand for undecodable bytes) or
    ``bytes``."""
    if isinstance(path, bytes):
        return path
    if not isinstance(path, str):
        raise TypeError(f"Unix: path must be a str or bytes, not {type(path).__name__}")
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ValueError(f"Unix: path {path!r} has a lone surrogate that stands for "
                         "no byte") from None


def _checked_unix_path(path: object) -> str | bytes:
    """``path`` in canonical form: ``str`` when its bytes are UTF-8, else ``bytes``, so
    that two spellings of one name are one (equal, same hash) address."""
    name = _unix_name(path)
    if not name:
        raise ValueError("Unix: path must not be empty")
    if len(name) > _SUN_PATH:
        raise ValueError(f"Unix: path {path!r} is longer than {_SUN_PATH} bytes")
    if name[0] != 0 and 0 in name:
        # The kernel would silently cut a file path at its first NUL.
        raise ValueError(f"Unix: path {path!r} has a NUL byte (only an abstract name, "
                         "which starts with one, may)")
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name


@dataclass(frozen=True, slots=True)
class Unix:
    """A unix-domain socket name: a file path, or (starting with NUL) a Linux abstract
    name.

    ``path`` is a ``str`` when the name is UTF-8 text and ``bytes`` when it is not (a
    peer may bind to any bytes); either may be given, and a ``str`` with surrogate
    escapes (``os.fsdecode``) stands for the bytes they escape. At most 108 bytes.
    """

    path: str | bytes

    def __post_init__(self) -> None:
        _set_field(self, "path", _checked_unix_path(self.path))

    family = socket.AF_UNIX

    @property
    def sockaddr(self) -> str | bytes:
        """The name as the ``socket`` module takes it."""
        return self.path

    @property
    def abstract(self) -> bool:
        path = self.path
        return path[:1] == ("\0" if isinstance(path, str) else b"\0")

    def __str__(self) -> str:
        path = self.path
        if isinstance(path, str) and _plain(path):
            # "unix://x" reads as an empty authority before "x": keep a leading "//" intact
            return f"unix://{path}" if path.startswith("//") else f"unix:{path}"
        return f'unix:"{_quote(_unix_name(path))}"'


def _plain(path: str) -> bool:
    """Whether ``unix:<path>`` is safe to print and parses back to ``path``: printable
    (no NUL, no newline to forge a log line), not cut by ``parse_address``'s strip,
    not read as the quoted form."""
    return path.isprintable() and path == path.strip() and not path.startswith('"')


def _quote(name: bytes) -> str:
    """The inside of the quoted form: printable UTF-8 text as is, ``\\\\`` and ``\\"``
    for a backslash and a quote, ``\\xHH`` for every other byte."""
    out = []
    for ch in name.decode("utf-8", "surrogateescape"):
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch.isprintable():  # never a surrogate escape: those are not printable
            out.append(ch)
        else:
            out.extend(f"\\x{byte:02x}" for byte in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Fd:
    """An already-open socket inherited from the parent (``fd://3``), e.g. systemd's."""

    fd: int

    def __post_init__(self) -> None:
        if isinstance(self.fd, bool) or not isinstance(self.fd, int):
            raise TypeError(f"Fd: fd must be an int, not {type(self.fd).__name__}")
        if self.fd < 0:
            raise ValueError(f"Fd: fd {self.fd} is negative")

    def __str__(self) -> str:
        return f"fd://{self.fd}"


# What getpeername() gives for a client that never bound a name (``str()``: "unix:").
_UNNAMED = object.__new__(Unix)
object.__setattr__(_UNNAMED, "path", "")

StreamAddress = Union[Tcp, Unix, Fd]
Address = Union[Tcp, Udp, Unix, Fd]

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]*)$")


def _port(text: str, original: object) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"address {original!r}: port {text!r} is not a number")
    port = int(text)
    if port > 65535:
        raise ValueError(f"address {original!r}: port {port} is out of range 0-65535")
    return port


def _host_port(text: str, original: object, default_host: str) -> tuple[str, int]:
    if text.isdigit():
        return default_host, _port(text, original)
    m = _HOST_PORT.match(text)
    if m is None:
        raise ValueError(f"address {original!r} is not host:port, [v6]:port, :port or a port")
    host = m.group("v6") if m.group("v6") is not None else m.group("host")
    if m.group("v6") is not None and not host:
        raise ValueError(f"address {original!r}: empty IPv6 host in brackets")
    return host or default_host, _port(m.group("port"), original)


def _unix(text: str, original: object) -> Unix:
    path: str | bytes
    if text.startswith('"'):
        path = _unquote(text, original)
    elif text.startswith("//"):  # unix:///path: an empty authority
        path = text[2:]
    else:
        path = text
    if not path:
        raise ValueError(f"address {original!r}: empty unix path")
    try:
        return Unix(path)
    except ValueError as exc:
        raise ValueError(f"address {original!r}: {exc}") from None


# One piece of a quoted unix name: \xHH, \" or \\, or a run of other characters.
_QUOTED_PIECE = re.compile(r'\\x([0-9a-fA-F]{2})|\\(["\\])|([^"\\]+)')


def _unquote(text: str, original: object) -> bytes:
    """The name in ``"..."`` (the quoted form :meth:`Unix.__str__` writes)."""
    if len(text) < 2 or not text.endswith('"'):
        raise ValueError(f"address {original!r}: a quoted unix path must end with '\"'")
    body, name, pos = text[1:-1], bytearray(), 0
    while pos < len(body):
        m = _QUOTED_PIECE.match(body, pos)
        if m is None:
            raise ValueError(f"address {original!r}: in a quoted unix path write \\\\, "
                             f'\\" or \\xHH, not {body[pos:pos + 4]!r}')
        hex_byte, escaped, run = m.groups()
        if hex_byte is not None:
            name.append(int(hex_byte, 16))
        else:
            try:
                name += (escaped or run).encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise ValueError(f"address {original!r}: a lone surrogate stands for "
                                 "no byte") from None
        pos = m.end()
    return bytes(name)


def _fd(text: str, original: object) -> Fd:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"address {original!r}: fd {text!r} is not a number")
    return Fd(int(text))


def _parse_text(text: str, default_host: str) -> Address:
    t = text.strip()
    low = t.lower()
    if low.startswith("unix:"):
        return _unix(t[5:], text)
    if low.startswith("fd://"):
        return _fd(t[5:], text)
    for prefix, cls in (("tcp://", Tcp), ("udp://", Udp), ("tcp:", Tcp), ("udp:", Udp)):
        if low.startswith(prefix):
            host, port = _host_port(t[len(prefix):], text, default_host)
            return cls(host, port)
    if t.startswith("/") or t.startswith("./"):
        raise ValueError(f"address {text!r}: write unix:{t} for a unix socket path")
    host, port = _host_port(t, text, default_host)
    return Tcp(host, port)


def _parse_tuple(value: tuple[Any, ...]) -> Tcp:
    if len(value) not in (2, 4):
        raise ValueError(f"address {value!r}: a tuple must be (host, port)")
    host, port = value[0], value[1]
    if not isinstance(host, str):
        raise TypeError(f"address {value!r}: host must be a str")
    # ("", port) is the socket module's spelling of "every interface".
    return Tcp(host or "0.0.0.0", port)


def parse_address(value: object, *, default_host: str = "127.0.0.1") -> Address:
    """Turn ``value`` into an address object.

    Accepts an address object (returned as is), an ``int`` port, ``"8080"``, ``":8080"``,
    ``"host:port"``, ``"[v6]:port"``, ``"tcp://host:port"``, ``"udp://host:port"``,
    ``"tcp:host:port"``, ``"unix:/path"``, ``"unix:///path"``, ``"fd://3"`` and
    ``(host, port)`` tuples. A missing host means ``default_host``.

    Raises ``ValueError`` (naming the bad text) for anything else, ``TypeError`` for a
    value of the wrong type.
    """
    if isinstance(value, (Tcp, Udp, Unix, Fd)):
        return value
    if isinstance(value, bool):
        raise TypeError("address must be an address, str, int port or (host, port), not bool")
    if isinstance(value, int):
        return Tcp(default_host, value)
    if isinstance(value, str):
        return _parse_text(value, default_host)
    if isinstance(value, tuple):
        return _parse_tuple(value)
    raise TypeError(
        f"address must be an address, str, int port or (host, port), not {type(value).__name__}"
    )


@overload
def from_sockaddr(family: int, sockaddr: Any, *, datagram: Literal[False] = False
                  ) -> Tcp | Unix: ...
@overload
def from_sockaddr(family: int, sockaddr: Any, *, datagram: Literal[True]) -> Udp | Unix: ...
def from_sockaddr(family: int, sockaddr: Any, *, datagram: bool = False) -> Tcp | Udp | Unix:
    """The address object for what ``accept``/``getpeername``/``recvfrom`` returned."""
    if family == socket.AF_UNIX:
        # Whatever a peer bound: text, bytes that are not UTF-8 (the socket module gives
        # them surrogate-escaped), an abstract name of up to 108 bytes (as bytes), or
        # nothing ("", or None from recvfrom). Unix takes every one of them.
        return Unix(sockaddr) if sockaddr else _UNNAMED
    # What the kernel returned needs no checking: skip the dataclass __init__ and its
    # validation (this runs for every accepted connection and received datagram).
    cls: type[Tcp] | type[Udp] = Udp if datagram else Tcp
    address = object.__new__(cls)
    # A connection's peer is interned: the connections of one client host (or of a
    # proxy in front of the server) share one string, kept as long as they live
    # (memory per connection). A datagram's sender is usually short-lived: as is.
    _set_field(address, "host", sockaddr[0] if datagram else sys.intern(sockaddr[0]))
    _set_field(address, "port", sockaddr[1])
    return address


def as_accepted(peer: Tcp | Unix) -> Any:
    """The peer as the ``socket`` module's ``accept()`` returns it (what gevent and
    gunicorn handlers expect): ``(host, port)``, ``(host, port, 0, 0)`` for IPv6; a unix
    path as ``str`` (undecodable bytes surrogate-escaped), an abstract name as ``bytes``,
    ``""`` for an unnamed peer."""
    if isinstance(peer, Tcp):
        return (peer.host, peer.port, 0, 0) if ":" in peer.host else (peer.host, peer.port)
    path = peer.path
    raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
    if raw[:1] == b"\0":
        return raw
    return raw.decode("utf-8", "surrogateescape")
