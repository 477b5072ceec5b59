"""Legacy, monkey-patched applications: ``examples/legacy_socketserver.py`` (a blocking
``socketserver`` handler served unchanged after ``monkey.patch_all()``) talked to by
blocking clients in threads, and the half-patched processes ``StreamServer`` refuses.

Each case runs in its own interpreter: monkey-patching is for the whole process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TIMEOUT = 20.0


@contextmanager
def legacy_server(grace: str = "5") -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The example on a free port; yields (process, port). Killed if the test fails."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "legacy_socketserver.py"),
                             "127.0.0.1:0", grace],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("listening on 127.0.0.1:"), first
        yield proc, int(first.rsplit(":", 1)[1])
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


def stop(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    """SIGTERM; wait for the exit; return (stdout, stderr)."""
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    return out.decode(), err.decode()


class LineClient:
    """A blocking client, as a thread-per-connection program would have."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.lines = self.sock.makefile("rb")
        host, port = self.sock.getsockname()
        self.name = f"{host}:{port}"

    def ask(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self.lines.readline().decode().rstrip("\n")

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def test_blocking_clients_in_threads_are_served_concurrently() -> None:
    n = 25
    replies: dict[str, list[str]] = {}

    def one_client(port: int) -> None:
        c = LineClient(port)
        try:
            # MEET returns only once all n clients are inside their handlers: served
            # one after the other, the first would wait forever.
            replies[c.name] = [c.ask("ECHO hello"), c.ask(f"MEET {n}")]
        finally:
            c.close()

    with legacy_server() as (proc, port):
        threads = [threading.Thread(target=one_client, args=(port,)) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert out == "stopped\n"
    assert len(replies) == n
    for name, got in replies.items():
        # threading.local is per connection: each handler still knows its own client
        assert got == ["hello", f"met {n} as {name}"]


def test_sigterm_lets_a_request_in_flight_finish() -> None:
    with legacy_server() as (proc, port):
        c = LineClient(port)
        assert c.ask("ECHO up") == "up"  # the connection is in its handler
        c.sock.sendall(b"SLEEP 0.3\n")
        proc.send_signal(signal.SIGTERM)
        assert c.lines.readline() == b"slept\n"
        c.close()
        out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "stopped\n"


def test_sigterm_closes_connections_still_open_after_the_grace_period() -> None:
    with legacy_server(grace="0.2") as (proc, port):
        c = LineClient(port)
        assert c.ask("ECHO up") == "up"
        out, err = stop(proc)  # the client stays silent past the grace period
        assert c.lines.readline() == b""  # closed by the server
        c.close()
    assert proc.returncode == 0, err
    assert out == "stopped\n"


# -- half-patched processes ----------------------------------------------------------------

# Two connections store what they first receive in a threading.local, both wait, then
# each sends back its own value: b"A" b"B" when each connection has its own local.
LOCAL_STATE = """
import socket, threading
from greenserve.server import StreamServer
StreamServer.allow_partial_patching = True
local = threading.local()

def handle(sock, address):
    local.name = sock.recv(1)
    sock.sendall(b"k")
    sock.recv(1)
    sock.sendall(local.name)

server = StreamServer(("127.0.0.1", 0), handle)
server.start()
a = socket.create_connection(server.address)
b = socket.create_connection(server.address)
a.sendall(b"A"); assert a.recv(1) == b"k"
b.sendall(b"B"); assert b.recv(1) == b"k"
a.sendall(b"?"); b.sendall(b"?")
print(a.recv(1).decode(), b.recv(1).decode())
a.close(); b.close(); server.stop()
"""

CONSTRUCT = """
from greenserve.server import StreamServer
StreamServer(("127.0.0.1", 0), lambda sock, address: None)
print("constructed")
"""


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=TIMEOUT)


@pytest.mark.parametrize(("patch", "missing"), [("thread=False", "threading"),
                                                ("ssl=False", "ssl")])
def test_a_half_patched_process_is_refused(patch: str, missing: str) -> None:
    result = run_python(f"from gevent import monkey; monkey.patch_all({patch})\n{CONSTRUCT}")
    assert result.returncode != 0
    assert (f"RuntimeError: gevent.monkey patched socket but not {missing}: "
            in result.stderr), result.stderr
    assert "monkey.patch_all() as the first statement" in result.stderr


def test_partial_patching_can_be_allowed_deliberately() -> None:
    result = run_python("from gevent import monkey; monkey.patch_all(thread=False)\n"
                        "from greenserve.server import StreamServer\n"
                        "StreamServer.allow_partial_patching = True\n" + CONSTRUCT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "constructed\n"


def test_why_threading_must_be_patched_handlers_would_share_thread_locals() -> None:
    # What the refusal prevents (here allowed on purpose): both connections see "B".
    result = run_python("from gevent import monkey; monkey.patch_all(thread=False)\n"
                        + LOCAL_STATE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "B B\n"


def test_why_ssl_must_be_patched_stdlib_tls_fails_on_gevent_sockets() -> None:
    code = """
from gevent import monkey; monkey.patch_all(ssl=False)
import socket, ssl
a, b = socket.socketpair()
try:
    ssl.create_default_context().wrap_socket(a, server_hostname="localhost",
                                            do_handshake_on_connect=False)
except TypeError as exc:
    print("TypeError:", exc)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("TypeError: _wrap_socket() argument 'sock' must be "
                                    "_socket.socket"), result.stdout


def test_fully_patched_handlers_have_their_own_thread_locals() -> None:
    result = run_python("from gevent import monkey; monkey.patch_all()\n" + LOCAL_STATE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "A B\n"


def test_greenserve_itself_may_be_imported_before_patching() -> None:
    # The patch-first rule is for the application's modules (``from threading import
    # local`` before patching keeps the real one); greenserve only holds gevent's objects.
    result = run_python("import greenserve, greenserve.server\n"
                        "from gevent import monkey; monkey.patch_all()\n" + LOCAL_STATE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "A B\n"
