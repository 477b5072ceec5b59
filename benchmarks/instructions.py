"""Instructions per connection: a server's user-space cost, counted rather than timed.

Runs one of ``benchmarks/servers/`` under valgrind's callgrind twice, serving N1 and then
N2 connections (each: connect, send 16 B, read them back, close; 10 client threads), and
prints ``(instructions(N2) - instructions(N1)) / (N2 - N1)``: what one more connection
costs the server in user space, start-up and import costs cancelled out. Unlike CPU time
on a shared machine, the count repeats to within about 1% from run to run, so it can tell
a 5% change apart; it does not see the kernel (system calls, page faults, the loopback
network), which is the larger part of a connection's cost (README.md, "Where a
connection's cost goes").

    python benchmarks/instructions.py greenserve_net.py gevent_streamserver.py
    python benchmarks/instructions.py greenserve_tcp.py --args="--max-accepts-per-batch 16"

Needs valgrind. Uses the benchmark venv (run ``benchmarks/run.py --quick`` once to make
it) unless ``--python`` says otherwise. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV_PYTHON = BENCH / ".venv" / "bin" / "python"
CLIENT_THREADS = 10
START_TIMEOUT = 120.0  # a server under callgrind starts ~50x slower


def run_clients(port: int, count: int) -> None:
    """``count`` connections, each: connect, send 16 B, read 16 B back, close."""
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(n):
                with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                    sock.sendall(b"x" * 16)
                    got = b""
                    while len(got) < 16:
                        data = sock.recv(64)
                        if not data:
                            raise ConnectionError("the server closed before echoing")
                        got += data
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(count // CLIENT_THREADS,))
               for _ in range(CLIENT_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def instructions(python: str, server: str, args: list[str], count: int) -> int:
    """Instructions callgrind counted in the server process serving ``count`` connections."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
               python, str(BENCH / "servers" / server), "--port", "0", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = _readline(proc, START_TIMEOUT)
            if not line.startswith("LISTENING"):
                raise RuntimeError(f"{server} did not start: {line!r}")
            run_clients(int(line.split()[1]), count)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=START_TIMEOUT)
        found = re.search(r"Collected : (\d+)", err)
        if found is None:
            raise RuntimeError(f"no callgrind total for {server}: {err[-300:]}")
        return int(found.group(1))


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("servers", nargs="+", help="file names in benchmarks/servers/")
    parser.add_argument("--args", default="", help="extra arguments for every server")
    parser.add_argument("--counts", default="400,2400", help="N1,N2 (default 400,2400)")
    parser.add_argument("--python", default=str(VENV_PYTHON))
    opts = parser.parse_args()
    n1, n2 = (int(n) for n in opts.counts.split(","))
    if not 0 < n1 < n2:
        sys.exit("--counts: need 0 < N1 < N2")
    for server in opts.servers:
        extra = shlex.split(opts.args)
        a = instructions(opts.python, server, extra, n1)
        b = instructions(opts.python, server, extra, n2)
        print(f"{server} {opts.args}".strip() + f": {(b - a) / (n2 - n1):,.0f} instructions "
              f"per connection", flush=True)


if __name__ == "__main__":
    main()
