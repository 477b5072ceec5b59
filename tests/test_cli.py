"""The ``greenserve`` command (API.md section 9), run as a real process."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from gevent import subprocess

from .helpers import closed_by_server

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.no_leak_check  # the servers run in child processes


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greenserve", *args], capture_output=True,
                          env=_env(**extra), cwd=ROOT, timeout=30)


@contextmanager
def cli(*args: str, **extra: str) -> Iterator[tuple[Any, list[str]]]:
    proc = subprocess.Popen([sys.executable, "-m", "greenserve", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(**extra))
    try:
        addrs = []
        n = sum(1 for a in args if a == "--bind") or 1
        for _ in range(n):
            line = proc.stdout.readline().decode()
            if not line.startswith("listening on "):
                proc.kill()
                raise AssertionError(line + proc.stderr.read().decode())
            addrs.append(line.split()[-1])
        yield proc, addrs
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def stop_ok(proc: Any, sig: int = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    return err.decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_echo_and_graceful_stop(sig: int) -> None:
    with cli("echo", "--bind", "127.0.0.1:0") as (proc, addrs):
        with socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
            c.sendall(b"hello\n")
            assert c.recv(100) == b"hello\n"
        err = stop_ok(proc, sig)
    assert "Traceback" not in err


def test_python_m_and_console_script_agree() -> None:
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.decode().startswith("greenserve ")


def test_daytime_and_discard() -> None:
    with cli("daytime", "--bind", "127.0.0.1:0") as (proc, addrs), \
            socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
        data = c.makefile("rb").read()
        assert data.endswith(b"\r\n") and str(time.gmtime().tm_year).encode() in data
        stop_ok(proc)
    with cli("discard", "--bind", "127.0.0.1:0") as (proc, addrs), \
            socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
        c.sendall(b"x" * 100_000)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(10) == b""
        stop_ok(proc)


def test_module_handler_and_several_binds(tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    with cli("tests.cli_handlers:whoami", "--bind", "127.0.0.1:0", "--bind",
             f"unix:{path}") as (proc, addrs):
        assert addrs[1] == f"unix:{path}"
        with socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
            assert c.recv(100).split()[0] == str(proc.pid).encode()
        with socket.socket(socket.AF_UNIX) as u:
            u.connect(str(path))
            assert c.recv is not None and u.recv(100).split()[0] == str(proc.pid).encode()
        stop_ok(proc)
    assert not path.exists()


def test_processes_share_the_socket() -> None:
    with cli("tests.cli_handlers:whoami", "--bind", "127.0.0.1:0", "--processes", "2",
             "--max-connections", "1") as (proc, addrs):
        port = port_of(addrs[0])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        pids = {c.recv(100).split()[0] for c in held}
        assert len(pids) == 2  # one connection each: the second had to go to the other
        for c in held:
            c.close()
        stop_ok(proc)


def test_shutdown_timeout_closes_lingering_connections() -> None:
    with cli("echo", "--bind", "127.0.0.1:0", "--shutdown-timeout", "0.3") as (proc, addrs):
        c = socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10)
        c.sendall(b"x")
        assert c.recv(10) == b"x"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert c.recv(10) == b""  # closed at the deadline, not left hanging
        assert time.monotonic() - started < 5
        c.close()
        proc.communicate(timeout=20)
        assert proc.returncode == 0


def _socket_activated(sock: socket.socket) -> Any:
    """``greenserve echo`` started as systemd does, with ``sock`` as its fd 3."""
    # The child must see the socket as fd 3: dup it there in the child via a shim.
    fd = sock.fileno()
    shim = ("import os,sys;os.dup2(int(sys.argv[1]),3);os.environ['LISTEN_PID']=str(os.getpid());"
            "from greenserve.cli import main;sys.exit(main(['echo']))")
    return subprocess.Popen([sys.executable, "-c", shim, str(fd)], cwd=ROOT, pass_fds=(fd,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(LISTEN_FDS="1"))


def _listener() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, sock.getsockname()[1]


def test_systemd_listen_fds() -> None:
    sock, port = _listener()
    proc = _socket_activated(sock)
    sock.close()
    try:
        assert proc.stdout.readline().decode().strip() == f"listening on tcp:127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"activated")
            assert c.recv(100) == b"activated"
        stop_ok(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def test_a_broken_listening_socket_ends_the_cli_with_one_line_and_exit_1() -> None:
    # The child serves a listening socket this process shares; shutting it down here
    # makes the child's accept() fail with EINVAL: it stops (no traceback), exit 1.
    sock, port = _listener()
    proc = _socket_activated(sock)
    try:
        assert proc.stdout.readline().decode().strip() == f"listening on tcp:127.0.0.1:{port}"
        sock.shutdown(socket.SHUT_RD)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 1, err.decode()
        text = err.decode()
        assert "Traceback" not in text
        assert text.splitlines()[-1] == (
            f"greenserve: error: [Errno 22] Invalid argument (accepting connections for "
            f"run_server tcp:127.0.0.1:{port})")
    finally:
        sock.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def test_tls_and_proxy_protocol(certs: Any) -> None:
    with cli("tests.cli_handlers:whoami", "--bind", "127.0.0.1:0", "--certfile",
             str(certs.cert), "--keyfile", str(certs.key), "--proxy-protocol") as (proc, addrs):
        raw = socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10)
        raw.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\n")
        with certs.client_context().wrap_socket(raw, server_hostname="localhost") as c:
            assert c.recv(100).split()[1] == b"tcp:203.0.113.9:5555"
        stop_ok(proc)


def test_idle_timeout() -> None:
    with cli("echo", "--bind", "127.0.0.1:0", "--idle-timeout", "0.2") as (proc, addrs):
        with socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
            assert closed_by_server(c)
        stop_ok(proc)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["nope"], {}, "unknown handler 'nope'"),
        (["no_such_module_xyz:f"], {}, "cannot import 'no_such_module_xyz'"),
        (["tests.cli_handlers:missing"], {}, "has no 'missing'"),
        (["tests.cli_handlers:not_callable"], {}, "is not callable"),
        (["echo", "--bind", "nonsense::"], {}, "bad --bind 'nonsense::'"),
        (["echo", "--bind", "udp://127.0.0.1:0"], {}, "cannot listen on udp:127.0.0.1:0"),
        (["echo", "--max-connections", "0"], {}, "--max-connections"),
        (["echo", "--processes", "x"], {}, "--processes"),
        (["echo", "--log-level", "loud"], {}, "--log-level"),
        (["echo", "--keyfile", "k.pem"], {}, "--keyfile needs --certfile"),
        (["echo", "--certfile", "/nonexistent.pem"], {}, "cannot load --certfile"),
        (["echo"], {"LISTEN_FDS": "many"}, "LISTEN_FDS='many'"),
        ([], {}, "the following arguments are required: handler"),
    ],
)
def test_errors_are_one_line_and_exit_2(args: list[str], env: dict[str, str],
                                        message: str) -> None:
    out = run_cli(*args, **env)
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("greenserve: error: "), err
    assert message in err


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_cli("echo", "--bind", f"127.0.0.1:{port}")
    err = out.stderr.decode()
    assert out.returncode == 2
    assert err.count("\n") == 1 and "Address already in use" in err
