"""Item 2, fd exhaustion: a server process with a low RLIMIT_NOFILE gets more clients
than it has fds. It logs one line (not a traceback per failed accept), keeps serving
the connections it has, and accepts again at once when fds are freed.

The server is ``scripts/fd_limited_server.py`` (a StreamServer on the engine), driven
through stdin so that the test can read its ``stats()`` while it is out of fds.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent import subprocess
from gevent.event import Event

from greenserve._acceptor import MAX_BACKOFF

from .support import SCRIPTS, connect, recv_exactly, subprocess_env, wait_until

pytestmark = [pytest.mark.no_leak_check,  # the fds that matter are the child's
              pytest.mark.slow]

FD_LIMIT = 64
CLIENTS = 150  # more than twice the fds the server has


class ServerProcess:
    def __init__(self, limit: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "fd_limited_server.py"), str(limit)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=subprocess_env())
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise AssertionError(self.proc.stderr.read().decode())
        self.port = int(line)
        self.log: list[str] = []
        self._reader = gevent.spawn(self._read_log)

    def _read_log(self) -> None:
        while line := self.proc.stderr.readline():
            self.log.append(line.decode())

    def command(self, text: str) -> Any:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"server exited: {''.join(self.log)}"
        return json.loads(line)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.command("stats")
        return result

    def stop(self) -> None:
        assert self.command("stop") == "stopped"
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0, "".join(self.log)
        self._reader.join(timeout=5)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.kill()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()


@contextmanager
def fd_limited_server(limit: int) -> Iterator[ServerProcess]:
    server = ServerProcess(limit)
    try:
        yield server
    finally:
        server.kill()


def accept_failures(log: list[str]) -> list[str]:
    return [line for line in log if "accept failed" in line]


def round_trip(c: Any, text: bytes) -> None:
    c.sendall(text)
    assert recv_exactly(c, len(text)) == text


@pytest.mark.timeout(60)
def test_out_of_fds_keeps_serving_and_resumes_when_clients_leave(record_property: Any) -> None:
    served_at: dict[int, float] = {}
    again, release = Event(), Event()
    second: set[int] = set()

    def client(port: int, i: int) -> None:
        with connect(port, timeout=30) as c:
            round_trip(c, b"hello %d\n" % i)
            served_at[i] = time.monotonic()
            if release.is_set():
                return
            gevent.wait([again, release], count=1)
            if not release.is_set():  # held while the server is out of fds: still served
                round_trip(c, b"again %d\n" % i)
                second.add(i)
                release.wait()

    with fd_limited_server(FD_LIMIT) as server:
        clients = [gevent.spawn(client, server.port, i) for i in range(CLIENTS)]
        # Out of fds: accept failed and the engine backs off, again and again.
        wait_until(lambda: server.stats()["accept_errors"] >= 4, 15, "accept errors")
        wait_until(lambda: len(served_at) == server.stats()["active"], 10, "held clients served")
        held = set(served_at)
        assert 0 < len(held) < CLIENTS
        again.set()
        wait_until(lambda: len(second) == len(held), 10, "held clients served again")
        stats_out_of_fds = server.stats()
        lines_out_of_fds = accept_failures(server.log)

        # Free fds: the held clients leave; measure until a waiting client, and a
        # brand new one, are served.
        fresh_at: list[float] = []

        def fresh_client() -> None:
            with connect(server.port, timeout=30) as c:
                round_trip(c, b"fresh\n")
                fresh_at.append(time.monotonic())

        freed = time.monotonic()
        release.set()
        fresh = gevent.spawn(fresh_client)
        gevent.joinall([*clients, fresh], timeout=30, raise_error=True)
        assert len(served_at) == CLIENTS and fresh_at
        first_waiting = min(t for i, t in served_at.items() if i not in held) - freed
        all_waiting = max(served_at.values()) - freed
        fresh_delay = fresh_at[0] - freed
        wait_until(lambda: server.stats()["active"] == 0, 10, "every connection closed")
        final = server.stats()
        server.stop()

    assert len(lines_out_of_fds) == 1, lines_out_of_fds
    assert "Too many open files" in lines_out_of_fds[0]
    assert len(accept_failures(server.log)) <= 2, accept_failures(server.log)  # + a count line
    assert not any("Traceback" in line for line in server.log), "".join(server.log)
    assert final["accepted"] == CLIENTS + 1 and final["active"] == 0
    assert final["handler_errors"] == 0
    assert first_waiting < 1.0 and fresh_delay < 1.0, (first_waiting, fresh_delay)
    figures = {"fd_limit": FD_LIMIT, "clients": CLIENTS, "held": len(held),
               "accept_errors_while_out": stats_out_of_fds["accept_errors"],
               "accept_errors_total": final["accept_errors"],
               "log_lines": len(accept_failures(server.log)),
               "first_waiting_served_s": round(first_waiting, 4),
               "all_waiting_served_s": round(all_waiting, 4),
               "fresh_client_served_s": round(fresh_delay, 4)}
    record_property("figures", figures)
    print(f"fd exhaustion (held clients leave): {figures}")


@pytest.mark.timeout(60)
def test_out_of_fds_by_other_means_resumes_within_the_backoff_cap(record_property: Any) -> None:
    # Here no connection of the server frees an fd (something else held them): only
    # the back-off timer can notice, so the wait is bounded by MAX_BACKOFF.
    served_at: dict[int, float] = {}

    def client(port: int, i: int) -> None:
        with connect(port, timeout=30) as c:
            round_trip(c, b"late %d\n" % i)
            served_at[i] = time.monotonic()

    with fd_limited_server(FD_LIMIT) as server:
        assert server.command("fill") > 0
        clients = [gevent.spawn(client, server.port, i) for i in range(5)]
        # 8 failures: the back-off has doubled from 10 ms up to its cap (0.5 s).
        wait_until(lambda: server.stats()["accept_errors"] >= 8, 15, "back-off at its cap")
        assert not served_at
        freed = time.monotonic()
        server.command("free")
        gevent.joinall(clients, timeout=30, raise_error=True)
        delays = sorted(t - freed for t in served_at.values())
        wait_until(lambda: server.stats()["active"] == 0, 10, "every connection closed")
        final = server.stats()
        server.stop()
    assert len(delays) == 5 and final["accepted"] == 5
    assert len(accept_failures(server.log)) == 1
    assert delays[-1] <= MAX_BACKOFF + 0.3 <= 1.0, delays
    figures = {"accept_errors": final["accept_errors"],
               "first_served_s": round(delays[0], 4), "last_served_s": round(delays[-1], 4)}
    record_property("figures", figures)
    print(f"fd exhaustion (ballast freed): {figures}")
