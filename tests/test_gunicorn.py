"""greenserve.gunicorn (docs/gunicorn.md): real ``gunicorn`` processes, real HTTP clients.

Each test starts ``python -m gunicorn -k greenserve.gunicorn.<Worker>`` on 127.0.0.1
(port 0, read back from gunicorn's log) with an application from ``gunicorn_apps/``,
and kills its whole process group in ``finally``. Requests held in flight are released
through files (see ``gunicorn_apps/wsgi_app.py``); every wait polls a condition with a
deadline. Shutdown timings are asserted with generous bounds where gunicorn's own
gevent worker would take the keep-alive timeout (30 s here) or its 1 s poll.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import KNOWN_SETTINGS

ROOT = Path(__file__).parent.parent
APPS = Path(__file__).parent / "gunicorn_apps"
READY_CONF = APPS / "ready_conf.py"
# gunicorn >= 27 opens a control socket at one fixed path per user: not for test servers.
NO_CONTROL_SOCKET = (["--no-control-socket"]
                     if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else [])
pytestmark = pytest.mark.no_leak_check  # the servers run in child processes

# How long a healthy gunicorn gets to boot, answer or exit: far above what it needs
# (well under a second), so that only a real failure trips it.
DEADLINE = 15.0
# "At once": the bound for what greenserve's worker does immediately on SIGTERM, where
# gunicorn's gevent worker waits for its 1 s poll or the keep-alive timeout.
AT_ONCE = 1.0

class Gunicorn:
    """One running arbiter: its process, its log (read by a thread) and its ports."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_for(r"Listening at: (\S+)")
        self.ports = [int(url.rsplit(":", 1)[1]) for url in listening[1].split(",")]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """The first log line matching ``pattern`` (waiting for it to be written)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line matches {pattern!r}:\n{self.log}")
                self._changed.wait(min(left, 0.1))

    def worker_pids(self) -> list[int]:
        return [int(m) for m in re.findall(r"Booting worker with pid: (\d+)", self.log)]

    def worker_exited(self, pid: int) -> bool:
        return f"Worker exiting (pid: {pid})" in self.log

    def exit_code(self, timeout: float = DEADLINE) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the arbiter and its workers
        self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@contextmanager
def gunicorn(app: str, *options: str, worker: str = "Worker", workers: int = 1, binds: int = 1,
             pythonpath: Path = APPS, state: Path | None = None, ready: bool = True
             ) -> Iterator[Gunicorn]:
    """Run ``gunicorn -k greenserve.gunicorn.<worker> -w <workers> [options] app`` until
    the block ends; it starts once every worker is ready (unless ``ready=False``), and
    must log no traceback. ``worker`` may also be a full dotted path."""
    worker_class = worker if "." in worker else f"greenserve.gunicorn.{worker}"
    cmd = [sys.executable, "-m", "gunicorn", *NO_CONTROL_SOCKET, "-c", str(READY_CONF),
           "-k", worker_class, "-w", str(workers),
           "--pythonpath", str(pythonpath),
           *[arg for _ in range(binds) for arg in ("--bind", "127.0.0.1:0")], *options, app]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if state is not None:
        env["GS_STATE_DIR"] = str(state)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    server: Gunicorn | None = None
    try:
        server = Gunicorn(proc)
        if ready:
            wait_until(lambda: server is not None
                       and server.log.count("Worker ready") >= workers)
        yield server
        assert "Traceback" not in server.log, server.log
    finally:
        if server is not None:
            server.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(DEADLINE)
            assert proc.stderr is not None
            proc.stderr.close()


# -- clients ------------------------------------------------------------------------------

_clients: list[Any] = []  # every client connection a test opened, closed after it


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    _clients.append(conn)
    return conn


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    _clients.append(sock)
    return sock


def get(conn: http.client.HTTPConnection, path: str = "/") -> dict[str, Any]:
    conn.request("GET", path)
    return answer(conn)


def answer(conn: http.client.HTTPConnection) -> dict[str, Any]:
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    data: dict[str, Any] = json.loads(body)
    data["connection"] = resp.getheader("Connection")
    return data


def wait_until(condition: Callable[[], object], timeout: float = DEADLINE) -> float:
    """Poll ``condition`` until true; return how long it took (fail at the deadline)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.005)
    return time.monotonic() - start


def seconds_until_closed(sock: socket.socket | None, timeout: float = DEADLINE) -> float:
    """How long until the server closes ``sock`` (end of file or a reset)."""
    assert sock is not None
    start = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        data = b""
    assert data == b"", f"the server sent {data!r} instead of closing"
    return time.monotonic() - start


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
    except ConnectionRefusedError:
        return True
    return False


class Held:
    """A ``/slow`` request in flight on its own connection until :meth:`release`."""

    def __init__(self, port: int, state: Path, name: str) -> None:
        self.state, self.name = state, name
        self.conn = connect(port)
        self.conn.request("GET", f"/slow?id={name}")

    def started(self) -> bool:
        return (self.state / f"{self.name}.started").exists()

    def held_with(self) -> int:
        """How many held requests ran in its worker when this one started (itself too)."""
        return int((self.state / f"{self.name}.started").read_text())

    def wait_started(self) -> Held:
        wait_until(self.started)
        return self

    def release(self) -> dict[str, Any]:
        (self.state / f"{self.name}.release").touch()
        return answer(self.conn)


# -- the WSGI worker ---------------------------------------------------------------------


def test_serves_http_with_keep_alive_on_every_bind(tmp_path: Path) -> None:
    with gunicorn("wsgi_app:app", "--keep-alive", "5", binds=2, state=tmp_path) as g:
        for port in g.ports:
            conn = connect(port)
            first, second = get(conn), get(conn)
            assert first["peer_port"] == second["peer_port"]  # one connection, kept alive
            assert first["pid"] == second["pid"]
            assert first["server"] == second["server"] == f"127.0.0.1:{port}"
            assert first["connection"] == "keep-alive"
            conn.close()


def test_worker_connections_is_one_limit_across_binds(tmp_path: Path) -> None:
    # gunicorn's gevent worker makes one pool of worker_connections per socket: it
    # would accept c at once (its pool for the first bind holds one connection).
    with gunicorn("wsgi_app:app", "--worker-connections", "2", "--keep-alive", "30",
                  binds=2, state=tmp_path) as g:
        a = Held(g.ports[0], tmp_path, "a").wait_started()
        b = Held(g.ports[1], tmp_path, "b").wait_started()
        c = Held(g.ports[0], tmp_path, "c")  # connected and sent: waits in the backlog
        a.release()
        a.conn.close()  # an idle keep-alive connection still holds its slot: free it
        c.wait_started()
        # Accepted over the limit, c would have started at once, next to a and b (3):
        # the release of a takes its worker at least one 10 ms poll of the held request.
        assert c.held_with() == 2, "a third connection was accepted over worker_connections=2"
        assert b.release()["id"] == "b" and c.release()["id"] == "c"


def test_sigterm_to_the_worker_stops_accepting_closes_idle_and_finishes_requests(
        tmp_path: Path) -> None:
    with gunicorn("wsgi_app:app", "--keep-alive", "30", "--graceful-timeout", "10",
                  state=tmp_path) as g:
        (port,) = g.ports
        idle = connect(port)
        pid = get(idle)["pid"]
        held = Held(port, tmp_path, "inflight").wait_started()

        os.kill(pid, signal.SIGTERM)
        closed_after = seconds_until_closed(idle.sock)
        print(f"idle keep-alive connection closed {closed_after * 1000:.1f} ms after SIGTERM")
        assert closed_after < AT_ONCE  # gunicorn's gevent worker: the 30 s keep-alive

        # The worker stopped accepting: a new connection waits for its successor,
        # which the arbiter starts once the old worker has exited.
        newcomer = connect(port)
        newcomer.request("GET", "/")
        assert not g.worker_exited(pid)

        released = time.monotonic()
        done = held.release()
        print(f"in-flight request answered {(time.monotonic() - released) * 1000:.1f} ms "
              f"after its release")
        assert done["id"] == "inflight" and done["pid"] == pid
        assert seconds_until_closed(held.conn.sock) < AT_ONCE  # not kept alive after it
        assert answer(newcomer)["pid"] != pid
        g.wait_for(rf"Worker exiting \(pid: {pid}\)")


def test_sigterm_to_the_arbiter_refuses_new_connections_at_once(tmp_path: Path) -> None:
    with gunicorn("wsgi_app:app", "--keep-alive", "30", "--graceful-timeout", "10",
                  state=tmp_path) as g:
        (port,) = g.ports
        idle = connect(port)
        get(idle)
        held = Held(port, tmp_path, "inflight").wait_started()

        g.proc.send_signal(signal.SIGTERM)
        closed_after = seconds_until_closed(idle.sock)
        refused_after = wait_until(lambda: refused(port))
        print(f"idle keep-alive closed after {closed_after * 1000:.1f} ms; new connections "
              f"refused after {refused_after * 1000:.1f} ms")
        assert closed_after < AT_ONCE
        assert refused_after < AT_ONCE  # no worker holds the listening socket any more

        assert held.release()["id"] == "inflight"
        assert g.exit_code() == 0
        assert "SIGKILL" not in g.log


def test_a_request_over_the_graceful_timeout_is_cancelled(tmp_path: Path) -> None:
    with gunicorn("wsgi_app:app", "--graceful-timeout", "1", state=tmp_path) as g:
        held = Held(g.ports[0], tmp_path, "forever").wait_started()
        start = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            held.conn.getresponse()
        cut_after = time.monotonic() - start
        print(f"request cut {cut_after * 1000:.0f} ms after SIGTERM (graceful_timeout=1)")
        assert 0.5 < cut_after < 1.0 + AT_ONCE
        assert g.exit_code() == 0
        assert "Worker graceful timeout" in g.log
        assert "SIGKILL" not in g.log  # the worker cancelled and exited by itself


def test_sigint_is_a_quick_stop(tmp_path: Path) -> None:
    with gunicorn("wsgi_app:app", "--graceful-timeout", "10", state=tmp_path) as g:
        held = Held(g.ports[0], tmp_path, "held").wait_started()
        g.proc.send_signal(signal.SIGINT)
        assert seconds_until_closed(held.conn.sock) < AT_ONCE
        assert g.exit_code() == 0


def test_sigterm_while_the_worker_boots_is_not_lost(tmp_path: Path) -> None:
    # The arbiter's own handlers, inherited through fork, would queue the signal in the
    # arbiter's queue (gunicorn's gevent worker then boots and serves on).
    with gunicorn("wsgi_app:app", worker="slow_boot.SlowBootWorker", state=tmp_path,
                  ready=False) as g:
        pid = int(g.wait_for(r"Booting worker with pid: (\d+)")[1])
        wait_until((tmp_path / f"booting-{pid}").exists)
        os.kill(pid, signal.SIGTERM)
        (tmp_path / "go").touch()
        g.wait_for(rf"Worker exiting \(pid: {pid}\)")
        assert f"Worker ready (pid: {pid})" in g.log  # it booted, then stopped at once
        conn = connect(g.ports[0])
        assert get(conn)["pid"] != pid  # its successor serves


def test_max_requests_restarts_the_worker(tmp_path: Path) -> None:
    with gunicorn("wsgi_app:app", "--max-requests", "3", "--max-requests-jitter", "0",
                  state=tmp_path) as g:
        answers = []
        for _ in range(4):
            conn = connect(g.ports[0])
            answers.append(get(conn))
            conn.close()
        first = answers[0]["pid"]
        assert [a["pid"] for a in answers[:3]] == [first] * 3
        assert answers[2]["connection"] == "close"  # the last one of this worker
        assert answers[3]["pid"] != first
        g.wait_for(rf"Worker exiting \(pid: {first}\)")


def test_heartbeat_keeps_a_busy_worker_alive(tmp_path: Path) -> None:
    # --timeout 1: the arbiter kills a worker that does not notify() for 1 s.
    with gunicorn("wsgi_app:app", "--timeout", "1", state=tmp_path) as g:
        conn = connect(g.ports[0])
        slow = get(conn, "/sleep?s=2.5")
        assert get(conn)["pid"] == slow["pid"]
        assert "WORKER TIMEOUT" not in g.log


RELOADED_APP = '''\
import json, os

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps({"version": VERSION, "pid": os.getpid()}).encode()]

VERSION = VERSION_NUMBER
'''


def test_reload_restarts_the_worker_on_a_code_change(tmp_path: Path) -> None:
    module = tmp_path / "reloaded_app.py"
    module.write_text(RELOADED_APP.replace("VERSION_NUMBER", "1"))
    with gunicorn("reloaded_app:app", "--reload", pythonpath=tmp_path) as g:
        conn = connect(g.ports[0])
        before = get(conn)
        assert before["version"] == 1
        conn.close()
        module.write_text(RELOADED_APP.replace("VERSION_NUMBER", "2"))
        future = time.time() + 5  # a new mtime even on a coarse-grained file system
        os.utime(module, (future, future))

        def reloaded() -> bool:
            c = connect(g.ports[0])
            try:
                return bool(get(c)["version"] == 2)
            finally:
                c.close()

        wait_until(reloaded)
        g.wait_for(rf"Worker exiting \(pid: {before['pid']}\)")


def test_tls_from_gunicorns_cert_options(tmp_path: Path, certs: Any) -> None:
    with gunicorn("wsgi_app:app", "--certfile", str(certs.cert), "--keyfile", str(certs.key),
                  "--keep-alive", "5", state=tmp_path) as g:
        port = g.ports[0]
        # A client that never starts its handshake holds only its own greenlet.
        raw_connect(port)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=DEADLINE,
                                           context=certs.client_context())
        _clients.append(conn)
        first, second = get(conn), get(conn)
        assert first["peer_port"] == second["peer_port"]
        assert isinstance(conn.sock, ssl.SSLSocket)


# -- the TCP worker ---------------------------------------------------------------------


def echo_once(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_tcp_worker_echoes_with_two_workers() -> None:
    with gunicorn("tcp_echo:echo", worker="TCPWorker", workers=2) as g:
        port = g.ports[0]
        clients = [raw_connect(port) for _ in range(20)]
        for i, c in enumerate(clients):
            assert echo_once(c, b"hello %d\n" % i) == b"hello %d\n" % i
        assert len(g.worker_pids()) == 2
        g.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: refused(port)) < AT_ONCE
        assert echo_once(clients[0], b"still served\n") == b"still served\n"
        for c in clients:
            c.close()
        assert g.exit_code() == 0
        assert "SIGKILL" not in g.log


def test_tcp_worker_cuts_connections_open_past_the_graceful_timeout() -> None:
    with gunicorn("tcp_echo:echo", "--graceful-timeout", "1", worker="TCPWorker") as g:
        held = raw_connect(g.ports[0])
        assert echo_once(held, b"hello\n") == b"hello\n"
        start = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        seconds_until_closed(held)
        cut_after = time.monotonic() - start
        print(f"open TCP connection cut {cut_after * 1000:.0f} ms after SIGTERM")
        assert 0.5 < cut_after < 1.0 + AT_ONCE
        assert g.exit_code() == 0
        assert "SIGKILL" not in g.log


# -- the examples ------------------------------------------------------------------------


def test_the_examples_run_under_gunicorn(tmp_path: Path) -> None:
    examples = ROOT / "examples"
    with gunicorn("gunicorn_app:app", pythonpath=examples) as g:
        conn = connect(g.ports[0])
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and b"greenserve" in resp.read()
        conn.close()
    with gunicorn("gunicorn_tcp:handler", worker="TCPWorker", pythonpath=examples) as g:
        assert echo_once(raw_connect(g.ports[0]), b"ping\n") == b"ping\n"


def test_import_greenserve_does_not_import_gunicorn() -> None:
    code = ("import sys, greenserve; from gevent import monkey; "
            "assert 'gunicorn' not in sys.modules; "
            "assert not monkey.is_module_patched('socket')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=DEADLINE,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.no_leak_check
@pytest.mark.parametrize("worker", ["Worker", "keep_worker.PlainWorker"])
def test_the_worker_installs_the_accelerator_unless_its_subclass_says_not(
        worker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from greenserve import speedups

    monkeypatch.setenv("GREENSERVE_SPEEDUPS", "1")  # tox's env turns it off otherwise
    with gunicorn("wsgi_app:app", "--log-level", "debug", worker=worker) as g:
        line = g.wait_for(r"speedups: (installed|off|not installed)").group(0)
    if worker != "Worker":
        assert line == "speedups: off"
    elif speedups.available():
        assert line == "speedups: installed"
