"""Item 9, socket activation: inherited listening sockets (``fd://N``) served through
``net.listen`` + ``net.serve_listeners``, ``StreamServer``, and the ``greenserve``
command started as systemd does with ``LISTEN_FDS=2`` (a TCP and a unix socket),
serving on both, and the command under systemd's own ``systemd-socket-activate``. An
inherited unix socket's path belongs to whoever created it: it is never unlinked."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import subprocess
from gevent.event import Event

from greenserve import Switch, Tcp, Unix, net
from greenserve.cli import systemd_binds
from greenserve.server import StreamServer

from .support import ROOT, SCRIPTS, connect, recv_exactly, subprocess_env

CLIENTS = 20  # per socket, at once


@contextmanager
def inherited_pair(tmp_path: Path) -> Iterator[tuple[int, int, int, Path]]:
    """A listening TCP and unix socket as bare fds, as a service manager passes them:
    ``(tcp_fd, unix_fd, port, path)``. Whoever takes an fd closes it."""
    path = tmp_path / "activated.sock"
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    port = tcp.getsockname()[1]
    uds = socket.socket(socket.AF_UNIX)
    uds.bind(str(path))
    uds.listen(64)
    yield tcp.detach(), uds.detach(), port, path


def tcp_client(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        return recv_exactly(c, len(data))


def unix_client(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(10)
        c.connect(str(path))
        c.sendall(data)
        return recv_exactly(c, len(data))


def hit_both(port: int, path: Path) -> None:
    """CLIENTS clients on each socket at once, from OS threads (blocking stdlib sockets:
    they work the same whether the server runs in this process or another)."""
    pool = gevent.get_hub().threadpool
    jobs = [(pool.spawn(tcp_client, port, b"tcp %d" % i), b"tcp %d" % i)
            for i in range(CLIENTS)]
    jobs += [(pool.spawn(unix_client, path, b"unix %d" % i), b"unix %d" % i)
             for i in range(CLIENTS)]
    for job, data in jobs:
        assert job.get(timeout=15) == data


def echo(flow: Any, addr: Any) -> None:
    while data := flow.read():
        flow.write(data)


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.mark.timeout(30)
def test_net_serves_two_inherited_fds(tmp_path: Path) -> None:
    with inherited_pair(tmp_path) as (tcp_fd, unix_fd, port, path):
        stop = Event()
        with Switch() as sw:
            listeners = [net.listen(f"fd://{tcp_fd}", sw=sw), net.listen(f"fd://{unix_fd}", sw=sw)]
            assert [ls.address for ls in listeners] == [Tcp("127.0.0.1", port), Unix(str(path))]
            sw.fork(net.serve_listeners, listeners, echo, on_error=pytest.fail, stop=stop,
                    drain_timeout=5)
            hit_both(port, path)
            stop.set()
        assert closed(tcp_fd) and closed(unix_fd)  # taken over: closed with the switch
        assert path.exists()  # the creator's path: not ours to unlink


@pytest.mark.timeout(30)
def test_stream_server_serves_an_inherited_fd(tmp_path: Path) -> None:
    with inherited_pair(tmp_path) as (tcp_fd, unix_fd, port, _path):
        os.close(unix_fd)

        def handle(sock: Any, address: Any) -> None:
            while data := sock.recv(65536):
                sock.sendall(data)

        server = StreamServer(f"fd://{tcp_fd}", handle)
        server.start()
        try:
            assert server.server_port == port
            with connect(port) as c:  # a gevent client: the server runs in this hub
                c.sendall(b"activated")
                assert recv_exactly(c, 9) == b"activated"
        finally:
            server.stop()
        assert closed(tcp_fd)


@pytest.mark.no_leak_check  # the server runs in a child process
@pytest.mark.timeout(30)
def test_cli_with_listen_fds_2_serves_both(tmp_path: Path) -> None:
    with inherited_pair(tmp_path) as (tcp_fd, unix_fd, port, path):
        try:
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPTS / "socket_activate.py"), str(tcp_fd), str(unix_fd),
                 "--", "echo"],
                cwd=ROOT, env=subprocess_env(), pass_fds=(tcp_fd, unix_fd),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            os.close(tcp_fd)  # the child has them now
            os.close(unix_fd)
        try:
            lines = [proc.stdout.readline().decode().strip() for _ in range(2)]
            assert lines == [f"listening on tcp:127.0.0.1:{port}",
                             f"listening on unix:{path}"], [*lines, proc.stderr.read().decode()]
            hit_both(port, path)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err.decode()
            assert b"Traceback" not in err
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        assert path.exists()  # systemd's path: the CLI never unlinks it


def test_listen_fds_for_another_process_are_ignored() -> None:
    me = str(os.getpid())
    assert systemd_binds({"LISTEN_FDS": "2", "LISTEN_PID": me}) == ["fd://3", "fd://4"]
    assert systemd_binds({"LISTEN_FDS": "2", "LISTEN_PID": "1"}) == []  # meant for pid 1
    assert systemd_binds({}) == []


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def free_port() -> int:
    """A port nobody listens on right now (systemd-socket-activate binds it itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_line_with(stream: Any, needle: str) -> str:
    with gevent.Timeout(20, AssertionError(f"no line with {needle!r} within 20 s")):
        while True:
            line = stream.readline().decode()
            assert line, f"end of output before a line with {needle!r}"
            if needle in line:
                return line


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not "
                                                    "installed (apt-get install systemd)")
@pytest.mark.no_leak_check  # the server runs in a child process
@pytest.mark.timeout(30)
def test_the_cli_under_the_real_systemd_socket_activate(tmp_path: Path) -> None:
    # systemd's own tool binds a TCP and a unix socket, waits for the first client,
    # then execs the command with them as fds 3 and 4 (LISTEN_FDS=2, LISTEN_PID).
    port, path = free_port(), tmp_path / "activated.sock"
    assert SOCKET_ACTIVATE is not None
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "-l", str(path),
         "-E", f"PYTHONPATH={subprocess_env()['PYTHONPATH']}",
         sys.executable, "-m", "greenserve", "echo"],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_line_with(proc.stderr, f"Listening on {path} as ")
        assert tcp_client(port, b"first") == b"first"  # the exec happens on this one
        lines = [proc.stdout.readline().decode().strip() for _ in range(2)]
        assert lines == [f"listening on tcp:127.0.0.1:{port}", f"listening on unix:{path}"]
        hit_both(port, path)
        proc.send_signal(signal.SIGTERM)  # same pid: the tool exec'd the command
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert path.exists()  # the tool's socket file: the CLI never unlinks it
