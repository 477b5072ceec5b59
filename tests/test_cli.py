"""The ``greenserve`` command (docs/cli.md), run as a real process."""

from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent import subprocess

from greenserve import net

from .helpers import closed_by_server, reset

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
        (["echo", "--bind", "udp://127.0.0.1:0"], {},
         "bad --bind 'udp://127.0.0.1:0': udp:127.0.0.1:0 is a datagram address"),
        (["echo", "--bind", "*:x"], {}, "bad --bind '*:x'"),
        (["echo", "--unix-mode", "0o660"], {}, "--unix-mode needs a --bind unix:PATH"),
        (["echo", "--unix-mode", "8"], {}, "not an octal mode"),
        (["echo", "--unix-mode", "1777"], {}, "not a permission mode"),
        (["echo", "--shutdown-timeout", "nan"], {}, "--shutdown-timeout"),
        (["echo", "--idle-timeout", "inf"], {}, "--idle-timeout"),
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
    assert err.count("udp:127.0.0.1:0") <= 1  # said once, not once per layer


def test_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_cli("echo", "--bind", f"127.0.0.1:{port}")
    err = out.stderr.decode()
    assert out.returncode == 2
    assert err.count("\n") == 1 and "Address already in use" in err


# -- stopping: one line on the first signal, everything closed on the second ------------------

# Long enough that a stop "before the deadline" cannot be the deadline's doing.
LONG_DRAIN = "30"
# Slack on top of a deadline, for a loaded 2-core machine.
SLACK = 5.0


def wait_for_line(stream: Any, needle: str) -> str:
    """The first line of ``stream`` containing ``needle`` (fails at end of file)."""
    with gevent.Timeout(20, AssertionError(f"no line with {needle!r} within 20 s")):
        while True:
            line = stream.readline().decode()
            assert line, f"end of output before a line with {needle!r}"
            if needle in line:
                return line


def idle_client(addr: str) -> socket.socket:
    """A connected client that sends nothing (``nc`` left open)."""
    c = socket.create_connection(("127.0.0.1", port_of(addr)), timeout=10)
    c.sendall(b"x")
    assert c.recv(10) == b"x"  # the echo handler runs: the connection is counted
    return c


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_within_the_drain_deadline_with_an_idle_client(sig: int) -> None:
    drain = 1.0
    with cli("echo", "--bind", "127.0.0.1:0", "--shutdown-timeout", str(drain)) as (proc, addrs):
        c = idle_client(addrs[0])
        started = time.monotonic()
        proc.send_signal(sig)
        assert c.recv(10) == b""  # closed by the server at the deadline
        _, err = proc.communicate(timeout=drain + SLACK)
        elapsed = time.monotonic() - started
        c.close()
    assert proc.returncode == 0, err.decode()
    assert drain * 0.9 <= elapsed < drain + SLACK
    assert "stopping: 1 connection, up to 1 s" in err.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_logs_one_line_second_closes_everything_at_once(sig: int) -> None:
    with cli("echo", "--bind", "127.0.0.1:0", "--shutdown-timeout", LONG_DRAIN) as (proc,
                                                                                   addrs):
        clients = [idle_client(addrs[0]) for _ in range(2)]
        proc.send_signal(sig)
        line = wait_for_line(proc.stderr, "stopping:")
        assert line.rstrip().endswith(f"stopping: 2 connections, up to {LONG_DRAIN} s")
        assert f"[{proc.pid}] INFO greenserve: " in line
        assert proc.poll() is None  # draining: the clients may still finish
        clients[0].sendall(b"still served")
        assert clients[0].recv(100) == b"still served"
        started = time.monotonic()
        proc.send_signal(sig)
        for c in clients:
            assert c.recv(10) == b""
            c.close()
        _, err = proc.communicate(timeout=SLACK)
        assert time.monotonic() - started < SLACK
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "closing 2 connections now" in text
    assert "stopping:" not in text  # logged once, on the first signal only
    assert "Traceback" not in text


def test_a_reset_peer_is_no_error() -> None:
    # The engine logs a peer that went away once, at DEBUG, with its address; neither
    # the built-in handler nor the CLI's on_error logs it as an ERROR traceback.
    with cli("echo", "--bind", "127.0.0.1:0", "--log-level", "debug",
             "--shutdown-timeout", LONG_DRAIN) as (proc, addrs):
        c = idle_client(addrs[0])
        peer = f"tcp:127.0.0.1:{c.getsockname()[1]}"
        c.sendall(b"unread echo")
        reset(c)  # RST: the handler's read fails with ECONNRESET
        # The drain ends long before its deadline only if the reset ended the handler.
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=SLACK)
        assert time.monotonic() - started < SLACK
    text = err.decode()
    assert proc.returncode == 0, text
    assert " ERROR " not in text and "Traceback" not in text, text
    assert [line for line in text.splitlines() if " DEBUG " in line and peer in line], text


def test_processes_log_with_their_pid_and_a_dead_child_is_decoded() -> None:
    with cli("tests.cli_handlers:whoami", "--bind", "127.0.0.1:0", "--processes", "2",
             "--max-connections", "1", "--shutdown-timeout", LONG_DRAIN) as (proc, addrs):
        port = port_of(addrs[0])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        pids = {int(c.recv(100).split()[0]) for c in held}
        assert len(pids) == 2 and proc.pid in pids
        (child,) = pids - {proc.pid}
        os.kill(child, signal.SIGKILL)
        line = wait_for_line(proc.stderr, f"child process {child} ")
        assert line.rstrip().endswith(f"child process {child} killed by SIGKILL"), line
        assert f"[{proc.pid}] ERROR greenserve: " in line
        for c in held:
            c.close()
        stop_ok(proc)


def test_processes_stop_together_and_a_second_signal_aborts_them_all() -> None:
    with cli("tests.cli_handlers:whoami", "--bind", "127.0.0.1:0", "--processes", "2",
             "--max-connections", "1", "--shutdown-timeout", LONG_DRAIN) as (proc, addrs):
        port = port_of(addrs[0])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        pids = {int(c.recv(100).split()[0]) for c in held}
        assert len(pids) == 2 and proc.pid in pids
        proc.send_signal(signal.SIGINT)  # as Ctrl-C would, to the parent
        stopping = {int(wait_for_line(proc.stderr, "stopping: 1 connection,").split("[")[1]
                        .split("]")[0]) for _ in range(2)}
        assert stopping == pids  # each process drains its own connection, with its pid
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        for c in held:
            assert c.recv(10) == b""
            c.close()
        _, err = proc.communicate(timeout=SLACK)
        assert time.monotonic() - started < SLACK
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


def test_a_second_signal_reaches_children_after_the_parent_has_drained() -> None:
    # The parent has no connection left (its drain is over: it waits for its child);
    # the child drains an idle client: the second signal must still reach it.
    with cli("tests.cli_handlers:whoami", "--bind", "127.0.0.1:0", "--processes", "2",
             "--max-connections", "1", "--shutdown-timeout", LONG_DRAIN) as (proc, addrs):
        port = port_of(addrs[0])
        held = {}
        for _ in range(2):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            held[int(c.recv(100).split()[0])] = c
        assert proc.pid in held and len(held) == 2
        held.pop(proc.pid).close()  # the parent's handler returns: the parent is idle
        (child_client,) = held.values()
        proc.send_signal(signal.SIGTERM)
        line = wait_for_line(proc.stderr, "stopping: 1 connection,")
        assert f"[{proc.pid}]" not in line  # the child's: the parent had none left
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert child_client.recv(10) == b""
        child_client.close()
        _, err = proc.communicate(timeout=SLACK)
        assert time.monotonic() - started < SLACK
    assert proc.returncode == 0, err.decode()


def test_ctrl_c_to_the_whole_process_group_is_one_signal() -> None:
    # A terminal's Ctrl-C sends SIGINT to every process of the group: the children
    # ignore it (the parent tells them), so one Ctrl-C is a graceful stop, not an abort.
    proc = subprocess.Popen([sys.executable, "-m", "greenserve", "tests.cli_handlers:whoami",
                             "--bind", "127.0.0.1:0", "--processes", "2", "--max-connections",
                             "1", "--shutdown-timeout", LONG_DRAIN],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), start_new_session=True)
    try:
        port = port_of(proc.stdout.readline().decode().split()[-1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        pids = {int(c.recv(100).split()[0]) for c in held}
        assert len(pids) == 2
        os.killpg(proc.pid, signal.SIGINT)
        for _ in range(2):
            wait_for_line(proc.stderr, "stopping: 1 connection,")
        for c in held:  # both processes still serve their connection while draining
            c.sendall(b"more")
        for c in held:
            c.close()  # whoami returns at end of file: every process can finish
        _, err = proc.communicate(timeout=SLACK)
        assert proc.returncode == 0, err.decode()
        assert b"closing" not in err and b"Traceback" not in err, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def test_describe_exit() -> None:
    assert net.describe_exit(3 << 8) == "exited with 3"
    assert net.describe_exit(0) == "exited with 0"
    assert net.describe_exit(signal.SIGKILL) == "killed by SIGKILL"
    assert net.describe_exit(signal.SIGSEGV | 0x80) == "killed by SIGSEGV"  # core dumped


# -- options ----------------------------------------------------------------------------------


def help_entries(text: str) -> dict[str, str]:
    """``--help``'s options section: each option's first name -> its text on one line."""
    entries: dict[str, str] = {}
    name = ""
    for line in text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            entries[name] = line
        elif name:
            entries[name] += " " + line.strip()
    return {name: " ".join(entry.split()) for name, entry in entries.items()}


def test_help_shows_every_option_with_a_description_and_its_default() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    entries = help_entries(out.stdout.decode())
    defaults = {"--bind": "(default: 127.0.0.1:8000, or systemd's sockets",
                "--max-connections": "(default: 10000)", "--backlog": "(default: 1024)",
                "--processes": "(default: 1)", "--log-level": "(default: info)",
                "--certfile": "(default: none", "--keyfile": "(default: the key in",
                "--proxy-protocol": "(default: off)", "--idle-timeout": "(default: none)",
                "--shutdown-timeout": "(default: 10)", "--unix-mode": "(default: 777 minus",
                "--no-reclaim-idle": "(default: the longest idle is closed",
                "--no-speedups": "(default: installed where it was built)"}
    assert set(entries) == {"-h", "--version", *defaults}
    for option, shown in defaults.items():
        assert shown in entries[option], entries[option]


def test_star_binds_every_ipv4_interface() -> None:
    with cli("echo", "--bind", "*:0") as (proc, addrs):
        assert addrs[0].startswith("tcp:0.0.0.0:")
        with socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
            c.sendall(b"any")
            assert c.recv(10) == b"any"
        stop_ok(proc)


@pytest.mark.parametrize(("given", "mode"), [("0o600", 0o600), ("660", 0o660),
                                              ("0666", 0o666)])
def test_unix_mode_sets_the_socket_files_mode(tmp_path: Path, given: str, mode: int) -> None:
    path = tmp_path / "moded.sock"
    with cli("echo", "--bind", f"unix:{path}", "--unix-mode", given) as (proc, _addrs):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        with socket.socket(socket.AF_UNIX) as u:
            u.connect(str(path))
            u.sendall(b"moded")
            assert u.recv(10) == b"moded"
        stop_ok(proc)
    assert not path.exists()


@pytest.mark.parametrize("reclaim", [True, False])
def test_the_builtin_echo_lets_an_idle_connection_go_for_a_waiting_client(reclaim: bool) -> None:
    flags = () if reclaim else ("--no-reclaim-idle",)
    with cli("echo", "--bind", "127.0.0.1:0", "--max-connections", "1", *flags) as (proc, addrs):
        port = port_of(addrs[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as first, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as second:
            first.sendall(b"one")
            assert first.recv(10) == b"one"      # now idle, holding the only slot
            second.sendall(b"two")               # waits in the backlog
            if reclaim:
                assert first.recv(10) == b""     # closed for the waiting client
                assert second.recv(10) == b"two"
            else:
                first.sendall(b"again")          # still served: never reclaimed
                assert first.recv(10) == b"again"
                first.close()
                assert second.recv(10) == b"two"
        stop_ok(proc)


@pytest.mark.parametrize("flag", ["", "--no-speedups"])
def test_the_command_installs_the_accelerator_unless_told_not_to(flag: str) -> None:
    from greenserve import speedups

    args = ["echo", "--bind", "127.0.0.1:0", "--log-level", "debug", *filter(None, [flag])]
    with cli(*args, GREENSERVE_SPEEDUPS="1") as (proc, addrs):
        with socket.create_connection(("127.0.0.1", port_of(addrs[0])), timeout=10) as c:
            c.sendall(b"x")
            assert c.recv(10) == b"x"
        err = stop_ok(proc)
    if flag:
        assert "speedups: off (turned off by the caller)" in err
    elif speedups.available():
        assert "speedups: installed" in err
    else:
        assert "speedups: not installed" in err
