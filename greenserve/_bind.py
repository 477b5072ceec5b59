"""Binding sockets, in one place: TCP/UDP options, and the unix path rules (a stale
socket file is removed with ``reuse_addr``, a live one never; a process unlinks only
the file it bound itself, never one a forked child or another process made).

Used by ``flow`` (listeners), ``net`` (datagram sockets), ``tcp`` (a socket to adopt)
and ``server`` (gevent's ``get_listener``).
"""

from __future__ import annotations

import _socket
import errno
import os
import socket as _stdsocket
import stat

from gevent import socket as gsocket

from .address import Tcp, Udp, Unix

__all__ = ["Bound", "bind", "bind_unix", "bound_record", "remove_stale_socket",
           "socket_bound", "unlink_if_ours"]

# (path, pid, st_dev, st_ino) of a unix socket file this process bound
Bound = tuple[str | bytes, int, int, int]


def bound_record(path: str | bytes) -> Bound:
    """The record of a socket file this process just bound at ``path``, for
    :func:`unlink_if_ours`."""
    st = os.lstat(path)
    return (path, os.getpid(), st.st_dev, st.st_ino)


def unlink_if_ours(path: str | bytes, pid: int, dev: int, ino: int) -> None:
    if os.getpid() != pid:
        return  # a forked child shares the socket but does not own the path
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
        os.unlink(path)


def remove_stale_socket(path: str | bytes) -> None:
    """Remove the socket file at ``path`` if it is stale (no socket is bound to it).

    Anything else is left alone: a file that is not a socket (``FileExistsError``),
    and a socket file some socket is still bound to, listening or not (``EADDRINUSE``,
    as ``SO_REUSEADDR`` never takes a TCP port from a server either).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST,
                              f"{shown(path)} exists and is not a socket: not removed")
    if socket_bound(path):
        raise OSError(errno.EADDRINUSE, f"{shown(path)} is a socket in use: not removed")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # someone else removed it meanwhile: the path is free all the same


def socket_bound(path: str | bytes) -> bool:
    """Whether some socket is bound to the socket file ``path``, listening or not.

    Asked of the kernel with a datagram probe: ``connect`` finds the socket bound to
    the file's inode (in any network namespace: the file is the rendezvous) and fails
    with ``ECONNREFUSED`` only when there is none. A bound stream or seqpacket socket,
    listening or not, gives ``EPROTOTYPE`` (another socket type); a bound datagram
    socket takes the probe, or ``EPERM`` when it is connected elsewhere. (A stream probe
    gets ``ECONNREFUSED`` from a socket that is bound but not listening yet too, and a
    listener would see the probe as a connection.) Any other failure (``EACCES``) says
    nothing about the socket: it counts as bound, so the file is kept.

    /proc/net/unix cannot answer this: it lists the path each socket was bound *with*
    (relative, or through another directory name), unescaped (a newline in a name
    splits its line), and only this network namespace's sockets.
    """
    probe = _socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_DGRAM)
    try:
        probe.connect(path)  # a datagram connect never blocks: it only looks up the peer
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()
    return True


def shown(path: str | bytes) -> str:
    return path if isinstance(path, str) else repr(path)


def bind_unix(sock: gsocket.socket, addr: Unix, reuse_addr: bool) -> Bound | None:
    if addr.abstract:
        sock.bind(addr.path)
        return None
    if reuse_addr:
        remove_stale_socket(addr.path)
    sock.bind(addr.path)
    return bound_record(addr.path)


def bind(sock: gsocket.socket, addr: Tcp | Udp | Unix, reuse_addr: bool,
         reuse_port: bool) -> Bound | None:
    """Bind ``sock`` (stream or datagram) to ``addr``: the one place binding happens.
    Unix paths: a stale socket file is removed first with ``reuse_addr`` (never a live
    one), and the returned record lets the owner unlink exactly the file it bound."""
    if isinstance(addr, Unix):
        return bind_unix(sock, addr, reuse_addr)
    if reuse_addr:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEPORT, 1)
    sock.bind(addr.sockaddr)
    return None
