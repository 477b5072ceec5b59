"""greenserve.Switch: every numbered rule of docs/switch.md and the greenlet traps."""

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


def test_start_failure_is_not_lost_when_the_caller_is_cancelled_first() -> None:
    # Found by tests/test_switch_properties.py: fn cancels the switch, then fails
    # before started(); start()'s caller gets the body's Cancelled first, so the
    # failure must fail the switch instead of going to start() (it was lost).
    err = Boom("setup")

    def fn(sw: Switch, task_status: object) -> None:
        sw.cancel()
        raise err

    with pytest.raises(Boom) as info, Switch() as sw:
        sw.start(fn, sw)
    assert info.value is err


def test_start_failure_after_the_caller_gave_up_fails_the_switch() -> None:
    err = Boom("setup")
    go = Event()

    def fn(task_status: object) -> None:
        go.wait()
        raise err  # start() is no longer waiting: nobody else would see this

    with pytest.raises(Boom) as info, Switch() as sw:
        with gevent.Timeout(0.001, False):
            sw.start(fn)
        go.set()
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


# -- a Cancelled belongs to its switch (check, start, promise after cancel) --------------


def test_check_after_cancel_exits_normally() -> None:
    after: list[str] = []
    with Switch() as sw:
        sw.cancel()
        sw.check()  # raises this switch's own Cancelled...
        after.append("not reached")
    # ...which its with block swallows, like the body's cancellation
    assert after == [] and sw.cancelled and sw.finished


def test_switch_run_returns_none_when_check_raises() -> None:
    def body(sw: Switch) -> int:
        sw.cancel()
        sw.check()
        return 1

    assert Switch.run(body) is None


@pytest.mark.parametrize("how", ["check", "start", "promise"])
def test_own_cancelled_raised_while_handling_the_cancellation_is_swallowed(how: str) -> None:
    # The body's cancellation is delivered once; code cleaning up after it that calls
    # check(), start() or a promise's get() gets another Cancelled of the same switch.
    def fn(task_status: object) -> None:
        task_status.started()  # type: ignore[attr-defined]

    cleanup: list[str] = []
    with Switch() as sw:
        promise = sw.fork_promise(Event().wait)
        gevent.sleep(0)
        sw.cancel()
        try:
            Event().wait()
        except Cancelled:
            cleanup.append("body cancelled")
            if how == "check":
                sw.check()
            elif how == "start":
                sw.start(fn)  # the fiber never runs: the switch is cancelled
            else:
                promise.get()  # its fiber was cancelled
            cleanup.append("not reached")
    assert cleanup == ["body cancelled"] and sw.cancelled


def test_inner_check_does_not_cancel_the_outer_switch() -> None:
    log: list[str] = []
    with Switch(name="outer") as outer:
        with Switch(name="inner") as inner:
            inner.cancel()
            inner.check()
        log.append("after the inner switch")
        outer.fork(log.append, "outer still forks")
    assert log == ["after the inner switch", "outer still forks"]
    assert inner.cancelled and not outer.cancelled


def test_enclosing_switch_check_unwinds_the_inner_one_and_is_swallowed_by_its_own() -> None:
    log: list[str] = []
    with Switch(name="outer") as outer:
        with Switch(name="inner") as inner:
            inner.on_release(log.append, "inner released")
            outer.cancel()
            outer.check()
        log.append("not reached")
    assert log == ["inner released"] and inner.cancelled and outer.cancelled


def test_enclosing_switch_check_in_a_nested_fiber_is_a_cancellation() -> None:
    # outer -> fiber -> middle switch -> its fiber calls outer.check(): outer encloses
    # that fiber, so its Cancelled just ends it (no failure anywhere).
    def grandchild() -> None:
        outer.cancel()
        outer.check()

    def middle() -> None:
        with Switch(name="middle") as mid:
            mid.fork(grandchild)

    with Switch(name="outer") as outer:
        outer.fork(middle)
    assert outer.cancelled and outer.finished


def test_cancelled_of_a_finished_switch_is_an_error_in_a_fiber() -> None:
    # The promise of a switch that finished raises that switch's Cancelled: nothing
    # will swallow it, and the fiber reading it is not cancelled, it failed.
    with Switch(name="inner") as inner:
        promise = inner.fork_promise(Event().wait)
        gevent.sleep(0)
        inner.cancel()

    with pytest.raises(Cancelled) as info, Switch(name="outer") as outer:
        outer.fork(promise.get)
    assert "inner" in str(info.value) and outer.cancelled


def test_cancelled_of_a_finished_switch_is_an_error_in_a_body() -> None:
    err = Boom("fiber")

    def failing() -> None:
        gevent.sleep(0)
        raise err

    with Switch(name="inner") as inner:
        promise = inner.fork_promise(Event().wait)
        inner.cancel()
    # Reported with the other failure (a cancellation would have been left out).
    with pytest.raises(BaseExceptionGroup) as info, Switch(name="outer") as outer:
        outer.fork(failing)
        gevent.sleep(0)
        promise.get()
    kinds = [type(e) for e in info.value.exceptions]
    assert kinds == [Cancelled, Boom] and outer.cancelled


# -- nothing thrown into the wait at exit is lost ----------------------------------------


def _join_bounded(g: gevent.Greenlet, *drivers: gevent.Greenlet) -> gevent.Greenlet:
    """Wait for ``g``; fail (instead of hanging) if it blocks for good. ``drivers``
    (plain greenlets, so that no switch cancels them) are joined too."""
    g.join(timeout=5)
    for driver in drivers:
        driver.join(timeout=1)
    if not g.dead:
        gevent.killall([g, *drivers])
        pytest.fail("blocked forever: a cancellation was lost")
    return g


def test_outer_cancellation_after_a_timeout_during_the_wait_for_fibers() -> None:
    # A Timeout fires into the inner switch's wait at exit, then the outer switch fails
    # (its Cancelled is thrown into the same wait). The Timeout is raised (its with
    # block catches it); the outer Cancelled must then reach the body.
    err = Boom("worker")
    log: list[str] = []
    timed_out, release = Event(), Event()

    def inner_fiber() -> None:
        try:
            Event().wait()
        except Cancelled:
            timed_out.set()  # the Timeout reached the inner wait and cancelled it
            release.wait()   # a cleanup that blocks: the inner switch keeps waiting
            raise

    def watchdog() -> None:
        timed_out.wait()
        outer.fail(err)   # the outer Cancelled is thrown into the waiting body...
        gevent.sleep(0)   # ...before this runs again (hub callbacks run in order)
        release.set()

    outer = Switch(name="outer")

    def body() -> None:
        with outer:
            with gevent.Timeout(0.001, False), Switch(name="inner") as inner:
                inner.fork(inner_fiber)
            log.append("timeout caught")
            try:
                Event().wait()
            except Cancelled:
                log.append("body cancelled")
                raise

    g = _join_bounded(gevent.spawn(body), gevent.spawn(watchdog))
    assert log == ["timeout caught", "body cancelled"]
    assert g.exception is err


def test_issue_13_outer_failure_during_a_slow_release_hook_under_a_timeout() -> None:
    # The reproduction of the issue: the worker fails at 0.1 s while the inner switch
    # runs a 0.3 s release hook inside a 0.05 s Timeout. (Whatever order the timers
    # fire in, the body must end up cancelled.)
    log: list[str] = []

    def worker() -> None:
        gevent.sleep(0.1)
        raise Boom("worker")

    def body() -> None:
        with Switch(name="outer") as outer:
            outer.fork(worker)
            with gevent.Timeout(0.05, False), Switch(name="inner") as inner:
                inner.on_release(gevent.sleep, 0.3)
            log.append(f"after inner, outer cancelled: {outer.cancelled}")
            try:
                Event().wait()
            except Cancelled:
                log.append("body cancelled")
                raise

    g = _join_bounded(gevent.spawn(body))
    assert log == ["after inner, outer cancelled: True", "body cancelled"]
    assert isinstance(g.exception, Boom)


def _expire(timeout: gevent.Timeout, g: gevent.Greenlet) -> None:
    """What the hub does when a Timeout's timer expires: throw it into its greenlet
    from a hub callback (done by hand to fix the order of events)."""
    gevent.get_hub().loop.run_callback(g.throw, timeout)


def test_timeout_arriving_after_the_outer_cancellation_is_raised_then_the_cancellation() -> None:
    log: list[str] = []
    hook_started, release = Event(), Event()

    def hook() -> None:
        hook_started.set()
        release.wait()

    outer = Switch(name="outer")
    timeout = gevent.Timeout(None, False)  # expired by hand below

    def driver() -> None:
        hook_started.wait()
        outer.cancel()           # first: the outer Cancelled, held by the inner wait
        _expire(timeout, g)      # then the Timeout, thrown into the same wait
        gevent.sleep(0)
        release.set()

    def body() -> None:
        with outer:
            with timeout, Switch(name="inner") as inner:
                inner.on_release(hook)
            log.append("timeout caught")  # the Timeout is raised (not lost)...
            try:
                Event().wait()
            except Cancelled:
                log.append("body cancelled")  # ...and the cancellation comes next
                raise

    g = gevent.spawn(body)
    _join_bounded(g, gevent.spawn(driver))
    assert log == ["timeout caught", "body cancelled"] and g.exception is None


def test_outer_cancellation_held_behind_an_inner_failure_is_not_lost() -> None:
    # The inner switch raises its failure; the outer Cancelled that reached its wait
    # meanwhile must not be lost when the body catches that failure and goes on.
    err = Boom("inner")
    log: list[str] = []

    def inner_fiber(outer: Switch) -> None:
        outer.cancel()    # the outer Cancelled is thrown into the waiting body...
        gevent.sleep(0)   # ...before this fiber runs again
        raise err

    def body() -> None:
        with Switch(name="outer") as outer:
            try:
                with Switch(name="inner") as inner:
                    inner.fork(inner_fiber, outer)
            except Boom as exc:
                log.append(f"caught {exc}")
            try:
                Event().wait()
            except Cancelled:
                log.append("body cancelled")
                raise

    g = _join_bounded(gevent.spawn(body))
    assert log == ["caught inner", "body cancelled"] and g.exception is None


def test_keyboard_interrupt_and_outer_cancellation_in_the_wait() -> None:
    # KeyboardInterrupt wins (bare); the outer switch still ends, cancelled. (Run in
    # this greenlet: gevent re-raises a KeyboardInterrupt ending a spawned one here.)
    hook_started, release = Event(), Event()
    main = gevent.getcurrent()
    outer = Switch(name="outer")

    def driver() -> None:
        hook_started.wait()
        gevent.get_hub().loop.run_callback(main.throw, KeyboardInterrupt())
        outer.cancel()
        gevent.sleep(0)
        release.set()

    def hook() -> None:
        hook_started.set()
        release.wait()

    helper = gevent.spawn(driver)
    # (The Timeout makes a lost cancellation fail the test instead of hanging it.)
    with gevent.Timeout(5), pytest.raises(KeyboardInterrupt), outer, \
            Switch(name="inner") as inner:
        inner.on_release(hook)
    helper.join()
    assert outer.cancelled and outer.finished
