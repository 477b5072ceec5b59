"""Item 8, unix socket safety: a server never removes a path that is not its own socket
- a regular file, a symlink (even to a socket), a live socket of someone else, a path
someone re-bound or replaced after we bound it - and creates its socket file with the
process umask respected. Through ``net.listen``, ``net.datagram_socket``,
``StreamServer`` and the ``greenserve`` command."""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from gevent import subprocess

from greenserve import Switch, Unix, net
from greenserve.server import StreamServer

from .support import ROOT, subprocess_env


@contextmanager
def via_listen(path: str, reuse: bool) -> Iterator[None]:
    with Switch() as sw:
        net.listen(Unix(path), sw=sw, reuse_addr=reuse)
        yield


@contextmanager
def via_datagram(path: str, reuse: bool) -> Iterator[None]:
    with Switch() as sw:
        net.datagram_socket(Unix(path), sw=sw, reuse_addr=reuse)
        yield


@contextmanager
def via_stream_server(path: str, reuse: bool) -> Iterator[None]:
    class Server(StreamServer):
        reuse_addr = 1 if reuse else None

    server = Server(f"unix:{path}", lambda sock, addr: None)
    server.start()
    try:
        yield
    finally:
        server.stop()


BINDERS: dict[str, Callable[[str, bool], Any]] = {
    "net.listen": via_listen, "net.datagram_socket": via_datagram,
    "StreamServer": via_stream_server,
}


def kind(path: Path) -> str:
    mode = os.lstat(path).st_mode
    return ("symlink" if stat.S_ISLNK(mode) else "socket" if stat.S_ISSOCK(mode)
            else "file" if stat.S_ISREG(mode) else oct(mode))


def stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays behind, nobody listening


# -- what is at the path before we bind ------------------------------------------------------


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "reuse_addr"])
@pytest.mark.parametrize("binder", list(BINDERS))
def test_a_regular_file_is_never_removed(binder: str, reuse: bool, tmp_path: Path) -> None:
    path = tmp_path / "data.sock"
    path.write_text("precious")
    with pytest.raises(OSError) as info, BINDERS[binder](str(path), reuse):
        pass
    assert info.value.errno in (errno.EADDRINUSE, errno.EEXIST)
    assert kind(path) == "file" and path.read_text() == "precious"


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "reuse_addr"])
@pytest.mark.parametrize("binder", list(BINDERS))
def test_a_symlink_to_a_socket_is_never_removed(binder: str, reuse: bool,
                                                tmp_path: Path) -> None:
    target = tmp_path / "real.sock"
    stale_socket(target)
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(OSError) as info, BINDERS[binder](str(link), reuse):
        pass
    assert info.value.errno in (errno.EADDRINUSE, errno.EEXIST)
    assert kind(link) == "symlink" and os.readlink(link) == str(target)
    assert kind(target) == "socket"


@pytest.mark.parametrize("binder", list(BINDERS))
def test_a_stale_socket_is_replaced_with_reuse_addr_only(binder: str, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale_socket(path)
    with pytest.raises(OSError) as info, BINDERS[binder](str(path), False):
        pass
    assert info.value.errno == errno.EADDRINUSE
    with BINDERS[binder](str(path), True):
        assert kind(path) == "socket"
    assert not path.exists()  # ours now: removed when we closed


# Someone else's live socket at the path: (socket type, whether it listens).
LIVE = {"listening": (socket.SOCK_STREAM, True),
        "bound, not listening yet": (socket.SOCK_STREAM, False),
        "seqpacket, not listening": (socket.SOCK_SEQPACKET, False),
        "datagram": (socket.SOCK_DGRAM, False)}


@pytest.mark.parametrize("state", list(LIVE))
@pytest.mark.parametrize("binder", list(BINDERS))
def test_a_live_socket_of_someone_else_is_never_removed(binder: str, state: str,
                                                       tmp_path: Path) -> None:
    # reuse_addr removes a *stale* socket file; like SO_REUSEADDR on a TCP port, it
    # does not take the address from a socket someone is still using. A socket is in
    # use from bind() on: a server that binds, then listens a moment later, keeps its
    # path (the probe once took ECONNREFUSED from it for a stale file).
    their_type, listening = LIVE[state]
    path = tmp_path / "theirs.sock"
    theirs = socket.socket(socket.AF_UNIX, their_type)
    try:
        theirs.bind(str(path))
        if listening:
            theirs.listen(8)
        inode = os.lstat(path).st_ino
        with pytest.raises(OSError) as info, BINDERS[binder](str(path), True):
            pass
        assert info.value.errno == errno.EADDRINUSE
        assert os.lstat(path).st_ino == inode
        if their_type != socket.SOCK_DGRAM:
            if listening:  # checking cost them nothing: no connection to accept
                theirs.setblocking(False)
                try:
                    probe, _ = theirs.accept()
                except BlockingIOError:
                    pass
                else:
                    probe.close()
                    pytest.fail("checking the path handed their listener a connection")
            else:
                theirs.listen(8)  # they go on as planned
        with socket.socket(socket.AF_UNIX, their_type) as c:  # and it still reaches them
            c.connect(str(path))
    finally:
        theirs.close()


@pytest.mark.no_leak_check  # the other socket is in a child process
@pytest.mark.timeout(30)
def test_a_socket_bound_in_another_network_namespace_is_never_removed(tmp_path: Path) -> None:
    # /proc/net/unix lists only this network namespace's sockets; the kernel's lookup
    # of a socket file's socket (what the probe asks) sees every namespace's.
    path = tmp_path / "elsewhere.sock"
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
            "print('bound', flush=True); sys.stdin.read()")
    # util-linux's unshare (in every Debian base system; CI runs as root, where
    # --map-root-user --net always works): its absence fails the test, never skips it.
    proc = subprocess.Popen(["unshare", "--map-root-user", "--net", sys.executable, "-c",
                             code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line == b"bound\n", f"no network namespace: {proc.stderr.read()!r}"
        assert not any(str(path) in entry for entry in Path("/proc/net/unix").read_text()
                       .splitlines())
        with pytest.raises(OSError) as info, via_listen(str(path), True):
            pass
        assert info.value.errno == errno.EADDRINUSE
        assert kind(path) == "socket"
    finally:
        proc.stdin.close()
        proc.communicate(timeout=20)
        proc.stdout.close()
        proc.stderr.close()


# -- what happens to the path after we bound it ---------------------------------------------


def replace_with_their_socket(path: Path) -> Callable[[], None]:
    path.unlink()
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(str(path))
    return theirs.close


def replace_with_symlink_to_ours(path: Path) -> Callable[[], None]:
    moved = path.with_name("moved.sock")
    path.rename(moved)  # the same socket inode, under another name
    path.symlink_to(moved)
    return lambda: None


def replace_with_file(path: Path) -> Callable[[], None]:
    path.unlink()
    path.write_text("someone else's")
    return lambda: None


REPLACEMENTS = {"their socket": (replace_with_their_socket, "socket"),
                "symlink to ours": (replace_with_symlink_to_ours, "symlink"),
                "regular file": (replace_with_file, "file")}


@pytest.mark.parametrize("replacement", list(REPLACEMENTS))
@pytest.mark.parametrize("binder", list(BINDERS))
def test_a_path_replaced_after_bind_is_not_unlinked(binder: str, replacement: str,
                                                   tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    replace, expected = REPLACEMENTS[replacement]
    with BINDERS[binder](str(path), False):
        assert kind(path) == "socket"
        cleanup = replace(path)
    try:
        assert kind(path) == expected
    finally:
        cleanup()


@pytest.mark.parametrize("binder", list(BINDERS))
def test_our_own_socket_is_unlinked(binder: str, tmp_path: Path) -> None:
    path = tmp_path / "ours.sock"
    with BINDERS[binder](str(path), False):
        assert kind(path) == "socket"
    assert not path.exists()


# -- the umask -------------------------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)  # process-wide: nothing else in this process creates files now
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o077, 0o022, 0o002])
@pytest.mark.parametrize("binder", list(BINDERS))
def test_socket_file_respects_the_umask(binder: str, mask: int, tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    with umask(mask), BINDERS[binder](str(path), False):
        mode = stat.S_IMODE(os.lstat(path).st_mode)
    assert mode == 0o777 & ~mask, oct(mode)


@pytest.mark.no_leak_check  # the server runs in a child process
@pytest.mark.timeout(30)
def test_cli_socket_file_respects_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "cli.sock"
    proc = subprocess.Popen([sys.executable, "-m", "greenserve", "echo", "--bind", f"unix:{path}"],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: os.umask(0o077))
    try:
        line = proc.stdout.readline().decode()
        assert line.strip() == f"listening on unix:{path}", line + proc.stderr.read().decode()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
        proc.terminate()
        proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert not path.exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
