"""A real HAProxy 2.x in front of the ``greenserve`` command: the PROXY protocol v1
(``send-proxy``) and v2 (``send-proxy-v2``) bring the true client address to the
handler, over plain TCP and over TLS terminated at greenserve (HAProxy in TCP mode
passes the TLS bytes through, after its PROXY header).

Skipped, with the reason, only when ``haproxy`` is not installed (CI installs it:
``apt-get install haproxy``). HAProxy listens on sockets this test made and passes as
``fd@N``, so it is reachable as soon as it starts: no port race, no readiness guess.
"""

from __future__ import annotations

import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from gevent import subprocess

from .support import ROOT, subprocess_env

HAPROXY = shutil.which("haproxy")
pytestmark = [
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed "
                                                "(apt-get install haproxy)"),
    pytest.mark.no_leak_check,  # the servers and HAProxy are child processes
]

# Connections per case: each must carry its own client's address, not a neighbour's.
CLIENTS = 5
# The cases: (frontend name, HAProxy's server option, TLS at greenserve?).
CASES = [("v1", "send-proxy", False), ("v2", "send-proxy-v2", False),
         ("v1-tls", "send-proxy", True), ("v2-tls", "send-proxy-v2", True)]


def version() -> str:
    if HAPROXY is None:
        return ""
    out = subprocess.run([HAPROXY, "-v"], capture_output=True, timeout=10).stdout.decode()
    return out.split()[2]  # "HAProxy version 2.6.12-1+deb12u4 ..."


def start_cli(*args: str) -> tuple[Any, int]:
    """``greenserve tests.cli_handlers:whoami --proxy-protocol ...`` on a free port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "greenserve", "tests.cli_handlers:whoami", "--bind",
         "127.0.0.1:0", "--proxy-protocol", *args],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(line + proc.stderr.read().decode())
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: Any) -> str:
    """SIGTERM ``proc``, wait for it, return its stderr (killed if it hangs)."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        return (err or b"").decode()
    return ""


def config(fds: dict[str, int], backends: dict[bool, int]) -> str:
    lines = ["global", "    maxconn 256", "defaults", "    mode tcp",
             "    timeout connect 5s", "    timeout client 30s", "    timeout server 30s"]
    for name, option, tls in CASES:
        lines += [f"frontend fe-{name}", f"    bind fd@{fds[name]}",
                  f"    default_backend be-{name}",
                  f"backend be-{name}",
                  f"    server greenserve 127.0.0.1:{backends[tls]} {option}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def haproxy(certs: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """HAProxy with one frontend per case; yields each frontend's port."""
    listeners = {}
    for name, _option, _tls in CASES:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)
        listeners[name] = ls
    plain, plain_port = start_cli()
    tls, tls_port = start_cli("--certfile", str(certs.cert), "--keyfile", str(certs.key))
    proxy = None
    try:
        cfg = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
        cfg.write_text(config({n: ls.fileno() for n, ls in listeners.items()},
                              {False: plain_port, True: tls_port}))
        assert HAPROXY is not None
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)],
                                 pass_fds=[ls.fileno() for ls in listeners.values()],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ports = {name: ls.getsockname()[1] for name, ls in listeners.items()}
        for ls in listeners.values():
            ls.close()  # HAProxy has them now
        yield ports
    finally:
        for ls in listeners.values():
            ls.close()
        if proxy is not None:
            proxy.kill()
            proxy.communicate()
        errors = stop(plain) + stop(tls)
    assert "Traceback" not in errors and " ERROR " not in errors, errors


def whoami(port: int, context: Any) -> tuple[str, str]:
    """Through HAProxy: (the address the handler saw, this client's own address)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = raw if context is None else context.wrap_socket(raw, server_hostname="localhost")
    with conn:
        host, port_ = conn.getsockname()[:2]
        me = f"tcp:{host}:{port_}"
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(100)
            assert chunk, f"closed before answering: {reply!r}"
            reply += chunk
    return reply.split()[1].decode(), me


def test_haproxy_is_2_x() -> None:
    assert version().startswith("2."), version()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("name", "tls"), [(name, tls) for name, _o, tls in CASES])
def test_the_handler_sees_the_true_client_through_haproxy(
        haproxy: dict[str, int], certs: Any, name: str, tls: bool) -> None:
    context = certs.client_context() if tls else None
    seen = [whoami(haproxy[name], context) for _ in range(CLIENTS)]
    for handler_saw, client in seen:
        assert handler_saw == client  # the client's own port, not HAProxy's
    assert len({client for _saw, client in seen}) == CLIENTS
