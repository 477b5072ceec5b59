"""Connecting, in one place: name resolution, one attempt, addresses in order, and
Happy Eyeballs (RFC 8305). ``net`` and ``tcp`` both connect through here; each wraps
the connected gevent socket in its own vocabulary (a ``Flow``; a ``Reader``/``Writer``).

Every function closes the socket it made on any failure (``BaseException`` included),
and every ``OSError`` is translated (``errors.reraise``) with a note naming the address.
"""

from __future__ import annotations

import socket as _stdsocket
from typing import Any, NoReturn

import gevent
from gevent import socket as gsocket
from gevent.event import AsyncResult, Event

from .address import Tcp, Udp, Unix
from .errors import AddressLookupFailed, NoMatchingAddresses, add_note, reraise
from .switch import Switch

__all__ = ["connect", "connect_by_name", "connect_one", "interleave_families", "is_ip",
           "resolve"]


def resolve(host: str, service: str | int | None) -> list[Tcp | Udp | Unix]:
    """``getaddrinfo``: the addresses of ``host``/``service`` in the resolver's order,
    without duplicates. Raises ``AddressLookupFailed`` when it fails or finds nothing."""
    port = 0 if service is None else service
    try:
        infos = gsocket.getaddrinfo(host, port)
    except OSError as exc:
        reraise(exc, f"looking up {host}:{port}")
    result: list[Tcp | Udp | Unix] = []
    for family, kind, _proto, _canon, sockaddr in infos:
        addr = _from_info(family, kind, sockaddr)
        if addr is not None and addr not in result:
            result.append(addr)
    if not result:
        raise AddressLookupFailed(_stdsocket.EAI_NONAME, f"{host}:{port} resolved to nothing")
    return result


def _from_info(family: int, kind: int, sockaddr: Any) -> Tcp | Udp | None:
    if family not in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
        return None
    if kind == _stdsocket.SOCK_STREAM:
        return Tcp(sockaddr[0], sockaddr[1])
    if kind == _stdsocket.SOCK_DGRAM:
        return Udp(sockaddr[0], sockaddr[1])
    return None


def is_ip(host: str) -> bool:
    """True for an IPv4 or IPv6 literal (with or without a ``%zone``)."""
    for family in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
        try:
            _stdsocket.inet_pton(family, host.split("%", 1)[0])
            return True
        except OSError:
            pass
    return False


def connect(target: Tcp | Unix, timeout: float | None) -> tuple[gsocket.socket, Tcp | Unix]:
    """Connect to ``target``: a host name is resolved and its addresses tried in order
    (``timeout`` per attempt). Returns the socket and the address it connected to."""
    if isinstance(target, Tcp) and not is_ip(target.host):
        return connect_by_name(target.host, str(target.port), timeout)
    return connect_one(target, timeout), target


def connect_one(addr: Tcp | Unix, timeout: float | None) -> gsocket.socket:
    """One attempt to ``addr`` (an IP literal or a path) within ``timeout``. TCP
    connections get ``TCP_NODELAY``."""
    try:
        sock = gsocket.socket(addr.family, _stdsocket.SOCK_STREAM)
    except OSError as exc:  # e.g. EAFNOSUPPORT: no IPv6 on this host
        reraise(exc, f"connecting to {addr}", connecting=True)
    try:
        sock.settimeout(timeout)
        sock.connect(addr.sockaddr)
        sock.settimeout(None)
        if isinstance(addr, Tcp):
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        reraise(exc, f"connecting to {addr}", connecting=True)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_by_name(host: str, service: str, timeout: float | None,
                    happy_eyeballs_delay: float | None = None) -> tuple[gsocket.socket, Tcp]:
    """Resolve ``host``/``service`` and try its TCP addresses: in order, ``timeout``
    each, or (with ``happy_eyeballs_delay``) staggered and in parallel. The last failure
    is raised with the earlier ones in its notes (``NoMatchingAddresses`` when nothing
    resolves to TCP)."""
    targets = [a for a in resolve(host, service) if isinstance(a, Tcp)]
    if not targets:
        raise NoMatchingAddresses(f"{host}:{service} resolved to no TCP address")
    if happy_eyeballs_delay is None:
        return _sequential(targets, timeout)
    return _happy_eyeballs(interleave_families(targets), timeout, happy_eyeballs_delay, host)


def _sequential(targets: list[Tcp], timeout: float | None) -> tuple[gsocket.socket, Tcp]:
    failures: list[OSError] = []
    for target in targets:
        try:
            return connect_one(target, timeout), target
        except OSError as exc:  # any failure of this address: try the next one
            failures.append(exc)
    _raise_last(failures)


def interleave_families(targets: list[Tcp]) -> list[Tcp]:
    """RFC 8305 section 4: alternate address families, starting with the first one."""
    first = targets[0].family
    same = [t for t in targets if t.family == first]
    other = [t for t in targets if t.family != first]
    out: list[Tcp] = []
    for i in range(max(len(same), len(other))):
        out.extend(group[i] for group in (same, other) if i < len(group))
    return out


def _happy_eyeballs(targets: list[Tcp], timeout: float | None, delay: float,
                    host: str) -> tuple[gsocket.socket, Tcp]:
    winner: AsyncResult = AsyncResult()
    failures: list[OSError] = []

    def attempt(target: Tcp, failed: Event) -> None:
        try:
            sock = connect_one(target, timeout)
        except OSError as exc:  # any failure of this address: try the next one
            failures.append(exc)
            failed.set()
            return
        if winner.ready():
            sock.close()  # lost the race
            return
        winner.set((sock, target))
        sw.cancel()

    with Switch(name=f"happy eyeballs {host}") as sw:
        for target in targets:
            failed = Event()
            sw.fork(attempt, target, failed)
            # RFC 8305 section 5: the next attempt starts when this one fails or the
            # delay passes, whichever is first.
            gevent.wait([failed, winner], count=1, timeout=delay)
            if winner.ready():
                break
    if winner.ready():
        return winner.get()
    _raise_last(failures)


def _raise_last(failures: list[OSError]) -> NoReturn:
    last = failures[-1]
    for earlier in failures[:-1]:
        add_note(last, f"earlier attempt: {type(earlier).__name__}: {earlier} "
                       f"({'; '.join(getattr(earlier, '__notes__', []))})")
    raise last
