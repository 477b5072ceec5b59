"""The contract: every face x every transport it offers x the behaviours users rely on.

One test function per behaviour, parametrized over ``face-transport`` (and the stop
mode, where a behaviour is about stopping). The faces and transports are in
``faces.py``, the handler contract in ``handlers.py``. Every test also checks that a
new client is served and that its handler sees the right peer (for PROXY transports:
the header's source), with ``check_served``.

1. 8 MiB in 64 KiB writes to a client that starts reading after 0.5 s:
   ``test_large_writes_to_a_slow_reader``
2. a peer stuck before its TLS handshake / PROXY header while the server stops:
   ``test_stop_while_a_peer_stalls_in_the_preamble``
3. unix peers with odd names (non-UTF-8, 108-byte abstract, unnamed):
   ``test_odd_unix_peer``
4. a peer that resets right after connecting: ``test_reset_right_after_connect``
5. ``max_connections=3`` against 12 clients: ``test_connection_limit_is_never_exceeded``
6. every stop path with a client connected: ``test_stop_with_a_client_connected``

In-process faces run under the autouse leak check (no fd, no greenlet left); their
handler errors (what the face passed to our ``on_error``/``on_handler_error``) must be
none, and nothing may reach the hub's error printer (a traceback on stderr). Subprocess
faces (gunicorn's ``TCPWorker``, the command) must exit with status 0, in time, without
a traceback in their log. Which transports each behaviour covers is in ``IN_PROCESS``
and ``SUBPROCESS`` below: every face meets every transport it offers in some behaviour,
and the whole suite stays under a minute on two cores.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.queue
import pytest
from gevent.event import Event

from .faces import (
    ABORT_WAIT,
    FACES,
    Client,
    Running,
    check_served,
    serving,
    wait_until,
)
from .handlers import big_digest

# How long a stop may take beyond its grace period: an in-process stop is immediate (a
# few loop iterations); a process also has to exit.
STOP_SLACK = 2.0
STOP_SLACK_SUBPROCESS = 5.0

# Which transports each behaviour runs on, for the faces in this process and for the
# subprocess faces (``None``: every transport the face offers). Transports that reach
# the handler by the same path are not all repeated where a test is slow: after its
# header, a PROXY connection is a plain TCP one (v1 and v2 differ in the header only,
# which every test's ``check_served`` parses), and ``tlsfiles`` differs from ``tls`` in
# how StreamServer builds its context only. Subprocess faces cost a process start
# (gunicorn: about 0.7 s), so they run a smaller set.
IN_PROCESS: dict[str, tuple[str, ...] | None] = {
    "big": ("tcp4", "tcp6", "unix", "tls"),
    "stall": ("tls", "proxy1"),
    "odd_unix": ("unix",),
    "reset": None,
    "limit": ("tcp4", "tcp6", "unix", "tls", "proxy2"),
    "stop": ("tcp4", "unix", "tls"),
}
SUBPROCESS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "big": {"gunicorn": ("tls",), "cli": ("tcp4", "tls")},
    "stall": {"gunicorn": ("tls",), "cli": ("tls",)},
    "odd_unix": {"gunicorn": ("unix",), "cli": ("unix",)},
    "reset": {"gunicorn": ("tcp4", "tls"), "cli": ("tcp4", "tls", "proxy1", "proxy2")},
    "limit": {"gunicorn": ("tcp6",), "cli": ("tcp6", "unix", "tls")},
    "stop": {"gunicorn": ("tls",), "cli": ("tcp4",)},
}
# The odd unix peers a subprocess face meets (each kind is one more process start).
SUBPROCESS_ODD_KINDS = {"gunicorn": ("abstract108",), "cli": ("nonutf8", "abstract108",
                                                             "unnamed")}


def cases(behaviour: str, *, modes: bool = False) -> list[Any]:
    """``pytest.param``s of (face, transport[, mode]) for ``behaviour``."""
    params = []
    for face in FACES.values():
        subset = (SUBPROCESS[behaviour][face.name] if face.subprocess
                  else IN_PROCESS[behaviour])
        offered = face.transports if subset is None else tuple(
            t for t in face.transports if t in subset)
        marks = [pytest.mark.no_leak_check] if face.subprocess else []
        for t in offered:
            for mode in (face.stop_modes if modes else (None,)):
                values = (face.name, t) if mode is None else (face.name, t, mode)
                params.append(pytest.param(*values, id="-".join(filter(None, values)),
                                           marks=marks))
    return params


# -- what every test checks -----------------------------------------------------------------


class _Keep(logging.Handler):
    """Keeps each record as text at once: a record's arguments (an exception, its
    traceback, the frames and sockets those hold) must not outlive the log call, or the
    leak check would blame the library for what the test's log capture keeps alive."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.levelname} {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        self.lines.append((record.levelno, text))


@pytest.fixture
def observe(capfd: pytest.CaptureFixture[str]) -> Iterator[Observed]:
    logger = logging.getLogger("greenserve")
    keep = _Keep()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # pytest's own capture would keep the records (see _Keep)
    try:
        yield Observed(keep, capfd)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
        logger.propagate = propagate


class Observed:
    """What the ``greenserve`` logger logged (as text) and what reached stderr (the hub
    prints the errors of greenlets there)."""

    def __init__(self, keep: _Keep, capfd: pytest.CaptureFixture[str]) -> None:
        self.keep, self.capfd = keep, capfd

    def mark(self) -> int:
        return len(self.keep.lines)

    def records(self, min_level: int = logging.DEBUG, start: int = 0,
                end: int | None = None) -> list[str]:
        return [text for level, text in self.keep.lines[start:end] if level >= min_level]

    def stderr(self) -> str:
        err = self.capfd.readouterr().err
        if err:
            print(err, end="", file=sys.stderr)  # let the report show it too
        return err


def assert_clean(r: Running, observe: Observed) -> None:
    """After a run where nothing should have gone wrong: no handler error reported, no
    handler ended by an exception, no ERROR in the ``greenserve`` logger, no traceback
    on stderr (in-process); no traceback, WARNING or ERROR in the log (subprocess)."""
    if r.face.subprocess:
        bad = [line for line in r.log_text().splitlines()
               if "Traceback" in line or re.search(r"\b(ERROR|CRITICAL)\b", line)]
        assert not bad, f"{r}: problems in the log:\n{r.log_text()}"
        return
    assert r.errors == [], f"{r}: handler errors reported: {r.errors!r}"
    assert r.probe is not None and r.probe.ended_with == [], r.probe
    errors = observe.records(logging.ERROR)
    assert not errors, f"{r}: errors logged:\n" + "\n".join(errors)
    err = observe.stderr()
    assert "Traceback" not in err, f"{r}: a traceback reached stderr:\n{err}"


def stop_in_time(r: Running, mode: str, *, with_grace: bool) -> float:
    """Stop ``r`` and check the stop took at most its deadline; return how long."""
    slack = STOP_SLACK_SUBPROCESS if r.face.subprocess else STOP_SLACK
    bound = (r.grace if with_grace else 0.0) + slack
    started = time.monotonic()
    r.stop(mode)
    took = time.monotonic() - started
    assert took <= bound, f"{r}: the {mode} stop took {took:.2f} s, over {bound:.2f} s"
    return took


# -- 1. large writes against a slow reader ---------------------------------------------------

BIG = 128 * 65536      # 8 MiB, in 128 writes of 64 KiB
SLOW_START = 0.5       # the client starts reading this long after its request
BIG_DEADLINE = 15.0    # for all of it to arrive once the client reads (it takes < 1 s)


@pytest.mark.timeout(40)
@pytest.mark.parametrize(("face", "transport"), cases("big"))
def test_large_writes_to_a_slow_reader(face: str, transport: str, tmp_path: Path,
                                       certs: Any, observe: Observed) -> None:
    with serving(face, transport, tmp_path, certs) as r:
        with Client(r) as c:
            c.request(b"big %d" % BIG)
            gevent.sleep(SLOW_START)  # the scenario: a reader that is late, not a sync
            digest, received = hashlib.sha256(), 0
            deadline = time.monotonic() + BIG_DEADLINE
            while True:
                c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = c.recv()
                except TimeoutError:
                    pytest.fail(f"{r}: the transfer stalled: {received} of {BIG} bytes "
                                f"after {BIG_DEADLINE} s")
                if not data:
                    break
                digest.update(data)
                received += len(data)
        assert received == BIG, f"{r}: {received} bytes arrived, not {BIG}"
        assert digest.hexdigest() == big_digest(BIG), f"{r}: the bytes arrived corrupted"
        r.wait_idle()  # the handler finished and its slot is free
        check_served(r)
        stop_in_time(r, "graceful", with_grace=False)  # nothing is running
    assert_clean(r, observe)


# -- 2. a peer stuck before its handshake while the server stops --------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("face", "transport", "mode"),
                         cases("stall", modes=True))
def test_stop_while_a_peer_stalls_in_the_preamble(face: str, transport: str, mode: str,
                                                  tmp_path: Path, certs: Any,
                                                  observe: Observed) -> None:
    with serving(face, transport, tmp_path, certs, stop_mode=mode) as r:
        with Client(r, preamble=False) as stalled:  # connects, sends nothing
            # Accepting is in order: once a later client was served, the stalled one
            # was accepted and its fiber is waiting for the ClientHello / the header.
            check_served(r, 0)
            if r.stats() is not None:
                wait_until(lambda: (r.stats() or {}).get("active") == 1, ABORT_WAIT,
                           "only the stalled connection left open")
            stop_in_time(r, mode, with_grace=mode in r.face.graceful_modes)
            stalled.closed_by_server(timeout=ABORT_WAIT)
        if r.stats() is not None:
            assert r.stats()["active"] == 0, r.stats()
    assert_clean(r, observe)


# -- 3. odd peers on unix ------------------------------------------------------------------

ODD_TIMEOUT = 2.0  # an odd client is answered at once, or not at all (the listener died)


def _odd_name(kind: str, tmp_path: Path) -> bytes | None:
    if kind == "nonutf8":
        return os.fsencode(tmp_path) + b"/c\xff"
    if kind == "abstract108":  # the whole sun_path: a NUL and 107 bytes
        return (b"\0contract-%d-%d-" % (os.getpid(), time.monotonic_ns())).ljust(108, b"x")
    return None  # an unnamed client


ODD_KINDS = ("nonutf8", "abstract108", "unnamed")


def odd_cases() -> list[Any]:
    params = []
    for p in cases("odd_unix"):
        face, transport = p.values
        for kind in SUBPROCESS_ODD_KINDS.get(face, ODD_KINDS):
            params.append(pytest.param(face, transport, kind, id=f"{face}-{transport}-{kind}",
                                       marks=p.marks))
    return params


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("face", "transport", "kind"), odd_cases())
def test_odd_unix_peer(face: str, transport: str, kind: str, tmp_path: Path, certs: Any,
                       observe: Observed) -> None:
    problems = []
    with serving(face, transport, tmp_path, certs) as r:
        with Client(r, bind=_odd_name(kind, tmp_path), timeout=ODD_TIMEOUT) as odd:
            try:
                odd.request(b"peer")
                seen = odd.read_line()
                if seen != odd.expected_peer:
                    problems.append(f"the handler saw {seen!r}, not {odd.expected_peer!r}")
            except (OSError, AssertionError) as exc:
                problems.append(f"the {kind} client was not served: {exc!r}")
        # The contract's point: whatever happened to the odd client, the next is served.
        try:
            with Client(r, timeout=ODD_TIMEOUT) as c:
                c.request(b"peer")
                assert c.read_line() == c.expected_peer
        except (OSError, AssertionError) as exc:
            problems.append(f"a normal client after the {kind} one was not served: {exc!r}")
        assert not problems, f"{r}: " + "; ".join(problems)
        r.wait_idle()
        stop_in_time(r, "graceful", with_grace=False)
    assert_clean(r, observe)


# -- 4. a reset right after connect --------------------------------------------------------

RESETS = 3


def _mark(r: Running, text: str) -> None:
    """Put ``contract-mark TEXT`` in a subprocess face's log, in order."""
    with Client(r) as c:
        c.request(b"mark " + text.encode())
        assert c.read_line() == b"marked"


def _between_marks(r: Running, first: str, second: str) -> list[str]:
    lines = r.log_text().splitlines()
    start, end = lines.index(f"contract-mark {first}"), lines.index(f"contract-mark {second}")
    return lines[start + 1:end]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("face", "transport"), cases("reset"))
def test_reset_right_after_connect(face: str, transport: str, tmp_path: Path, certs: Any,
                                   observe: Observed) -> None:
    with serving(face, transport, tmp_path, certs) as r:
        if r.face.subprocess:
            _mark(r, "resets")
        start = observe.mark()
        for _ in range(RESETS):
            Client(r, 0, preamble=False).reset()
        # Accepting is in order, and a reset is seen at the first read: once a later
        # client on the same listener was served, the reset ones were dealt with.
        check_served(r, 0)
        check_served(r)
        end = observe.mark()
        if r.face.subprocess:
            _mark(r, "served")
        r.wait_idle()
        stop_in_time(r, "graceful", with_grace=False)
    if r.face.subprocess:
        window = _between_marks(r, "resets", "served")
        assert not any("Traceback" in line for line in window), r.log_text()
        loud = [line for line in window
                if re.search(r"\b(INFO|WARNING|ERROR|CRITICAL)\b", line)]
        debug = [line for line in window if re.search(r"\bDEBUG\b", line)]
    else:
        loud = observe.records(logging.INFO, start, end)
        debug = observe.records(logging.DEBUG, start, end)
    assert not loud, (f"{r}: {RESETS} peers that reset were logged above DEBUG:\n"
                      + "\n".join(loud))
    assert len(debug) <= RESETS, (f"{r}: more than one DEBUG line per reset peer:\n"
                                  + "\n".join(debug))


# -- 5. the connection limit -----------------------------------------------------------------

LIMIT = 3
CLIENTS = 12
CLIENT_WAIT = 10.0  # a client beyond the limit waits in the backlog for its turn
MOMENT = 0.02  # how long the holders hold before one is released: room for a 4th to sneak in


@pytest.mark.timeout(40)
@pytest.mark.parametrize(("face", "transport"), cases("limit"))
def test_connection_limit_is_never_exceeded(face: str, transport: str, tmp_path: Path,
                                            certs: Any, observe: Observed) -> None:
    with serving(face, transport, tmp_path, certs, max_connections=LIMIT) as r:
        holding: gevent.queue.Queue[Event] = gevent.queue.Queue()
        counts: list[int] = []
        done: list[int] = []

        def client(i: int) -> None:
            with Client(r, i, timeout=CLIENT_WAIT) as c:
                c.request(b"hold")
                line = c.read_line()
                assert line.startswith(b"held "), line
                counts.append(int(line.split()[1]))
                release = Event()
                holding.put(release)
                release.wait()
                c.request(b"go")
                assert c.read_line() == b"bye"
                assert c.closed_by_server() == b""
                done.append(i)

        greenlets = [gevent.spawn(client, i) for i in range(CLIENTS)]
        try:
            most, served = 0, 0
            while served < CLIENTS:  # in waves: LIMIT clients hold, a moment, all go
                held: list[Event] = []
                while len(held) < min(LIMIT, CLIENTS - served):
                    try:
                        held.append(holding.get(timeout=CLIENT_WAIT))
                    except gevent.queue.Empty:
                        pytest.fail(f"{r}: only {len(held)} clients held after {served} "
                                    f"were served (counts {counts})")
                gevent.sleep(MOMENT)  # the scenario: hold a moment, a 4th may try to get in
                while not holding.empty():
                    held.append(holding.get_nowait())
                most = max(most, len(held))
                for release in held:
                    release.set()
                served += len(held)
            gevent.joinall(greenlets, timeout=CLIENT_WAIT, raise_error=True)
        finally:
            gevent.killall(greenlets, timeout=ABORT_WAIT)
        assert sorted(done) == list(range(CLIENTS)), f"{r}: served {sorted(done)}"
        assert max(counts) == LIMIT and most == LIMIT, (
            f"{r}: at most {max(counts)} handlers held at once ({most} clients held), "
            f"the limit is {LIMIT}")
        if r.probe is not None:
            assert r.probe.peak == LIMIT, r.probe
        r.wait_idle()
        if r.stats() is not None:
            assert r.stats()["peak_active"] == LIMIT, r.stats()
        check_served(r)
        stop_in_time(r, "graceful", with_grace=False)
    assert_clean(r, observe)


# -- 6. every stop path, with a client connected ----------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("face", "transport", "mode"), cases("stop", modes=True))
def test_stop_with_a_client_connected(face: str, transport: str, mode: str, tmp_path: Path,
                                      certs: Any, observe: Observed) -> None:
    with serving(face, transport, tmp_path, certs, stop_mode=mode) as r:
        with Client(r) as c:
            c.request(b"hold")
            assert c.read_line().startswith(b"held ")
            stop_in_time(r, mode, with_grace=mode in r.face.graceful_modes)
            assert c.closed_by_server(timeout=ABORT_WAIT) == b""
        if r.probe is not None:
            assert r.probe.running == 0 and r.probe.finished == r.probe.started, r.probe
        if r.stats() is not None:
            assert r.stats()["active"] == 0, r.stats()
    if not r.face.subprocess:
        # A handler cut by the stop may end by Cancelled: that is the stop, not an error.
        assert r.probe is not None
        r.probe.ended_with = [e for e in r.probe.ended_with if not e.startswith("Cancelled")]
    assert_clean(r, observe)

