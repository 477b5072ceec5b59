"""greenserve.Switch: every numbered rule of API.md section 4 and the greenlet traps."""

from __future__ import annotations

import contextvars
import sys

import gevent
import pytest
from gevent.event import AsyncResult, Event

from greenserve import Cancelled, Switch

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


class Boom(Exception):
    pass


class Closeable:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def close(self) -> None:
        self.log.append(self.name)


# -- rule 1: exit waits for fibers, then cancels daemons, then runs hooks LIFO ----------


def test_exit_waits_for_every_fiber() -> None:
    done: list[int] = []
    gate = Event()
    with Switch() as sw:
        sw.fork(lambda: (gate.wait(), done.append(1)))
        sw.fork(lambda: (gevent.sleep(0), done.append(2), gate.set()))
    assert sorted(done) == [1, 2]
    assert sw.finished


def test_fork_returns_greenlet_with_value() -> None:
    with Switch() as sw:
        g = sw.fork(lambda x, y=0: x + y, 2, y=3)
    assert isinstance(g, gevent.Greenlet)
    assert g.value == 5 and g.successful()


def test_daemons_cancelled_after_fibers_then_hooks_lifo() -> None:
    log: list[str] = []
    fiber_gate = Event()

    def daemon() -> None:
        try:
            Event().wait()
        except Cancelled:
            log.append("daemon cancelled")
            raise

    def fiber() -> None:
        fiber_gate.wait()
        log.append("fiber done")

    with Switch() as sw:
        sw.on_release(log.append, "hook 1")
        sw.attach(Closeable(log, "hook 2"))
        sw.fork_daemon(daemon)
        sw.fork(fiber)
        gevent.sleep(0)
        fiber_gate.set()
    assert log == ["fiber done", "daemon cancelled", "hook 2", "hook 1"]


def test_hooks_all_run_even_if_one_raises() -> None:
    log: list[str] = []
    err = Boom("hook")

    def bad() -> None:
        raise err

    with pytest.raises(Boom) as info, Switch() as sw:
        sw.on_release(log.append, "first registered")
        sw.on_release(bad)
        sw.on_release(log.append, "last registered")
    assert info.value is err
    assert log == ["last registered", "first registered"]


def test_hook_remove() -> None:
    log: list[str] = []
    with Switch() as sw:
        hook = sw.on_release(log.append, "x")
        hook.remove()
        hook.remove()
    assert log == []


def test_attach_returns_resource_and_requires_close() -> None:
    log: list[str] = []
    with Switch() as sw:
        r = Closeable(log, "r")
        assert sw.attach(r) is r
        with pytest.raises(TypeError, match="close"):
            sw.attach(object())  # type: ignore[type-var]
    assert log == ["r"]


# -- rule 2: a failure cancels the rest and is re-raised, the same object ----------------


def test_fiber_failure_cancels_others_and_body() -> None:
    err = Boom("fiber")
    seen: list[str] = []

    def failing() -> None:
        raise err

    def sleeper() -> None:
        try:
            Event().wait()
        except Cancelled:
            seen.append("sleeper cancelled")
            raise

    with pytest.raises(Boom) as info, Switch() as sw:
        sw.fork(sleeper)
        sw.fork(failing)
        try:
            Event().wait()
        except Cancelled:
            seen.append("body cancelled")
            raise
    assert info.value is err
    assert sorted(seen) == ["body cancelled", "sleeper cancelled"]
    assert sw.cancelled


def test_body_failure_cancels_fibers() -> None:
    err = Boom("body")
    seen: list[str] = []

    def sleeper() -> None:
        try:
            Event().wait()
        except Cancelled:
            seen.append("cancelled")
            raise

    with pytest.raises(Boom) as info, Switch() as sw:
        sw.fork(sleeper)
        gevent.sleep(0)
        raise err
    assert info.value is err and seen == ["cancelled"]


def test_failure_is_not_printed_by_the_hub(capsys: pytest.CaptureFixture[str]) -> None:
    def failing() -> None:
        raise Boom("quiet")

    with pytest.raises(Boom), Switch() as sw:
        sw.fork(failing)
    assert "Boom" not in capsys.readouterr().err


def test_body_not_blocking_still_sees_failure_at_exit() -> None:
    with pytest.raises(Boom), Switch() as sw:
        sw.fork(lambda: (_ for _ in ()).throw(Boom()))
        # the body never blocks: the fiber has not even started yet


# -- rule 3: several failures make a group, in order; KeyboardInterrupt is bare --------


def test_two_failures_make_a_group_in_order() -> None:
    first, second = Boom("first"), ValueError("second")
    gate = Event()

    def one() -> None:
        gate.set()
        raise first

    def two() -> None:
        try:
            Event().wait()
        except Cancelled:
            raise second from None

    with pytest.raises(BaseExceptionGroup) as info, Switch() as sw:
        sw.fork(two)
        sw.fork(one)
    assert list(info.value.exceptions) == [first, second]


def test_body_and_hook_failures_grouped_without_cancelled() -> None:
    body_err, hook_err = Boom("body"), Boom("hook")

    def bad_hook() -> None:
        raise hook_err

    with pytest.raises(BaseExceptionGroup) as info, Switch() as sw:
        sw.on_release(bad_hook)
        sw.fork(lambda: Event().wait())  # cancelled, not reported
        gevent.sleep(0)
        raise body_err
    assert list(info.value.exceptions) == [body_err, hook_err]


def test_keyboard_interrupt_propagates_bare() -> None:
    def fiber() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), Switch() as sw:
        sw.fork(fiber)
        sw.fork(lambda: (_ for _ in ()).throw(Boom()))


# -- rule 4: cancel() ends everything without an error ----------------------------------


def test_cancel_exits_normally() -> None:
    after: list[str] = []
    with Switch() as sw:
        sw.fork(lambda: Event().wait())
        sw.cancel()
        try:
            Event().wait()
        finally:
            after.append("body interrupted")
    assert after == ["body interrupted"]
    assert sw.cancelled and sw.finished


def test_switch_run_returns_value_or_none_when_cancelled() -> None:
    assert Switch.run(lambda sw, a, b=0: a + b, 1, b=2) == 3

    def body(sw: Switch) -> int:
        sw.cancel()
        Event().wait()
        return 1

    assert Switch.run(body) is None


def test_foreign_cancelled_is_not_swallowed() -> None:
    with pytest.raises(Cancelled), Switch():
        raise Cancelled("from elsewhere")


# -- rule 5: fork after finish / on a cancelled switch; late on_release; check() -------


def test_fork_on_finished_switch_raises() -> None:
    with Switch() as sw:
        pass
    with pytest.raises(RuntimeError, match="finished"):
        sw.fork(lambda: None)
    with pytest.raises(RuntimeError, match="finished"):
        sw.check()


def test_fork_on_cancelled_switch_never_calls() -> None:
    called: list[int] = []
    with Switch() as sw:
        sw.cancel()
        sw.fork(called.append, 1)
        p = sw.fork_promise(called.append, 2)
    assert called == []
    with pytest.raises(Cancelled):
        p.get()


def test_fork_then_cancel_before_it_started() -> None:
    # gevent.spawn does not run the child at once: cancelling before it starts must
    # neither run it nor leave the switch waiting for it.
    called: list[int] = []
    with Switch() as sw:
        sw.fork(called.append, 1)
        sw.cancel()
    assert called == []


def test_on_release_after_release_runs_at_once_then_raises() -> None:
    log: list[str] = []
    with Switch() as sw:
        pass
    with pytest.raises(RuntimeError, match="releasing"):
        sw.on_release(log.append, "late")
    assert log == ["late"]


def test_check() -> None:
    with Switch() as sw:
        sw.check()
        sw.cancel()
        with pytest.raises(Cancelled):
            sw.check()
        with pytest.raises(Cancelled):
            gevent.sleep(0)  # the body's own cancellation arrives


def test_bad_arguments() -> None:
    with Switch() as sw:
        with pytest.raises(TypeError, match="fn"):
            sw.fork(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="fn"):
            sw.on_release(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="exc"):
            sw.fail("x")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="entered"), sw:
        pass


# -- rule 6: contextvars -------------------------------------------------------------------

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_fibers_run_in_a_copy_of_the_forkers_context() -> None:
    def child() -> tuple[str, str]:
        seen = VAR.get()
        VAR.set("child")  # must not leak back
        return seen, VAR.get()

    token = VAR.set("parent")
    try:
        with Switch() as sw:
            g = sw.fork(child)
        assert g.value == ("parent", "child")
        assert VAR.get() == "parent"
    finally:
        VAR.reset(token)


# -- rule 7: nested switches -----------------------------------------------------------


def test_inner_switch_cancelled_with_outer() -> None:
    log: list[str] = []
    started = Event()

    def inner_worker() -> None:
        try:
            started.set()
            Event().wait()
        except Cancelled:
            log.append("inner fiber cancelled")
            raise

    def uses_inner() -> None:
        with Switch() as inner:
            inner.on_release(log.append, "inner released")
            inner.fork(inner_worker)
        log.append("not reached")

    with Switch() as outer:
        outer.fork(uses_inner)
        started.wait()
        outer.cancel()
    assert log == ["inner fiber cancelled", "inner released"]


def test_inner_switch_waiting_at_exit_is_cancelled_by_outer() -> None:
    log: list[str] = []
    started = Event()

    def uses_inner() -> None:
        with Switch() as inner:
            inner.fork(lambda: (started.set(), Event().wait()))
        log.append("not reached")

    with Switch() as outer:
        outer.fork(uses_inner)
        started.wait()
        outer.cancel()
    assert log == []


def test_outer_failure_cancels_inner_body() -> None:
    err = Boom("outer")
    started = Event()

    def uses_inner() -> None:
        with Switch():
            started.set()
            Event().wait()

    with pytest.raises(Boom) as info, Switch() as outer:
        outer.fork(uses_inner)
        started.wait()
        outer.fail(err)
    assert info.value is err


# -- rule 8: cancel from inside; at most one kill; hooks protected -----------------------


def test_cancel_from_inside_a_fiber_does_not_kill_it_synchronously() -> None:
    log: list[str] = []

    def fiber(sw: Switch) -> None:
        sw.cancel()
        log.append("still running after cancel()")
        try:
            gevent.sleep(0)
        except Cancelled:
            log.append("cancelled at next blocking point")
            raise

    with Switch() as sw:
        sw.fork(fiber, sw)
    assert log == ["still running after cancel()", "cancelled at next blocking point"]


def test_fail_from_inside_a_fiber() -> None:
    err = Boom()
    log: list[str] = []

    def fiber(sw: Switch) -> None:
        sw.fail(err)
        log.append("continues")

    with pytest.raises(Boom) as info, Switch() as sw:
        sw.fork(fiber, sw)
    assert info.value is err and log == ["continues"]


def test_blocking_finally_is_not_interrupted_by_a_second_kill() -> None:
    # gevent's kill() twice would interrupt the finally; the switch kills once.
    log: list[str] = []
    in_finally = Event()
    release = Event()

    def fiber() -> None:
        try:
            Event().wait()
        finally:
            in_finally.set()
            release.wait()  # blocks during cleanup
            log.append("cleanup finished")

    with Switch() as sw:
        sw.fork(fiber)
        gevent.sleep(0)
        sw.cancel()
        sw.cancel()
        releaser = gevent.spawn(lambda: (in_finally.wait(), gevent.sleep(0), release.set()))
    releaser.join()
    assert log == ["cleanup finished"]


def test_fiber_swallowing_cancelled_is_waited_for() -> None:
    # kill() returns while such a greenlet is still alive; the switch waits for it.
    log: list[str] = []

    def stubborn() -> None:
        try:
            Event().wait()
        except Cancelled:
            log.append("swallowed")
        gevent.sleep(0)
        log.append("finished later")

    with Switch() as sw:
        sw.fork(stubborn)
        gevent.sleep(0)
        sw.cancel()
    assert log == ["swallowed", "finished later"]


def test_release_hooks_are_protected_from_outer_cancellation() -> None:
    log: list[str] = []
    hook_running = Event()
    hook_may_finish = Event()

    def slow_hook() -> None:
        hook_running.set()
        hook_may_finish.wait()
        log.append("hook finished")

    def uses_inner() -> None:
        with Switch() as inner:
            inner.on_release(slow_hook)

    with Switch() as outer:
        outer.fork(uses_inner)
        hook_running.wait()
        outer.cancel()
        outer.fork(hook_may_finish.set)  # never runs: the switch is cancelled
        gevent.spawn(hook_may_finish.set).join()
    assert log == ["hook finished"]


# -- fork_promise and start ---------------------------------------------------------------


def test_fork_promise_value_and_failure_do_not_fail_switch() -> None:
    err = Boom()

    def bad() -> None:
        raise err

    with Switch() as sw:
        ok = sw.fork_promise(lambda: 7)
        failed = sw.fork_promise(bad)
        assert isinstance(ok, AsyncResult)
        assert ok.get() == 7
        with pytest.raises(Boom) as info:
            failed.get()
        assert info.value is err
    assert not sw.cancelled


def test_killed_greenlet_is_not_reported_as_success_value() -> None:
    # gevent reports a killed greenlet as successful with GreenletExit as its value;
    # a promise of a cancelled fiber raises Cancelled instead.
    with Switch() as sw:
        p = sw.fork_promise(lambda: Event().wait())
        gevent.sleep(0)
        sw.cancel()
    with pytest.raises(Cancelled):
        p.get()


def test_start_returns_started_value() -> None:
    log: list[str] = []

    def server(name: str, *, task_status: object) -> None:
        log.append("setting up")
        task_status.started(f"{name} ready")  # type: ignore[attr-defined]
        gevent.sleep(0)
        log.append("running")

    with Switch() as sw:
        assert sw.start(server, "s") == "s ready"
        assert log == ["setting up"]
    assert log == ["setting up", "running"]


def test_start_error_before_started_is_raised_from_start() -> None:
    err = Boom()

    def broken(task_status: object) -> None:
        raise err

    with Switch() as sw:
        with pytest.raises(Boom) as info:
            sw.start(broken)
        assert info.value is err
    assert not sw.cancelled


def test_start_without_started_is_runtime_error() -> None:
    with Switch() as sw, pytest.raises(RuntimeError, match="started"):
        sw.start(lambda task_status: None)


def test_started_twice_is_an_error() -> None:
    def twice(task_status: object) -> None:
        task_status.started()  # type: ignore[attr-defined]
        task_status.started()  # type: ignore[attr-defined]

    with pytest.raises(RuntimeError, match="already"), Switch() as sw:
        sw.start(twice)


def test_failure_after_started_fails_switch() -> None:
    err = Boom()

    def fn(task_status: object) -> None:
        task_status.started()  # type: ignore[attr-defined]
        gevent.sleep(0)
        raise err

    with pytest.raises(Boom) as info, Switch() as sw:
        sw.start(fn)
    assert info.value is err


def test_directly_killed_fiber_does_not_hang_the_switch() -> None:
    with Switch() as sw:
        g = sw.fork(lambda: Event().wait())
        g.kill()  # killed by someone else, before it even started
        h = sw.fork(lambda: Event().wait())
        gevent.sleep(0)
        h.kill()
    assert g.dead and h.dead


def test_repr() -> None:
    with Switch(name="web") as sw:
        assert "web" in repr(sw) and "running" in repr(sw)
    assert "finished" in repr(sw)


@pytest.mark.parametrize("n", range(7))
def test_fibers_get_exactly_their_arguments(n: int) -> None:
    # Forks with up to four positional arguments are called without *args (see
    # switch._call): every arity and keyword arguments must still arrive as given.
    def collect(*args: object, **kw: object) -> tuple[tuple[object, ...], dict[str, object]]:
        return args, kw

    args = tuple(range(n))
    with Switch() as sw:
        plain = sw.fork_promise(collect, *args)
        with_kw = sw.fork_promise(collect, *args, key="value")
    assert plain.get() == (args, {})
    assert with_kw.get() == (args, {"key": "value"})
