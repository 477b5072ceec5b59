"""``Switch``: structured concurrency for greenlets, after Eio's ``Switch``.

A switch owns fibers (greenlets) and resources. Leaving it waits for its fibers, cancels
its daemons, then closes what it owns (release hooks, last registered first). A failure
anywhere cancels everything else and is re-raised when the switch exits.

Design rules (each one answers a trap of raw greenlets):

- Completion is tracked with ``rawlink``, not with the fiber's own ``finally``: a
  greenlet killed before it started never runs its body, but its links still fire.
- Cancellation is *delivered* from a hub callback (``greenlet.throw``), never by killing
  the caller synchronously: a fiber that cancels its own switch gets ``Cancelled`` at its
  next blocking point. Every fiber is thrown into at most once (a second kill would
  interrupt a ``finally:`` that blocks); a fiber that swallows ``Cancelled`` is simply
  waited for.
- A fiber's exception is collected by the switch (the hub never prints it) and its
  value is the function's return value, never a ``GreenletExit``.
- Fibers run in a copy of the forker's ``contextvars`` context.
- Every ``Cancelled`` a switch makes belongs to it (``_switch``): the body's, its fibers',
  ``check()``'s, and a promise's or ``start``'s for a fiber it cancelled. Its own
  ``Cancelled`` ends the switch quietly; one of an enclosing switch (the switch whose
  body or fiber this switch was entered in, and so on up: ``_parent``) is that
  switch's cancellation reaching this one, which cancels itself and lets it through;
  one of any other switch (a promise read after its switch finished) is an error like
  any other, never a cancellation of whatever it passes through.
- Waiting at exit is shielded: an exception thrown into the waiting greenlet cancels
  this switch and the wait goes on. Nothing thrown there is lost: a cancellation (an
  enclosing switch's, a kill) is held and raised once everything owned is gone; anything
  else (a ``gevent.Timeout`` firing, ``KeyboardInterrupt``) counts as a failure, as if
  it had escaped the body. A held cancellation that is not the exception finally raised
  (a failure wins) is thrown again into the greenlet at its next blocking point, while
  it still applies. This is also how nesting works: an outer switch cancels a fiber,
  the inner switch used in that fiber sees the outer ``Cancelled`` and cancels itself.
- Release hooks run in a greenlet nobody cancels, so cleanup that blocks (a flush, a
  graceful close) is never cut short.

The engine's interface: beyond the public API, the server engine and the faces
(``_acceptor``, ``net``, ``tcp``, ``server``, ``gunicorn``) may call exactly these, and
nothing else private (tests/test_architecture.py enforces it):

- ``sw._fork_owning(fn, cleanup, *args, context=None, lean=True)``: fork a connection's
  fiber (a raw greenlet, or a gevent.Greenlet with ``lean=False``) whose ``args`` (its
  socket) are released by ``cleanup`` if it never runs;
- ``sw._cancel_fiber(g)``: cancel one fiber (a connection the engine aborts);
- ``Switch._detached(name)`` and ``sw._close()``: a switch with no body, owned by a
  server object and finished when that server stops.
"""

from __future__ import annotations

import contextvars
import itertools
import sys
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TypeVar

import gevent
import greenlet
from gevent import Greenlet, GreenletExit, getcurrent
from gevent.event import AsyncResult, Event

from .errors import Cancelled

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Cancelled", "Switch", "TaskStatus"]

T = TypeVar("T")

# Fiber states.
_PENDING, _RUNNING, _KILLED = 0, 1, 2

_names = itertools.count(1)

# The switch whose body or fiber the current code runs in (None outside any): set by
# ``__enter__`` (restored by ``__exit__``) and by a fiber that runs in a context copied
# from another switch's code. Only read when a switch is entered, to know its parent.
_current: contextvars.ContextVar[Switch | None] = contextvars.ContextVar(
    "greenserve.switch", default=None)


class _Closeable(Protocol):
    def close(self) -> object: ...


R = TypeVar("R", bound=_Closeable)


class ReleaseHook:
    """Returned by :meth:`Switch.on_release`; :meth:`remove` cancels the hook."""

    __slots__ = ("_hooks", "_key", "args", "fn")

    def __init__(self, hooks: dict[int, ReleaseHook], key: int,
                 fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._hooks = hooks
        self._key = key
        self.fn = fn
        self.args = args

    def remove(self) -> None:
        """Forget the hook (it will not run). Safe to call more than once."""
        self._hooks.pop(self._key, None)


class TaskStatus:
    """Passed as ``task_status=`` by :meth:`Switch.start`; call :meth:`started` once ready."""

    __slots__ = ("_abandoned", "_failure", "_ready", "_started")

    def __init__(self) -> None:
        self._ready: AsyncResult = AsyncResult()
        self._started = False
        self._abandoned = False  # start() was interrupted: nobody waits for _ready
        self._failure: BaseException | None = None  # what fn raised before started()

    def started(self, value: object = None) -> None:
        """Let :meth:`Switch.start` return ``value``. Raises ``RuntimeError`` if called twice."""
        if self._started:
            raise RuntimeError("task_status.started() was already called")
        self._started = True
        self._ready.set(value)

    def _fail(self, exc: BaseException) -> None:
        self._started = True
        self._ready.set_exception(exc)


class RawFiber(greenlet.greenlet):  # type: ignore[misc]  # greenlet is typed loosely
    """A connection's fiber (``Switch._fork_owning``): a raw greenlet, for what it costs.

    It has what code running in a fiber may ask of its greenlet: ``dead``, ``throw``,
    being a dict key (gevent.local, per-greenlet state); ``kill`` and ``join`` are
    gevent.Greenlet's and not here: a fiber is cancelled through its switch."""

    # What it runs, until it starts: kept here rather than passed to its first switch,
    # whose argument tuple the greenlet would keep for its whole life (memory per
    # idle connection).
    __slots__ = ("_job",)


# The keyword arguments of a fork that has none: shared, never modified (``fn(**kw)``
# copies it), so that a fork per connection allocates no dict for it.
_NO_KWARGS: dict[str, Any] = {}


def _call(fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """``fn(*args, **kw)``, spelled out for up to four positional arguments.

    CPython runs a call with a fixed number of arguments to a Python function in the
    caller's interpreter loop, but ``fn(*args)`` in a new C-level one: about half a KiB
    of C stack under every fiber, which a suspended fiber keeps on the heap and every
    greenlet switch copies (measured: 512 B less per idle connection).
    """
    if kw:
        return fn(*args, **kw)
    n = len(args)
    if n == 2:
        return fn(args[0], args[1])  # the engine's (sock, peer)
    if n == 0:
        return fn()
    if n == 1:
        return fn(args[0])
    if n == 3:
        return fn(args[0], args[1], args[2])
    if n == 4:
        return fn(args[0], args[1], args[2], args[3])
    return fn(*args)


class Switch:
    """A group of fibers and resources with one lifetime.

    ``with Switch() as sw:`` ... — see the module docstring and docs/switch.md.
    Resource handling: everything ``attach``-ed or registered with ``on_release`` is
    released when the switch finishes, last registered first.
    Error handling: the first failure cancels every other fiber and the body, and is
    re-raised (the same object) when the ``with`` block exits; several distinct
    failures raise ``BaseExceptionGroup`` in the order they happened.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name if name is not None else f"switch-{next(_names)}"
        self._state: dict[Greenlet, int] = {}
        self._daemons: set[Greenlet] = set()
        self._live = 0          # non-daemon fibers not yet dead
        self._live_daemons = 0
        self._fibers_done = Event()
        self._fibers_done.set()
        self._daemons_done = Event()
        self._daemons_done.set()
        self._hooks: dict[int, ReleaseHook] = {}
        self._hook_keys = itertools.count()
        self._failures: list[BaseException] = []
        self._cancelled = False
        self._closing = False   # daemons are being cancelled: nothing new may start
        self._releasing = False
        self._finished = False
        self._entered = False
        self._owner: Any = None  # the greenlet running the body
        self._body_running = False
        self._body_cancel: Cancelled | None = None
        # The switch whose body or fiber this one was entered in: its cancellation
        # reaching this switch is a cancellation, not an error.
        self._parent: Switch | None = None
        # Cancellations from outside (an enclosing switch's, a kill) that ended the
        # body or were thrown into the wait at exit, in order; raised or thrown again.
        self._outer: list[BaseException] = []
        self._given_context: tuple[contextvars.Context, contextvars.Context] | None = None
        self._run_owned_fn: Callable[[], None] | None = None

    # -- public state -------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the switch was cancelled or failed."""
        return self._cancelled

    @property
    def finished(self) -> bool:
        """True once the switch has released everything it owned."""
        return self._finished

    def __repr__(self) -> str:
        state = ("finished" if self._finished else "releasing" if self._releasing
                 else "cancelled" if self._cancelled else "running")
        return (f"<Switch {self.name!r} {state} fibers={self._live} "
                f"daemons={self._live_daemons} hooks={len(self._hooks)}>")

    def check(self) -> None:
        """Raise ``RuntimeError`` if finished, ``Cancelled`` if cancelled; else nothing.

        The ``Cancelled`` belongs to this switch: escaping the body, it ends the switch
        without an error, as the body's own cancellation does.
        """
        if self._finished:
            raise RuntimeError(f"{self!r} is finished")
        if self._cancelled:
            raise self._cancelled_error("was cancelled")

    # -- fibers -------------------------------------------------------------------------

    def fork(self, fn: Callable[..., T], *args: Any, **kw: Any) -> Greenlet:
        """Run ``fn(*args, **kw)`` in a new fiber; the switch waits for it on exit.

        Raises ``RuntimeError`` if the switch is finished. On a cancelled switch the
        fiber is created but ``fn`` is never called. An exception from ``fn`` fails
        the switch.
        """
        return self._spawn(fn, args, kw, daemon=False, promise=None, status=None)

    def fork_daemon(self, fn: Callable[..., T], *args: Any, **kw: Any) -> Greenlet:
        """Like :meth:`fork`, but the switch does not wait for it: once every other
        fiber has finished, daemons are cancelled."""
        return self._spawn(fn, args, kw, daemon=True, promise=None, status=None)

    def fork_promise(self, fn: Callable[..., T], *args: Any, **kw: Any) -> AsyncResult:
        """Run ``fn`` in a fiber and return an ``AsyncResult`` for its value or exception.

        A failure of ``fn`` is stored in the result and does not fail the switch.
        If the fiber is cancelled, the result holds ``Cancelled``.
        """
        promise: AsyncResult = AsyncResult()
        self._spawn(fn, args, kw, daemon=False, promise=promise, status=None)
        return promise

    def start(self, fn: Callable[..., object], *args: Any, **kw: Any) -> Any:
        """Fork ``fn(*args, task_status=..., **kw)`` and block until it calls
        ``task_status.started(value)``; return ``value``.

        An exception raised by ``fn`` before it called ``started`` is raised here (and
        does not fail the switch); returning without calling it raises ``RuntimeError``.
        After ``started``, ``fn`` is an ordinary fiber of the switch.
        """
        status = TaskStatus()
        kw["task_status"] = status
        self._spawn(fn, args, kw, daemon=False, promise=None, status=status)
        try:
            return status._ready.get()
        except BaseException as exc:
            self._start_interrupted(status, exc)
            raise

    def _start_interrupted(self, status: TaskStatus, exc: BaseException) -> None:
        """``start`` raises ``exc`` rather than what ``fn`` reported (its caller was
        cancelled first, or a Timeout fired): a failure of ``fn`` before ``started()``
        would then reach nobody, so it fails the switch, now or when it happens."""
        status._abandoned = True
        if status._failure is not None and status._failure is not exc:
            self._record_failure(status._failure)

    def _fork_owning(self, fn: Callable[..., Any], cleanup: Callable[..., object],
                     *args: Any, context: contextvars.Context | None = None,
                     lean: bool = True) -> Any:
        """Fork ``fn(*args)``; if the fiber never gets to call ``fn`` (the switch or
        the fiber was cancelled before it started) call ``cleanup(*args)`` instead, so
        that whatever ``args`` hold (a connection socket) is not leaked (taking ``args``
        saves the engine a closure per connection). The fiber runs in a copy of
        ``context`` if given (the engine forks from the hub, on behalf of the code that
        started the server), else of the forker's. ``lean=False``: a gevent.Greenlet
        (gevent's StreamServer face: its handlers, and the hub's ``handle_error``, expect
        one), else a :class:`RawFiber`."""
        if not lean:
            return self._spawn(fn, args, _NO_KWARGS, daemon=False, promise=None, status=None,
                               cleanup=cleanup, context=context)
        if self._finished:
            raise RuntimeError(f"{self!r} is finished: cannot fork {fn!r}")
        # The lean fiber of a connection: a raw greenlet with the hub as its parent,
        # started from the loop's callback queue (as gevent starts a Greenlet: the same
        # order), its end tracked in its own ``finally``. No gevent.Greenlet (its links,
        # its start/run bookkeeping): about a quarter of the per-connection CPU the
        # greenlet layer cost (benchmarks/README.md). A fiber is still a fiber: it is
        # counted, cancelled by a throw, runs in a copy of ``context``, reports failures.
        hub = gevent.get_hub()
        run = self._run_owned_fn  # one bound method for all: a fiber keeps its run
        if run is None:
            run = self._run_owned_fn = self._run_owned
        g = RawFiber(run, hub)
        g._job = (fn, *args)  # one tuple, unpacked when the fiber starts
        if context is None:
            g.gr_context = contextvars.copy_context()
        else:
            given = self._given_context  # _as_current's answer, without the call
            g.gr_context = (given[1] if given is not None and given[0] is context
                            else self._as_current(context)).copy()
        self._state[g] = _PENDING
        self._live += 1
        self._fibers_done.clear()
        hub.loop.run_callback(self._start_owned, g, cleanup)
        return g

    def _start_owned(self, g: RawFiber, cleanup: Callable[..., object]) -> None:
        # In the hub, from its callback queue. A fiber cancelled before it starts never
        # runs fn: its cleanup releases what args hold.
        if self._cancelled or self._state.get(g) == _KILLED:
            args = g._job[1:]
            g._job = None
            try:
                cleanup(*args)
            finally:
                self._reap(g)
            return
        g.switch()

    def _run_owned(self) -> None:
        me = getcurrent()
        job = me._job
        me._job = None
        self._state[me] = _RUNNING
        try:
            if _current.get() is not self:  # forked from the hub (the engine)
                _current.set(self)
            if len(job) == 3:  # the engine's (fn, sock, peer): no tuple kept while it runs
                fn, a, b = job
                del job
                fn(a, b)
            else:
                _call(job[0], job[1:], _NO_KWARGS)
        except GreenletExit as exc:
            if not self._is_cancellation(exc):  # another switch's Cancelled: an error
                self._fiber_failed(exc, None, None)
        except BaseException as exc:
            self._fiber_failed(exc, None, None)
        finally:
            # _reap, for a fiber that is never a daemon, without the call
            self._state.pop(me, None)
            self._live -= 1
            if not self._live:
                self._fibers_done.set()

    def _cancel_fiber(self, g: Greenlet) -> None:
        """Cancel one fiber of this switch (at most once; before it starts: never runs)."""
        state = self._state.get(g)
        if state == _RUNNING:
            self._kill(g)
        elif state == _PENDING:
            self._state[g] = _KILLED

    def _spawn(self, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any], *,
               daemon: bool, promise: AsyncResult | None,
               status: TaskStatus | None, cleanup: Callable[..., object] | None = None,
               context: contextvars.Context | None = None) -> Greenlet:
        if self._finished:
            raise RuntimeError(f"{self!r} is finished: cannot fork {fn!r}")
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        g = Greenlet(self._run_fiber, fn, args, kw, daemon, promise, status, cleanup)
        # The fiber runs in a copy of the forker's context (set as the greenlet's own
        # context: no Context.run frame on the fiber's stack, which every switch saves).
        g.gr_context = (contextvars.copy_context() if context is None
                        else self._as_current(context).copy())
        self._state[g] = _PENDING
        if daemon:
            self._daemons.add(g)
            self._live_daemons += 1
            self._daemons_done.clear()
        else:
            self._live += 1
            self._fibers_done.clear()
        g.rawlink(self._reap)
        g.start()
        return g

    def _as_current(self, context: contextvars.Context) -> contextvars.Context:
        """``context`` with this switch as the current one (see ``_current``), made once
        per context given: the engine gives the same one for every connection, whose
        fibers then need no ``ContextVar.set`` (a new context mapping each) of their own."""
        given = self._given_context
        if given is None or given[0] is not context:
            derived = context.copy()
            derived.run(_current.set, self)
            given = self._given_context = (context, derived)
        return given[1]

    def _run_fiber(self, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any],
                   daemon: bool, promise: AsyncResult | None,
                   status: TaskStatus | None, cleanup: Callable[..., object] | None) -> Any:
        me = getcurrent()
        if self._cancelled or (daemon and self._closing) or self._state.get(me) == _KILLED:
            self._never_ran(promise, status)
            if cleanup is not None:
                cleanup(*args)
            return None
        self._state[me] = _RUNNING
        if _current.get() is not self:  # forked from another switch's code (or the hub)
            _current.set(self)  # the fiber's own context: nothing leaks back
        try:
            result = _call(fn, args, kw)
        except GreenletExit as exc:
            if self._is_cancellation(exc):  # ours, an enclosing one's, or a kill()
                self._fiber_cancelled(exc, promise, status)
            else:  # another switch's Cancelled (its promise read late): an error
                self._fiber_failed(exc, promise, status)
            return None
        except BaseException as exc:
            self._fiber_failed(exc, promise, status)
            return None
        if promise is not None:
            promise.set(result)
        elif status is not None and not status._started:
            status._fail(RuntimeError(f"{fn!r} returned without calling task_status.started()"))
        return result

    def _never_ran(self, promise: AsyncResult | None, status: TaskStatus | None) -> None:
        if promise is None and status is None:
            return
        exc = self._cancelled_error("was cancelled before the fiber started")
        if promise is not None:
            promise.set_exception(exc)
        if status is not None:
            status._fail(exc)

    def _fiber_cancelled(self, exc: GreenletExit, promise: AsyncResult | None,
                         status: TaskStatus | None) -> None:
        if promise is None and (status is None or status._started):
            return
        # A kill() that belongs to no switch is reported as ours: the promise's
        # Cancelled, unhandled in our body, then ends the switch like our own.
        cancelled = exc if _owner(exc) is not None else self._cancelled_error(
            f"had a fiber killed ({exc!r})")
        if promise is not None:
            promise.set_exception(cancelled)
        elif status is not None and not status._started:
            status._fail(cancelled)

    def _fiber_failed(self, exc: BaseException, promise: AsyncResult | None,
                      status: TaskStatus | None) -> None:
        if promise is not None:
            promise.set_exception(exc)
        elif status is not None and not status._started and not status._abandoned:
            status._failure = exc  # start() raises it in its caller
            status._fail(exc)
        else:
            self._record_failure(exc)

    def _reap(self, g: Greenlet) -> None:
        self._state.pop(g, None)
        if g in self._daemons:
            self._daemons.discard(g)
            self._live_daemons -= 1
            if not self._live_daemons:
                self._daemons_done.set()
        else:
            self._live -= 1
            if not self._live:
                self._fibers_done.set()

    # -- cancellation and failure ---------------------------------------------------------

    def cancel(self) -> None:
        """Cancel every fiber and the body, without an error.

        Each fiber gets ``Cancelled`` at its next blocking point (never synchronously,
        even when called from inside a fiber). The ``with`` block then exits normally.
        """
        if self._cancelled:
            return
        self._cancelled = True
        for g, state in list(self._state.items()):
            if state == _RUNNING:
                self._kill(g)
        self._cancel_body()

    def fail(self, exc: BaseException) -> None:
        """Fail the switch with ``exc``: cancel everything; ``exc`` is raised on exit."""
        if not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception, not {type(exc).__name__}")
        if isinstance(exc, GreenletExit):
            self.cancel()
        else:
            self._record_failure(exc)

    def _record_failure(self, exc: BaseException) -> None:
        if not any(exc is seen for seen in self._failures):
            self._failures.append(exc)
        self.cancel()

    def _kill(self, g: Greenlet) -> None:
        self._state[g] = _KILLED
        gevent.get_hub().loop.run_callback(self._deliver, g)

    def _deliver(self, g: Greenlet) -> None:
        if not g.dead:
            g.throw(self._cancelled_error("was cancelled"))

    def _cancel_body(self) -> None:
        if self._body_running and self._body_cancel is None:
            self._body_cancel = self._cancelled_error("was cancelled")
            gevent.get_hub().loop.run_callback(self._deliver_body)

    def _cancelled_error(self, why: str) -> Cancelled:
        """A ``Cancelled`` that belongs to this switch (see :func:`_owner`)."""
        exc = Cancelled(f"{self!r} {why}")
        exc._switch = self
        return exc

    def _within(self, other: Switch) -> bool:
        """True if this switch is ``other`` or was entered (transitively) in the body or
        a fiber of ``other``: ``other``'s cancellation reaches this switch."""
        sw: Switch | None = self
        while sw is not None:
            if sw is other:
                return True
            sw = sw._parent
        return False

    def _is_cancellation(self, exc: BaseException) -> bool:
        """True if ``exc`` cancels what runs in this switch: a ``GreenletExit`` of no
        switch (a kill), or a ``Cancelled`` of this switch or of one it runs within.
        Another switch's ``Cancelled`` here is an error, not a cancellation."""
        if not isinstance(exc, GreenletExit):
            return False
        owner = _owner(exc)
        return owner is None or self._within(owner)

    def _reaches(self, g: Any) -> bool:
        """True while this switch's cancellation still applies to greenlet ``g``: the
        body runs in ``g``, or ``g`` is one of its fibers."""
        return (self._body_running and self._owner is g) or g in self._state

    def _deliver_body(self) -> None:
        if self._body_running and not self._owner.dead:
            self._owner.throw(self._body_cancel)

    # -- resources ----------------------------------------------------------------------

    def on_release(self, fn: Callable[..., object], *args: Any) -> ReleaseHook:
        """Call ``fn(*args)`` when the switch finishes (last registered, first run).

        Returns a hook whose ``remove()`` cancels it. After release has started,
        ``fn`` runs at once and ``RuntimeError`` is raised.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if self._releasing:
            fn(*args)
            raise RuntimeError(f"{self!r} is already releasing: ran {fn!r} at once")
        key = next(self._hook_keys)
        hook = ReleaseHook(self._hooks, key, fn, args)
        self._hooks[key] = hook
        return hook

    def attach(self, resource: R) -> R:
        """Close ``resource`` (its ``close()``) when the switch finishes; return it."""
        close = getattr(resource, "close", None)
        if not callable(close):
            raise TypeError(f"resource must have a close() method: {resource!r}")
        self.on_release(close)
        return resource

    # -- the lifetime -------------------------------------------------------------------

    def __enter__(self) -> Switch:
        if self._entered:
            raise RuntimeError(f"{self!r} was already entered: make a new Switch")
        self._entered = True
        self._owner = getcurrent()
        self._parent = _current.get()
        _current.set(self)
        self._body_running = True
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._body_running = False
        _current.set(self._parent)
        if ev is not None:
            self._body_ended_by(ev)
        self._finish()
        return self._outcome(ev)

    def _body_ended_by(self, ev: BaseException) -> None:
        if _owner(ev) is self:
            self.cancel()  # our own Cancelled (body, check(), a promise): swallowed
        elif self._is_cancellation(ev):
            self._outer.append(ev)  # an enclosing switch (or a kill) cancels us
            self.cancel()
        else:
            self._record_failure(ev)

    @classmethod
    def run(cls, fn: Callable[..., T], *args: Any, **kw: Any) -> T | None:
        """``with Switch() as sw: return fn(sw, *args, **kw)``.

        Returns ``None`` if the switch was cancelled without an error.
        """
        with cls() as sw:
            return fn(sw, *args, **kw)
        return None

    @classmethod
    def _detached(cls, name: str | None = None) -> Switch:
        """A switch with no body, finished later by :meth:`_close` (used by servers)."""
        sw = cls(name)
        sw._entered = True
        return sw

    def _close(self) -> None:
        """Finish a detached switch: wait for fibers, cancel daemons, release; raise
        what failed. Must not be called from one of its own fibers."""
        self._finish()
        self._outcome(None)

    def _finish(self) -> None:
        self._wait_shielded(self._fibers_done)
        self._closing = True
        for g in list(self._daemons):
            if self._state.get(g) == _RUNNING:
                self._kill(g)
        self._wait_shielded(self._daemons_done)
        self._releasing = True
        if self._hooks:
            hooks = list(self._hooks.values())
            self._hooks.clear()
            runner = gevent.spawn(self._run_hooks, reversed(hooks))
            self._wait_shielded(runner)
        self._finished = True

    def _run_hooks(self, hooks: Any) -> None:
        for hook in hooks:
            try:
                hook.fn(*hook.args)
            except GreenletExit:
                pass
            except BaseException as exc:
                self._failures.append(exc)

    def _wait_shielded(self, waitable: Event | Greenlet) -> None:
        while not (waitable.dead if isinstance(waitable, Greenlet) else waitable.is_set()):
            try:
                waitable.join() if isinstance(waitable, Greenlet) else waitable.wait()
            except BaseException as exc:
                self._thrown_at_exit(exc)

    def _thrown_at_exit(self, exc: BaseException) -> None:
        """Keep what was thrown into the wait at exit: every one of them is honoured."""
        if _owner(exc) is self:
            return  # our own cancellation arrived late: the body already ended
        if self._is_cancellation(exc):
            self._outer.append(exc)
            self.cancel()
        else:  # a gevent.Timeout firing, KeyboardInterrupt: as if it escaped the body
            self._record_failure(exc)

    def _outcome(self, ev: BaseException | None) -> bool:
        raised = self._to_raise()
        held, self._outer = self._outer, []
        _throw_again(getcurrent(), held, raised)
        if raised is None:
            return ev is not None  # our own Cancelled from the body is swallowed here
        if raised is ev:
            return False  # let Python re-raise it with its own traceback
        raise raised

    def _to_raise(self) -> BaseException | None:
        """Failures first (``KeyboardInterrupt``/``SystemExit`` bare, one failure as is,
        several as a group), else the first cancellation from outside, else nothing."""
        failures = self._failures
        bare = [e for e in failures if isinstance(e, (KeyboardInterrupt, SystemExit))]
        if bare:
            return bare[0]
        if len(failures) == 1:
            return failures[0]
        if failures:
            return BaseExceptionGroup(f"{self.name}: {len(failures)} failures", list(failures))
        return self._outer[0] if self._outer else None


def _owner(exc: BaseException) -> Switch | None:
    """The switch a ``Cancelled`` belongs to, set by ``Switch._cancelled_error`` (None:
    a kill, one made by hand, any other exception)."""
    owner = getattr(exc, "_switch", None)
    return owner if isinstance(owner, Switch) else None


def _throw_again(g: Any, held: list[BaseException], raised: BaseException | None) -> None:
    """Throw each held cancellation that is not ``raised`` into ``g`` again, at its next
    blocking point: one that arrived while a switch waited at exit behind a failure or a
    ``gevent.Timeout`` must not be lost (the caller may catch those and go on). One per
    switch: the one raised (or an earlier one) already carries that switch's."""
    carried = [_owner(raised)] if raised is not None else []
    for exc in held:
        owner = _owner(exc)
        if exc is raised or (owner is not None and any(owner is o for o in carried)):
            continue
        carried.append(owner)
        gevent.get_hub().loop.run_callback(_deliver_again, g, exc)


def _deliver_again(g: Any, exc: BaseException) -> None:
    # Only while it still applies: the switch's body still runs in g, or g is still its
    # fiber (a kill applies while g lives).
    owner = _owner(exc)
    if not g.dead and (owner is None or owner._reaches(g)):
        g.throw(exc)
