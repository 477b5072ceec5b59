"""Every example runs, answers on loopback and stops gracefully on SIGTERM."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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
