"""Every example runs, answers on loopback and stops gracefully on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from gevent import subprocess

ROOT = Path(__file__).parent.parent


def run_example(name: str, *args: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    line = proc.stdout.readline().decode()
    if "listening on" not in line:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"{name} did not start: {line!r} {err.decode()}")
    return proc, line.rsplit(" ", 1)[1].strip()


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert b"stopped" in out


@pytest.mark.no_leak_check
def test_echo_example() -> None:
    proc, addr = run_example("echo.py", "127.0.0.1:0")
    try:
        port = int(addr.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"hello greenserve\n")
            assert c.recv(100) == b"hello greenserve\n"
    finally:
        stop(proc)


@pytest.mark.no_leak_check
def test_udp_echo_example() -> None:
    proc, addr = run_example("udp_echo.py", "udp://127.0.0.1:0")
    try:
        port = int(addr.rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(10)
            c.sendto(b"ping", ("127.0.0.1", port))
            assert c.recvfrom(100) == (b"ping", ("127.0.0.1", port))
    finally:
        stop(proc)


def kv_connect(port: int) -> tuple[socket.socket, Any]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    return conn, conn.makefile("rb")


def ask(conn: socket.socket, lines: Any, command: bytes) -> bytes:
    conn.sendall(command + b"\n")
    answer = lines.readline()
    assert answer.endswith(b"\n"), (command, answer)
    return answer[:-1]


def assert_closed_by_server(lines: Any) -> None:
    # End of file; or a reset, when the server closed with bytes of ours left unread.
    try:
        assert lines.read() == b""
    except ConnectionResetError:
        pass


def stop_kv(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert out.endswith(b"stopped\n"), out
    return err.decode()


@pytest.mark.no_leak_check
@pytest.mark.timeout(30)
def test_kv_server_example() -> None:
    proc, addr = run_example("kv_server.py", "--bind", "127.0.0.1:0", "--grace", "30")
    port = int(addr.rsplit(":", 1)[1])
    try:
        conn, lines = kv_connect(port)
        with conn, lines:
            for command, answer in [
                (b"SET a 1", b"OK"),
                (b"set b hello world", b"OK"),            # commands are case-insensitive
                (b"GET b", b"VALUE hello world"),
                (b"GET missing", b"NOT_FOUND"),
                (b"KEYS", b"KEYS a b"),
                (b"DEL a", b"DELETED"),
                (b"DEL a", b"NOT_FOUND"),
                (b"KEYS", b"KEYS b"),
                (b"FLY away", b"ERR unknown command 'FLY'"),
                (b"GET", b"ERR usage: GET key"),
                (b"\xff", b"ERR line is not UTF-8"),
            ]:
                assert ask(conn, lines, command) == answer
            assert ask(conn, lines, b"QUIT") == b"BYE"
            assert_closed_by_server(lines)

        conn, lines = kv_connect(port)                  # one store for every client
        with conn, lines:
            assert ask(conn, lines, b"GET b") == b"VALUE hello world"
            assert ask(conn, lines, b"SET big " + b"x" * 2000) == b"ERR line too long"
            assert_closed_by_server(lines)

        # SIGTERM: the listening socket is closed at once, open clients are still served
        # during the grace period, and the server exits as soon as the last one quits.
        conn, lines = kv_connect(port)
        with conn, lines:
            assert ask(conn, lines, b"SET c 3") == b"OK"
            proc.terminate()
            assert proc.stdout.readline() == b"stopping: 1 connection(s) open, 30.0 s to finish\n"
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
            assert ask(conn, lines, b"KEYS") == b"KEYS b c"
            assert ask(conn, lines, b"QUIT") == b"BYE"
            assert_closed_by_server(lines)
        err = stop_kv(proc)
        assert "sent a line longer than 1024 bytes: closing" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()


@pytest.mark.no_leak_check
@pytest.mark.timeout(30)
def test_kv_server_example_closes_lingering_connections_after_grace() -> None:
    proc, addr = run_example("kv_server.py", "--bind", "127.0.0.1:0", "--grace", "0.2")
    port = int(addr.rsplit(":", 1)[1])
    try:
        conn, lines = kv_connect(port)
        with conn, lines:
            assert ask(conn, lines, b"SET k v") == b"OK"
            proc.terminate()
            assert proc.stdout.readline() == b"stopping: 1 connection(s) open, 0.2 s to finish\n"
            assert lines.read() == b""                  # closed by the server after 0.2 s
        assert "closing 1 connection(s) still open" in stop_kv(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()


# -- Ctrl-C / SIGTERM with a client connected: every example exits within its deadline ----

# Slack on top of a deadline, for a loaded 2-core machine.
SLACK = 5.0


def idle_client(addr: str) -> socket.socket:
    """A connected client that says one thing and then nothing (``nc`` left open)."""
    c = socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=10)
    c.sendall(b"ECHO hi\n")
    assert c.recv(100).endswith(b"\n")  # served: the connection is counted
    return c


def exits_within(proc: subprocess.Popen, started: float, deadline: float) -> None:
    """``proc`` exits 0, cleanly, at most ``deadline`` (+ SLACK) seconds after ``started``
    (a ``time.monotonic()``)."""
    out, err = proc.communicate(timeout=deadline + SLACK)
    assert time.monotonic() - started < deadline + SLACK
    assert proc.returncode == 0, err.decode()
    assert out.rstrip().endswith(b"stopped"), out
    assert b"Traceback" not in err, err.decode()


@pytest.mark.no_leak_check
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize(("name", "args"), [
    ("echo.py", ["127.0.0.1:0", "0.5"]),
    ("kv_server.py", ["--bind", "127.0.0.1:0", "--grace", "0.5"]),
    ("legacy_socketserver.py", ["127.0.0.1:0", "0.5"]),
])
def test_a_signal_ends_the_example_within_its_deadline_with_an_idle_client(
        name: str, args: list[str], sig: int) -> None:
    proc, addr = run_example(name, *args)
    try:
        c = idle_client(addr)
        started = time.monotonic()
        proc.send_signal(sig)
        assert_closed_by_server(c.makefile("rb"))
        assert time.monotonic() - started >= 0.45  # the deadline, not sooner
        exits_within(proc, started, 0.5)
        c.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()


@pytest.mark.no_leak_check
@pytest.mark.parametrize(("name", "args"), [
    ("echo.py", ["127.0.0.1:0", "30"]),
    ("kv_server.py", ["--bind", "127.0.0.1:0", "--grace", "30"]),
])
def test_a_second_signal_ends_the_example_at_once(name: str, args: list[str]) -> None:
    proc, addr = run_example(name, *args)
    try:
        c = idle_client(addr)
        proc.send_signal(signal.SIGINT)
        if name == "kv_server.py":  # it says when it starts draining
            assert proc.stdout.readline().startswith(b"stopping: 1 connection(s) open")
        else:
            while b"stopping: 1 connection" not in (line := proc.stderr.readline()):
                assert line, "exited before draining"
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert_closed_by_server(c.makefile("rb"))
        exits_within(proc, started, 0)  # far before the 30 s deadline
        c.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
