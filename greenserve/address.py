"""Addresses: ``Tcp``, ``Udp``, ``Unix`` (and ``Fd`` for an inherited socket), and
:func:`parse_address`, which turns what users type into one of them.

``str()`` of an address is its canonical text (``tcp:127.0.0.1:8080``,
``tcp:[::1]:8080``, ``unix:/run/x.sock``, ``udp:127.0.0.1:53``, ``fd://3``) and
``parse_address(str(a)) == a`` for every address ``a``.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any, Literal, Union, overload

__all__ = ["Address", "Fd", "StreamAddress", "Tcp", "Udp", "Unix", "from_sockaddr",
           "parse_address"]


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


@dataclass(frozen=True, slots=True)
class Unix:
    """A unix-domain socket path; a path starting with ``"\\0"`` is a Linux abstract socket."""

    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.path, str):
            raise TypeError(f"Unix: path must be a str, not {type(self.path).__name__}")
        if not self.path:
            raise ValueError("Unix: path must not be empty")
        if len(self.path.encode()) > 107:
            raise ValueError(f"Unix: path {self.path!r} is longer than 107 bytes")

    family = socket.AF_UNIX

    @property
    def sockaddr(self) -> str:
        return self.path

    @property
    def abstract(self) -> bool:
        return self.path.startswith("\0")

    def __str__(self) -> str:
        # "unix://x" reads as an empty authority before "x": keep a leading "//" intact
        return f"unix://{self.path}" if self.path.startswith("//") else f"unix:{self.path}"


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


def _unix(path: str, original: object) -> Unix:
    if path.startswith("//"):  # unix:///path: an empty authority
        path = path[2:]
    if not path:
        raise ValueError(f"address {original!r}: empty unix path")
    return Unix(path)


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
        path = sockaddr.decode("utf-8", "surrogateescape") if isinstance(sockaddr, bytes) \
            else sockaddr
        return Unix(path) if path else _UNNAMED
    # What the kernel returned needs no checking: skip the dataclass __init__ and its
    # validation (this runs for every accepted connection and received datagram).
    cls: type[Tcp] | type[Udp] = Udp if datagram else Tcp
    address = object.__new__(cls)
    _set_field(address, "host", sockaddr[0])
    _set_field(address, "port", sockaddr[1])
    return address


_set_field = object.__setattr__  # how a frozen dataclass sets its own fields
