#!/usr/bin/env python3
"""Benchmark greenserve's server faces against gevent, asyncio, uvloop and trio.

    python benchmarks/run.py            # full run (about 12 minutes on 2 cores)
    python benchmarks/run.py --quick    # smoke run (about 1-2 minutes)
    python benchmarks/run.py --only a --only uvloop

Builds benchmarks/loadgen.c, creates benchmarks/.venv with the servers' dependencies,
runs every scenario against every server (interleaved, several repetitions, server on
CPU 0 and load generator on CPU 1), prints one table per scenario and writes them to
benchmarks/results.md. See benchmarks/README.md for what each number means.

Only loopback traffic; every load generator run and server start has a time limit, and
servers are always killed when their measurement ends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SERVERS_DIR = BENCH / "servers"
BUILD = BENCH / "build"
LOGS = BUILD / "logs"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BUILD / "loadgen"
VENV = BENCH / ".venv"
PEER_PACKAGES = ["gevent", "uvloop", "trio"]
REPORTED_PACKAGES = ["greenserve", "gevent", "greenlet", "uvloop", "trio"]

SERVER_CPU, LOADGEN_CPU = "0", "1"
SERVER_START_TIMEOUT = 30.0  # seconds; a cold interpreter importing gevent takes ~0.5 s
SERVER_STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
LOADGEN_SLACK = 60.0  # seconds allowed past a load generator run's own duration
SETTLE_SECONDS = 0.5  # after warm-up connections close, before reading "before" RSS
WARMUP_IDLE_CONNS = 100
# Scenario g: BURST_CONNS connections in rounds of BURST_ROUND held at once (what the
# gevent baseline's Pool(10000) serves), then BURST_IDLE seconds idle before "after".
BURST_CONNS, BURST_ROUND, BURST_IDLE = 50_000, 10_000, 2.0
BASELINE = "gevent"
MAX_FAILURES = 2  # a server that failed this often in a scenario skips its remaining repetitions
BUDGET_MINUTES = 14.0  # the default run is planned for ~12 minutes; stop measuring past this


# --------------------------------------------------------------------------- model


Result = dict[str, float]  # one loadgen JSON line, or the runner's derived numbers


@dataclass(frozen=True)
class Server:
    key: str  # used by --only and in logs
    label: str  # shown in tables
    script: str
    args: tuple[str, ...] = ()
    needs_greenserve: bool = False


@dataclass(frozen=True)
class Metric:
    key: str  # field of loadgen's JSON (or computed by the runner)
    label: str
    higher_is_better: bool
    decimals: int = 0


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    mode: str  # echo | connect | idle | burst
    metrics: tuple[Metric, ...]
    servers: tuple[str, ...]
    loadgen_args: tuple[str, ...] = ()


@dataclass
class Settings:
    reps: int
    duration: float
    warmup: float
    idle_conns: int
    pin: bool
    python: Path
    greenserve_pythonpath: bool
    output: Path
    deadline: float  # time.monotonic() after which no new measurement starts


@dataclass
class Outcome:
    """All repetitions of one server in one scenario."""

    values: list[Result] = field(default_factory=list)
    errors: int = 0  # loadgen-reported errors in runs that still produced numbers
    failures: list[str] = field(default_factory=list)
    skipped: str = ""  # why some repetitions did not run


RPS = Metric("rps", "round trips/s", True)
CPS = Metric("cps", "connections/s", True)
P50 = Metric("p50_us", "p50 µs", False, 1)
P99 = Metric("p99_us", "p99 µs", False, 1)
KIB = Metric("kib_per_conn", "KiB/conn", False, 1)
PEAK = Metric("peak_mib", "RSS at the peak, MiB", False, 1)
RETAINED = Metric("retained_mib", "RSS after − before, MiB", False, 1)
# Server CPU (user + system, from /proc/PID/stat) over the whole loadgen run, warm-up
# included, divided by every connection of that run: steadier than connections/s on a
# shared machine, because it does not depend on how much CPU the server was given.
CPU = Metric("cpu_us_per_conn", "server CPU µs/conn", False, 1)

SERVERS = [
    Server("gevent", "gevent StreamServer", "gevent_streamserver.py"),
    Server("asyncio-streams", "asyncio streams", "asyncio_streams.py"),
    Server("asyncio-protocol", "asyncio Protocol", "asyncio_protocol.py"),
    Server("uvloop-streams", "uvloop streams", "uvloop_streams.py"),
    Server("uvloop-protocol", "uvloop Protocol", "uvloop_protocol.py"),
    Server("trio", "trio serve_tcp", "trio_serve_tcp.py"),
    Server("greenserve-net", "greenserve net.run_server", "greenserve_net.py", (), True),
    Server(
        "greenserve-net+speedups",
        "greenserve net.run_server + speedups",
        "greenserve_net.py",
        ("--speedups",),
        True,
    ),
    Server("greenserve-tcp", "greenserve tcp.Server", "greenserve_tcp.py", (), True),
    Server(
        "greenserve-streamserver", "greenserve StreamServer", "greenserve_streamserver.py", (), True
    ),
] + [
    Server(
        f"greenserve-tcp-batch{n}",
        f"greenserve tcp.Server, max_accepts_per_batch={n}",
        "greenserve_tcp.py",
        ("--max-accepts-per-batch", str(n)),
        True,
    )
    for n in (1, 16, 64)
]
SERVER_BY_KEY = {s.key: s for s in SERVERS}
MAIN_SERVERS = tuple(s.key for s in SERVERS if "-batch" not in s.key)
BATCH_SERVERS = (BASELINE,) + tuple(s.key for s in SERVERS if "-batch" in s.key)

SCENARIOS = [
    Scenario(
        "a",
        "echo, 100 connections × 64 B",
        "echo",
        (RPS,),
        MAIN_SERVERS,
        ("--conns", "100", "--size", "64"),
    ),
    Scenario(
        "b",
        "echo, 1 connection × 64 B (latency)",
        "echo",
        (P50, P99, RPS),
        MAIN_SERVERS,
        ("--conns", "1", "--size", "64"),
    ),
    Scenario(
        "c",
        "echo, 100 connections × 16 KiB",
        "echo",
        (RPS,),
        MAIN_SERVERS,
        ("--conns", "100", "--size", "16384"),
    ),
    Scenario(
        "d",
        "connect rate, 50 workers (connect, echo 16 B, close)",
        "connect",
        (CPS, CPU),
        MAIN_SERVERS,
        ("--workers", "50"),
    ),
    Scenario("e", "server RSS per idle connection", "idle", (KIB,), MAIN_SERVERS),
    Scenario(
        "g",
        f"server RSS after a burst: {BURST_CONNS:,} connections, {BURST_ROUND:,} at a time, "
        f"then {BURST_IDLE:g} s idle",
        "burst",
        (PEAK, RETAINED),
        (BASELINE, "greenserve-net", "greenserve-net+speedups"),
    ),
    Scenario(
        "f",
        "connect rate, 50 workers, tcp.Server max_accepts_per_batch",
        "connect",
        (CPS, CPU),
        BATCH_SERVERS,
        ("--workers", "50"),
    ),
]


# --------------------------------------------------------------------------- setup


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_loadgen() -> None:
    BUILD.mkdir(exist_ok=True)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    log(f"building {LOADGEN.relative_to(REPO)}")
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(LOADGEN), str(LOADGEN_SRC)], check=True
    )


def venv_has(python: Path, packages: list[str]) -> bool:
    code = "import importlib.metadata as m, sys\nfor p in sys.argv[1:]: m.version(p)"
    return subprocess.run([str(python), "-c", code, *packages], capture_output=True).returncode == 0


def pip_install(python: Path, args: list[str]) -> bool:
    """Runs pip, output to build/pip.log; returns whether it succeeded."""
    with open(BUILD / "pip.log", "a") as out:
        return (
            subprocess.run(
                [str(python), "-m", "pip", "install", *args], stdout=out, stderr=subprocess.STDOUT
            ).returncode
            == 0
        )


def greenserve_install_stamp() -> str:
    files = [REPO / name for name in ("setup.py", "pyproject.toml", "setup.cfg")]
    return " ".join(f"{f.name}:{f.stat().st_mtime_ns}" for f in files if f.exists())


def ensure_greenserve(python: Path) -> bool:
    """pip install -e the repo (again when its packaging files change).

    Returns False when that fails: the greenserve servers then import the package
    from the source tree through PYTHONPATH instead.
    """
    stamp_file = VENV / ".greenserve-stamp"
    stamp = greenserve_install_stamp()
    if venv_has(python, ["greenserve"]) and stamp_file.exists() and stamp_file.read_text() == stamp:
        return True
    log("installing greenserve (editable) into the venv")
    if pip_install(python, ["-e", str(REPO)]):
        stamp_file.write_text(stamp)
        return True
    log(
        "  pip install -e failed (see benchmarks/build/pip.log); "
        "greenserve servers will use PYTHONPATH"
    )
    return False


def ensure_venv() -> tuple[Path, bool]:
    """Returns (python, whether greenserve servers need PYTHONPATH)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {VENV.relative_to(REPO)}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not venv_has(python, PEER_PACKAGES):
        log(f"installing {' '.join(PEER_PACKAGES)} into the venv")
        if not pip_install(python, PEER_PACKAGES):
            sys.exit("pip install failed: see benchmarks/build/pip.log")
    return python, not ensure_greenserve(python)


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


# --------------------------------------------------------------------------- processes


class StartFailed(Exception):
    pass


def pinned(cpu: str, cmd: list[str], settings: Settings) -> list[str]:
    return ["taskset", "-c", cpu, *cmd] if settings.pin else cmd


def raise_nofile() -> None:
    """preexec_fn: 5,000 idle connections need more than the usual 1,024 descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def last_line(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else "no output"


def read_listening_port(proc: subprocess.Popen[str], deadline: float) -> int:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            line = proc.stdout.readline()
            if not line:
                raise StartFailed(f"exited with code {proc.wait()}")
            parts = line.split()
            if len(parts) == 2 and parts[0] == "LISTENING" and parts[1].isdigit():
                return int(parts[1])
        raise StartFailed(f"no LISTENING line within {SERVER_START_TIMEOUT:.0f} s")
    finally:
        sel.close()


def start_server(server: Server, settings: Settings) -> tuple[subprocess.Popen[str], int]:
    """Starts a server on a free port (port 0, reported back on its LISTENING line)."""
    log_path = LOGS / f"{server.key}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if server.needs_greenserve and settings.greenserve_pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = pinned(
        SERVER_CPU,
        [str(settings.python), str(SERVERS_DIR / server.script), "--port", "0", *server.args],
        settings,
    )
    with open(log_path, "ab") as errlog:
        offset = errlog.tell()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errlog,
            text=True,
            env=env,
            cwd=SERVERS_DIR,
            start_new_session=True,
            preexec_fn=raise_nofile,
        )
    try:
        return proc, read_listening_port(proc, time.monotonic() + SERVER_START_TIMEOUT)
    except StartFailed as exc:
        stop_server(proc)
        raise StartFailed(f"{exc}: {last_line(log_path, offset)}") from None


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL, to the server's own session (it is the group leader)."""
    for sig, wait in ((signal.SIGTERM, SERVER_STOP_GRACE), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    if proc.stdout:
        proc.stdout.close()


def loadgen_cmd(mode: str, port: int, args: list[str], settings: Settings) -> list[str]:
    return pinned(LOADGEN_CPU, [str(LOADGEN), mode, "--port", str(port), *args], settings)


def parse_json_line(stdout: str) -> Result:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line")


def run_loadgen(
    mode: str, port: int, args: list[str], settings: Settings, timeout: float
) -> Result:
    proc = subprocess.run(
        loadgen_cmd(mode, port, args, settings), capture_output=True, text=True, timeout=timeout
    )
    try:
        result = parse_json_line(proc.stdout)
    except ValueError:
        msg = f"loadgen exited {proc.returncode}: {proc.stderr.strip()[-200:]}"
        raise RuntimeError(msg) from None
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exited {proc.returncode}: {json.dumps(result)}")
    return result


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------- measurements


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_traffic(scenario: Scenario, port: int, settings: Settings,
                    server_pid: int) -> tuple[Result, int]:
    cpu_before = cpu_seconds(server_pid)
    args = [
        *scenario.loadgen_args,
        "--duration",
        str(settings.duration),
        "--warmup",
        str(settings.warmup),
    ]
    result = run_loadgen(
        scenario.mode, port, args, settings, settings.duration + settings.warmup + LOADGEN_SLACK
    )
    total = result.get("connections_total")
    if total:
        cpu = cpu_seconds(server_pid) - cpu_before
        result["cpu_us_per_conn"] = cpu * 1e6 / total
    return result, int(result.get("errors", 0))


def hold_idle(port: int, conns: int, settings: Settings, server_pid: int) -> tuple[int, int]:
    """Opens `conns` idle connections; returns (RSS while held in KiB, established)."""
    args = ["--conns", str(conns), "--hold", "300", "--duration", "120"]
    proc = subprocess.Popen(
        loadgen_cmd("idle", port, args, settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        ready = proc.stdout.readline().split()  # loadgen's own --duration bounds this
        if len(ready) != 3 or ready[0] != "READY":
            raise RuntimeError(f"idle loadgen did not get ready: {proc.stderr.read()[-200:]}")
        time.sleep(SETTLE_SECONDS)
        rss = vm_rss_kib(server_pid)
        proc.stdin.close()  # loadgen closes its connections and exits
        proc.wait(timeout=LOADGEN_SLACK)
        return rss, int(ready[1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def measure_idle(port: int, settings: Settings, server_pid: int) -> tuple[Result, int]:
    """KiB of server RSS per idle connection: (RSS with N held - RSS before) / N.

    A short round of WARMUP_IDLE_CONNS connections first lets the server touch its lazily
    initialised code paths, so "before" is a warmed-up server.
    """
    _, warm = hold_idle(port, WARMUP_IDLE_CONNS, settings, server_pid)
    if warm < WARMUP_IDLE_CONNS:  # do not spend minutes timing out 5,000 connections
        raise RuntimeError(f"only {warm} of {WARMUP_IDLE_CONNS} warm-up connections echoed")
    time.sleep(SETTLE_SECONDS)
    before = vm_rss_kib(server_pid)
    after, established = hold_idle(port, settings.idle_conns, settings, server_pid)
    if established == 0:
        raise RuntimeError("no idle connection was established")
    value = {
        "kib_per_conn": (after - before) / established,
        "rss_before_kib": before,
        "rss_after_kib": after,
    }
    return value, settings.idle_conns - established


def measure_burst(port: int, settings: Settings, server_pid: int) -> tuple[Result, int]:
    """Server RSS before, at the peak of and after a burst of idle connections (MiB).

    Whatever the server keeps per connection should go once they are gone: "after" is
    read BURST_IDLE seconds after the last round closed. Warmed up as in measure_idle.
    """
    hold_idle(port, WARMUP_IDLE_CONNS, settings, server_pid)
    time.sleep(SETTLE_SECONDS)
    before = vm_rss_kib(server_pid)
    peak, missing = before, 0
    for _ in range(BURST_CONNS // BURST_ROUND):
        rss, established = hold_idle(port, BURST_ROUND, settings, server_pid)
        peak, missing = max(peak, rss), missing + BURST_ROUND - established
    time.sleep(BURST_IDLE)
    after = vm_rss_kib(server_pid)
    value = {
        "peak_mib": peak / 1024,
        "retained_mib": (after - before) / 1024,
        "rss_before_kib": before,
        "rss_after_kib": after,
    }
    return value, missing


def measure_once(scenario: Scenario, server: Server, settings: Settings) -> tuple[Result, int]:
    proc, port = start_server(server, settings)
    try:
        if scenario.mode == "idle":
            result = measure_idle(port, settings, proc.pid)
        elif scenario.mode == "burst":
            result = measure_burst(port, settings, proc.pid)
        else:
            result = measure_traffic(scenario, port, settings, proc.pid)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} during the run")
        return result
    finally:
        stop_server(proc)


def run_scenario(
    scenario: Scenario, servers: list[Server], settings: Settings, unavailable: dict[str, str]
) -> dict[str, Outcome]:
    """Interleaves servers: each repetition runs every server once, in rotated order."""
    outcomes = {s.key: Outcome() for s in servers}
    for rep in range(settings.reps):
        shift = rep % len(servers)
        for server in servers[shift:] + servers[:shift]:
            if server.key in unavailable:
                continue
            outcome = outcomes[server.key]
            if len(outcome.failures) >= MAX_FAILURES:
                outcome.skipped = f"skipped after {MAX_FAILURES} failures"
                continue
            if time.monotonic() > settings.deadline:
                outcome.skipped = "skipped: over the time budget (--budget-minutes)"
                continue
            log(f"[{scenario.id}] rep {rep + 1}/{settings.reps} {server.key}")
            try:
                values, errors = measure_once(scenario, server, settings)
            except StartFailed as exc:
                unavailable[server.key] = str(exc)
                log(f"    n/a: {exc}")
                continue
            except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
                outcome.failures.append(str(exc))
                log(f"    failed: {exc}")
                continue
            outcome.values.append(values)
            outcome.errors += errors
            log(
                "    "
                + ", ".join(f"{m.key}={values[m.key]:.{m.decimals}f}" for m in scenario.metrics)
                + (f" ({errors} errors)" if errors else "")
            )
    return outcomes


# --------------------------------------------------------------------------- report


def fmt(value: float, decimals: int) -> str:
    return f"{value:,.{decimals}f}"


def metric_cells(metric: Metric, outcome: Outcome, baseline: Outcome | None) -> list[str]:
    values = [v[metric.key] for v in outcome.values]
    if not values:
        return ["–", "–", "–"]
    med = statistics.median(values)
    spread = f"{fmt(min(values), metric.decimals)}–{fmt(max(values), metric.decimals)}"
    base = [v[metric.key] for v in baseline.values] if baseline else []
    base_med = statistics.median(base) if base else 0
    ratio = f"{med / base_med:.2f}×" if base_med else "–"
    return [fmt(med, metric.decimals), spread, ratio]


def notes(outcome: Outcome, unavailable: str | None) -> str:
    parts = []
    if unavailable:
        parts.append(f"n/a: {unavailable}")
    if outcome.failures:
        parts.append(f"{len(outcome.failures)} run(s) failed: {outcome.failures[-1]}")
    if outcome.errors:
        parts.append(f"{outcome.errors} loadgen errors")
    if outcome.skipped:
        parts.append(outcome.skipped)
    text = "; ".join(parts).replace("|", "/").replace("\n", " ")
    return text[:160] + ("…" if len(text) > 160 else "")


def scenario_table(
    scenario: Scenario,
    servers: list[Server],
    outcomes: dict[str, Outcome],
    unavailable: dict[str, str],
) -> str:
    header = ["server"]
    for m in scenario.metrics:
        better = "higher" if m.higher_is_better else "lower"
        header += [f"{m.label} (median, {better} is better)", "min–max", "vs gevent"]
    header.append("notes")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 2) + "---|"]
    baseline = outcomes.get(BASELINE)
    for server in servers:
        outcome = outcomes[server.key]
        if not outcome.values and server.key in unavailable:
            cells = ["n/a"] + ["–"] * (3 * len(scenario.metrics) - 1)
        else:
            cells = [c for m in scenario.metrics for c in metric_cells(m, outcome, baseline)]
        rows.append(
            "| "
            + " | ".join([server.label, *cells, notes(outcome, unavailable.get(server.key))])
            + " |"
        )
    return f"### ({scenario.id}) {scenario.title}\n\n" + "\n".join(rows) + "\n"


def package_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run(
        [str(python), "-c", code, *REPORTED_PACKAGES], capture_output=True, text=True
    )
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def python_version(python: Path) -> str:
    proc = subprocess.run(
        [str(python), "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def report_header(settings: Settings, quick: bool, started: float, load_before: str) -> str:
    versions = package_versions(settings.python)
    if settings.greenserve_pythonpath:
        versions["greenserve"] += " (pip install -e failed; imported from the source tree)"
    pinning = (
        f"server on CPU {SERVER_CPU}, loadgen on CPU {LOADGEN_CPU} (taskset)"
        if settings.pin
        else "not pinned (taskset missing or fewer than 2 CPUs)"
    )
    lines = [
        "# greenserve benchmark results" + (" (quick smoke run)" if quick else ""),
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: nproc {os.cpu_count()}, {cpu_model()}, Linux {platform.release()}",
        f"- python: {python_version(settings.python)}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- load average (1/5/15 min) before: {load_before}, after: {load_average()} "
        "(other processes on the machine skew results; compare ratios within one run)",
        f"- commit: {git_commit()}",
        f"- run: {settings.reps} repetition(s), {settings.duration:g} s measured after "
        f"{settings.warmup:g} s warm-up; idle scenario at {settings.idle_conns:,} connections; "
        f"{pinning}; total {time.monotonic() - started:.0f} s",
        "- command: `" + " ".join(["python benchmarks/run.py", *sys.argv[1:]]) + "`",
        "",
        "Each cell is the median over the repetitions; min–max is the range; `vs gevent` is "
        "the median divided by gevent StreamServer's median in the same run (for latency and "
        "memory, below 1 is better). See benchmarks/README.md.",
        "",
    ]
    return "\n".join(lines)


def git_commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
    ).stdout.strip()
    return proc.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


# --------------------------------------------------------------------------- main


def selection(only: list[str]) -> tuple[list[Scenario], dict[str, list[Server]]]:
    """--only NAME matches scenario ids (a-g) and server keys (substring)."""
    tokens = [t for item in only for t in item.split(",") if t]
    scenario_ids = {s.id for s in SCENARIOS}
    wanted_ids = [t for t in tokens if t in scenario_ids]
    server_tokens = [t for t in tokens if t not in scenario_ids]
    unknown = [t for t in server_tokens if not any(t in s.key for s in SERVERS)]
    if unknown:
        sys.exit(
            f"--only: {', '.join(unknown)} matches no scenario (a-g) and no server "
            f"({', '.join(SERVER_BY_KEY)})"
        )
    scenarios = [s for s in SCENARIOS if not wanted_ids or s.id in wanted_ids]
    plan = {}
    for scenario in scenarios:
        chosen = [
            k for k in scenario.servers if not server_tokens or any(t in k for t in server_tokens)
        ]
        if not chosen:
            continue
        if BASELINE not in chosen:  # every table carries its own gevent baseline
            chosen.insert(0, BASELINE)
        plan[scenario.id] = [SERVER_BY_KEY[k] for k in chosen]
    return [s for s in scenarios if s.id in plan], plan


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repetition, 1 s per measurement, 1,000 idle connections",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="scenario id (a-g) or server name substring; repeatable or comma-separated",
    )
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 3)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run (default 1)")
    p.add_argument("--idle-conns", type=int, help="connections in scenario e (default 5000)")
    p.add_argument(
        "--python",
        type=Path,
        help="use this interpreter (with the packages installed) instead of the venv",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=BUDGET_MINUTES,
        help="start no new measurement after this many minutes (default %(default)g)",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="report file (default benchmarks/results.md; --quick: "
        "benchmarks/build/results-quick.md)",
    )
    return p.parse_args()


def make_settings(args: argparse.Namespace, started: float) -> Settings:
    quick = args.quick
    if args.python:
        python, pythonpath = args.python, True
    else:
        python, pythonpath = ensure_venv()
    default_output = BUILD / "results-quick.md" if quick else BENCH / "results.md"
    settings = Settings(
        reps=args.reps or (1 if quick else 3),
        duration=args.duration or (1.0 if quick else 3.0),
        warmup=args.warmup if args.warmup is not None else (0.3 if quick else 1.0),
        idle_conns=args.idle_conns or (1000 if quick else 5000),
        pin=not args.no_pin and can_pin(),
        python=python,
        greenserve_pythonpath=pythonpath,
        output=args.output or default_output,
        deadline=started + args.budget_minutes * 60,
    )
    if settings.reps < 1 or settings.duration <= 0 or not 1 <= settings.idle_conns <= 15000:
        sys.exit("--reps must be >= 1, --duration > 0, --idle-conns in [1, 15000]")
    return settings


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    load_before = load_average()
    scenarios, plan = selection(args.only)
    build_loadgen()
    settings = make_settings(args, started)
    LOGS.mkdir(parents=True, exist_ok=True)
    for server in {s.key: s for servers in plan.values() for s in servers}.values():
        (LOGS / f"{server.key}.log").write_bytes(b"")
    unavailable: dict[str, str] = {}
    tables = []
    for scenario in scenarios:
        outcomes = run_scenario(scenario, plan[scenario.id], settings, unavailable)
        tables.append(scenario_table(scenario, plan[scenario.id], outcomes, unavailable))
        print("\n" + tables[-1], flush=True)
    report = report_header(settings, args.quick, started, load_before) + "\n" + "\n".join(tables)
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    settings.output.write_text(report)
    log(f"wrote {settings.output} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
