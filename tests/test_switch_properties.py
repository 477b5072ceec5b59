"""Property tests of greenserve.Switch: random programs of nested switches.

Each example is a generated program: a tree of switch bodies and fibers that fork
(``fork``, ``fork_daemon``, ``fork_promise``, ``start``), register release hooks, attach
resources, sleep briefly, block until cancelled, read promises, kill a fiber, raise,
cancel, fail or ``check()`` an enclosing switch, with parts of it under a
``gevent.Timeout``. The program runs in its own greenlet; then the invariants of
docs/switch.md are checked:

- every fiber is dead, every switch finished;
- every attached resource was closed once, every release hook ran once (a removed one
  never);
- every failure is reported exactly once: raised out of the outermost ``with`` (alone
  or in a ``BaseExceptionGroup``) or held by the promise of the fiber that raised it;
  nothing else escapes but timeouts, and never a ``Cancelled``;
- no cancellation is lost: a wait inside a switch that is cancelled ends (checked when
  the program has run for a while, before the outermost switch is cancelled to end it),
  and once the outermost switch is cancelled the program ends.

The programs sleep a few milliseconds as part of what they do; the test itself only
waits on the program's greenlet and on events, each wait bounded, so a program that
blocks for good fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import gevent
import pytest
from gevent import GreenletExit
from gevent.event import AsyncResult, Event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenserve import Cancelled, Switch

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Boom(Exception):
    """A failure raised by a program; each one is a distinct object."""


# -- the programs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Wait:
    """Block until cancelled (or until ``timeout``, a ``gevent.Timeout(t, False)``);
    then a cleanup that blocks for ``cleanup`` seconds (0: none)."""

    timeout: float | None
    cleanup: float


@dataclass(frozen=True)
class Raise:
    pass


@dataclass(frozen=True)
class Cancel:
    depth: int  # 0: the innermost enclosing switch, 1: the one around it, ...


@dataclass(frozen=True)
class Fail:
    depth: int


@dataclass(frozen=True)
class Check:
    depth: int


@dataclass(frozen=True)
class Hook:
    kind: str  # "quick", "sleep" (blocks a few ms), "raise"
    remove: bool


@dataclass(frozen=True)
class Attach:
    pass


@dataclass(frozen=True)
class Get:
    """Read the promise forked last by this piece of the program (if any)."""


@dataclass(frozen=True)
class Kill:
    """``kill(block=False)`` the fiber forked last by this piece of the program (if any)."""


@dataclass(frozen=True)
class Fork:
    kind: str  # "fork", "daemon", "promise", "start"
    program: tuple[Action, ...]
    started_at: int  # for "start": task_status.started() before this action


@dataclass(frozen=True)
class Nested:
    """``with Switch()`` around ``program``, under ``gevent.Timeout(timeout, False)``."""

    timeout: float | None
    program: tuple[Action, ...]


@dataclass(frozen=True)
class Timed:
    """``program`` under ``gevent.Timeout(timeout, False)``, no switch of its own."""

    timeout: float
    program: tuple[Action, ...]


Action = Union[Sleep, Wait, Raise, Cancel, Fail, Check, Hook, Attach, Get, Kill, Fork,
               Nested, Timed]

MAX_DEPTH = 3
millis = st.sampled_from([0.001, 0.002, 0.003, 0.005])


def leaves(forks: bool) -> st.SearchStrategy[Action]:
    depth = st.integers(0, MAX_DEPTH)
    options: list[st.SearchStrategy[Action]] = [
        st.builds(Sleep, millis),
        st.builds(Wait, st.none() | millis, st.sampled_from([0.0, 0.0, 0.002])),
        st.builds(Raise),
        st.builds(Cancel, depth),
        st.builds(Fail, depth),
        st.builds(Check, depth),
        st.builds(Hook, st.sampled_from(["quick", "sleep", "sleep", "raise"]),
                  st.booleans()),
        st.builds(Attach),
    ]
    if forks:
        options += [st.builds(Get), st.builds(Kill)]
    return st.one_of(options)


def programs(levels: int, forks: bool = True) -> st.SearchStrategy[tuple[Action, ...]]:
    """Programs nesting at most ``levels`` switches or fibers. A daemon's own program
    forks nothing into its switch (a fork made while the switch cancels its daemons is
    the documented "forking late" caveat, not something the switch guarantees)."""
    actions: st.SearchStrategy[Action] = leaves(forks)
    if levels > 0:
        inner = programs(levels - 1)
        compound: list[st.SearchStrategy[Action]] = [
            st.builds(Nested, st.none() | millis, inner),
            st.builds(Timed, millis, programs(levels - 1, forks)),
        ]
        if forks:
            compound.append(st.builds(
                Fork, st.sampled_from(["fork", "fork", "daemon", "promise", "start"]),
                inner, st.integers(0, 4)))
            compound.append(st.builds(Fork, st.just("daemon"), programs(levels - 1, False),
                                      st.just(0)))
        actions = st.one_of(actions, *compound)
    return st.lists(actions, max_size=4).map(tuple)


def shielded_programs() -> st.SearchStrategy[tuple[Action, ...]]:
    """Programs aimed at the wait at exit: a fiber ends the switch after a few ms (it
    raises, or cancels or fails it), while the body waits for a nested switch whose
    exit is slow (release hooks that block, a fiber whose cleanup blocks), maybe under
    a ``gevent.Timeout`` that fires during that wait; then the body blocks. Placed in
    the outermost switch's body, in a nested switch's body, or in a fiber."""
    ender = st.builds(
        Fork, st.just("fork"),
        st.tuples(st.builds(Sleep, millis), st.sampled_from([Raise(), Cancel(0), Fail(0)])),
        st.just(0))
    slow_exit = st.lists(st.sampled_from([
        Hook("sleep", False), Hook("raise", False), Hook("quick", False),
        Fork("fork", (Wait(None, 0.005),), 0), Fork("promise", (Wait(None, 0.005),), 0),
    ]), min_size=1, max_size=3).map(tuple)
    nested = st.builds(Nested, st.none() | millis, slow_exit)
    core = st.tuples(ender, nested, st.builds(Wait, st.none(), st.just(0.0)))
    return st.one_of(
        core,
        core.map(lambda p: (Nested(None, p),)),
        core.map(lambda p: (Fork("fork", p, 0),)),
        core.map(lambda p: (Nested(None, (Nested(0.002, p), Wait(None, 0.0))),)),
    )


# -- running a program ------------------------------------------------------------------


@dataclass(eq=False)
class Resource:
    closed: int = 0

    def close(self) -> None:
        self.closed += 1


@dataclass(eq=False)
class HookRun:
    kind: str
    record: Record
    removed: bool = False
    runs: int = 0

    def __call__(self) -> None:
        self.runs += 1
        if self.kind == "sleep":
            gevent.sleep(0.005)
        elif self.kind == "raise":
            raise self.record.boom()


@dataclass(eq=False)
class Waiting:
    """A ``Wait`` in progress and the switches it runs within."""

    stack: tuple[Switch, ...]
    ended: Event = field(default_factory=Event)


@dataclass(eq=False)
class Forked:
    """What one piece of a program forked (for ``Get`` and ``Kill``)."""

    greenlets: list[Any] = field(default_factory=list)
    promises: list[AsyncResult] = field(default_factory=list)


@dataclass(eq=False)
class Record:
    """What a program did, to check against what the switches report."""

    raised: list[Boom] = field(default_factory=list)
    resources: list[Resource] = field(default_factory=list)
    hooks: list[HookRun] = field(default_factory=list)
    greenlets: list[Any] = field(default_factory=list)
    promises: list[AsyncResult] = field(default_factory=list)
    switches: list[Switch] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)

    def boom(self) -> Boom:
        exc = Boom(f"boom {len(self.raised)}")
        self.raised.append(exc)
        return exc


class Runner:
    def __init__(self, record: Record) -> None:
        self.record = record

    def run(self, program: tuple[Action, ...], stack: tuple[Switch, ...],
            status: Any = None, started_at: int = 0) -> None:
        forked = Forked()
        for i, action in enumerate(program):
            if status is not None and i == started_at:
                status.started()
            self.step(action, stack, forked)
        if status is not None and started_at >= len(program):
            status.started()

    def step(self, action: Action, stack: tuple[Switch, ...], forked: Forked) -> None:
        sw = stack[-1]
        target = stack[max(0, len(stack) - 1 - getattr(action, "depth", 0))]
        if isinstance(action, Sleep):
            gevent.sleep(action.seconds)
        elif isinstance(action, Wait):
            self.wait(action, stack)
        elif isinstance(action, Raise):
            raise self.record.boom()
        elif isinstance(action, Cancel):
            target.cancel()
        elif isinstance(action, Fail):
            target.fail(self.record.boom())
        elif isinstance(action, Check):
            target.check()
        elif isinstance(action, Hook):
            self.hook(action, sw)
        elif isinstance(action, Attach):
            self.record.resources.append(sw.attach(Resource()))
        elif isinstance(action, Get):
            self.get(forked.promises)
        elif isinstance(action, Kill):
            if forked.greenlets:
                forked.greenlets[-1].kill(block=False)
        elif isinstance(action, Fork):
            self.fork(action, stack, forked)
        elif isinstance(action, Timed):
            with timeout(action.timeout):
                self.run(action.program, stack)
        else:
            self.nested(action, stack)

    def wait(self, action: Wait, stack: tuple[Switch, ...]) -> None:
        waiting = Waiting(stack)
        self.record.waiting.append(waiting)
        try:
            with timeout(action.timeout):
                Event().wait()
        finally:
            waiting.ended.set()
            if action.cleanup:
                gevent.sleep(action.cleanup)

    def hook(self, action: Hook, sw: Switch) -> None:
        run = HookRun(action.kind, self.record)
        self.record.hooks.append(run)
        handle = sw.on_release(run)
        if action.remove:
            handle.remove()
            run.removed = True

    def get(self, promises: list[AsyncResult]) -> None:
        if not promises:
            return
        promise = promises[-1]
        try:
            promise.get()
        except BaseException as exc:
            # What the promise holds was reported by it (checked at the end); only a
            # cancellation goes on, as it would in real code.
            if isinstance(exc, GreenletExit) or exc is not promise.exception:
                raise

    def fork(self, action: Fork, stack: tuple[Switch, ...], forked: Forked) -> None:
        sw = stack[-1]

        def fiber(task_status: Any = None) -> None:
            self.record.greenlets.append(gevent.getcurrent())
            self.run(action.program, stack, task_status, action.started_at)

        if action.kind in ("fork", "daemon"):
            g = sw.fork(fiber) if action.kind == "fork" else sw.fork_daemon(fiber)
            forked.greenlets.append(g)
            self.record.greenlets.append(g)
        elif action.kind == "promise":
            promise = sw.fork_promise(fiber)
            forked.promises.append(promise)
            self.record.promises.append(promise)
        else:
            sw.start(fiber)

    def nested(self, action: Nested, stack: tuple[Switch, ...]) -> None:
        inner = Switch(name=f"nested-{len(self.record.switches)}")
        self.record.switches.append(inner)
        with timeout(action.timeout), inner:
            self.run(action.program, (*stack, inner))


@contextlib.contextmanager
def timeout(seconds: float | None) -> Iterator[None]:
    if seconds is None:
        yield
    else:
        with gevent.Timeout(seconds, False):
            yield


# -- the invariants ---------------------------------------------------------------------


def leaves_of(exc: BaseException | None) -> list[BaseException]:
    if exc is None:
        return []
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves_of(sub)]
    return [exc]


def lost_cancellations(record: Record) -> list[str]:
    """Waits inside a cancelled switch that do not end: each must, promptly (the
    cancellation is delivered from hub callbacks; a switch on the way may first wait
    a few ms for its release hooks). Waited for on events, up to a bound."""
    suspects = [w for w in record.waiting
                if not w.ended.is_set() and any(sw.cancelled for sw in w.stack)]
    for w in suspects:
        w.ended.wait(timeout=2)
    return [f"a wait within {[repr(sw) for sw in w.stack]} was never cancelled"
            for w in suspects if not w.ended.is_set()]


def check_reports(record: Record, outcome: BaseException | None) -> None:
    escaped = leaves_of(outcome)
    held = [leaf for p in record.promises if p.ready() and p.exception is not None
            for leaf in leaves_of(p.exception)]
    for boom in record.raised:
        count = sum(e is boom for e in escaped) + sum(e is boom for e in held)
        assert count == 1, f"{boom!r} reported {count} times; escaped: {outcome!r}"
    for exc in escaped:
        assert isinstance(exc, (Boom, gevent.Timeout)), f"escaped: {exc!r} in {outcome!r}"
        assert not isinstance(exc, Cancelled)
    if outcome is not None and not isinstance(outcome, BaseExceptionGroup):
        assert isinstance(outcome, Boom), f"a lone {outcome!r} escaped"
    for exc in held:
        assert isinstance(exc, (Boom, Cancelled, gevent.Timeout)), f"promise held {exc!r}"


def check_cleanup(record: Record) -> None:
    for g in record.greenlets:
        assert g.dead, f"fiber still running: {g!r}"
    for sw in record.switches:
        assert sw.finished, f"{sw!r} did not finish"
    for res in record.resources:
        assert res.closed == 1, f"a resource was closed {res.closed} times"
    for run in record.hooks:
        expected = 0 if run.removed else 1
        assert run.runs == expected, f"a {run.kind} hook ran {run.runs} times"


def execute(program: tuple[Action, ...]) -> None:
    record = Record()
    root = Switch(name="root")
    record.switches.append(root)
    outcome: list[BaseException] = []

    def main() -> None:
        try:
            with root:
                Runner(record).run(program, (root,))
        except BaseException as exc:
            outcome.append(exc)

    runner = gevent.spawn(main)
    try:
        runner.join(timeout=0.03)  # most programs are done by now
        lost: list[str] = []
        if not runner.dead:
            lost = lost_cancellations(record)
            if not lost:
                root.cancel()  # ends every wait: the program must end too
                runner.join(timeout=5)
        assert not lost, lost
        assert runner.dead, "the program blocked after the outermost switch was cancelled"
        check_cleanup(record)
        check_reports(record, outcome[0] if outcome else None)
    finally:
        gevent.killall([runner, *(g for g in record.greenlets if not g.dead)])


# Deterministic (the same examples on every run), and bounded: a few seconds each.
EXAMPLES = settings(deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(EXAMPLES, max_examples=250)
@given(programs(MAX_DEPTH))
def test_switch_programs_keep_the_invariants(program: tuple[Action, ...]) -> None:
    execute(program)


@settings(EXAMPLES, max_examples=100)
@given(shielded_programs())
def test_exceptions_thrown_into_the_wait_at_exit_are_kept(program: tuple[Action, ...]) -> None:
    execute(program)


# Programs the random search must keep covering (each found a bug once).
REGRESSIONS: list[tuple[Action, ...]] = [
    # issue 13, bug 4: the outer switch fails while the body waits, under a Timeout,
    # for an inner switch's slow release hook; the body then blocks.
    (Fork("fork", (Sleep(0.003), Raise()), 0),
     Nested(0.001, (Hook("sleep", False),)),
     Wait(None, 0.0)),
    # issue 13, bug 5: check() of a cancelled switch.
    (Nested(None, (Cancel(0), Check(0))), Wait(0.002, 0.0)),
]


@pytest.mark.parametrize("program", REGRESSIONS)
def test_switch_regression_programs(program: tuple[Action, ...]) -> None:
    execute(program)
