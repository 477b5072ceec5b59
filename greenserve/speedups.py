"""An optional accelerator: page-aligned slots for the frame stacks of new greenlets.

Every new greenlet gets a fresh 16 KiB chunk for its Python frames, which CPython (3.11+)
takes from its object arena allocator: an ``mmap``, a first-touch page fault and a
``munmap`` per greenlet, so per connection. ``install()`` puts a small C shim
(``greenserve._speedups``) in front of that allocator, with the public
``PyObject_SetArenaAllocator``: it serves requests of exactly one chunk from a free list
of page-aligned slots in one reservation and passes every other request through. See
docs/speedups.md for the measured effect.

It changes how the whole process allocates, so importing greenserve never installs it:
a library user calls ``install()``. The processes greenserve owns (the ``greenserve``
command, the gunicorn workers) call ``install_default()``, which ``GREENSERVE_SPEEDUPS=0``
turns off.

- ``install()`` returns False, and ``reason()`` says why, when the extension was not
  built (no compiler at install time) or the interpreter is one it refuses: a
  free-threaded build, a Python without a frame data stack (< 3.11), or one whose new
  greenlets do not take a chunk of the size the shim serves from the arena allocator
  and give it back to it. That is checked, not assumed: the first ``install()`` watches
  (shim in pass-through mode) one new greenlet run and end.
- At most ``keep`` free slots stay resident; every slot freed beyond that goes back to
  the OS at once (``madvise(MADV_DONTNEED)``). The rest of what a burst of connections
  leaves is glibc's: freed heap memory (greenlet stack copies, sockets, buffers) that
  glibc keeps. With ``trim_heap`` (the default), when the slots in use fall to a quarter
  of their peak (a peak of 256 or more), the shim calls ``malloc_trim(0)`` once, so RSS
  returns near its level before the burst.
- ``uninstall()`` with slots still in use (a suspended greenlet holds its slot: gevent's
  hub, for one) cannot take the shim out of the chain, since whoever frees a chunk calls
  the allocator installed at that moment: it stops handing out slots ("draining"), takes
  each back as it is freed and unmaps everything after the last. A later ``uninstall()``
  then removes it.
- The shim keeps its own lock: it does not rely on the GIL (3.11's callers hold it,
  except ``PyThreadState_Delete``, which may free a thread's chunks without it).
"""

from __future__ import annotations

import importlib
import logging
import os
import sysconfig
import threading
from dataclasses import dataclass
from typing import Protocol, TypedDict, cast

import greenlet

__all__ = [
    "DEFAULT_KEEP",
    "ENV",
    "Stats",
    "available",
    "install",
    "install_default",
    "installed",
    "reason",
    "stats",
    "trim",
    "uninstall",
]

DEFAULT_KEEP = 256  # free slots kept resident: at most 4 MiB, about 1 MiB in practice
ENV = "GREENSERVE_SPEEDUPS"  # "0" (or off/no/false): install_default() does nothing
_OFF_VALUES = ("0", "off", "no", "false")

log = logging.getLogger("greenserve.speedups")


class _RawStats(TypedDict):
    mode: str
    slot_size: int
    keep: int
    slots_in_use: int
    slots_free_resident: int
    slots_free_returned: int
    slots_carved: int
    bytes_reserved: int
    bytes_committed: int
    bytes_returned: int
    slots_handed_out: int
    overflow: int
    passed_through: int
    heap_trims: int


class _Extension(Protocol):
    """What greenserve/_speedups.c defines."""

    SLOT_SIZE: int
    UNSUPPORTED: str

    def observe(self) -> None: ...
    def events(self) -> tuple[list[tuple[str, int, int]], int]: ...
    def current_chunk(self) -> int | None: ...
    def activate(self, keep: int, trim_heap: bool, /) -> None: ...
    def deactivate(self) -> bool: ...
    def trim(self) -> int: ...
    def owns(self, address: int, /) -> bool: ...
    def stats(self) -> _RawStats: ...


@dataclass(frozen=True)
class Stats:
    """The shim's counters (all zero, mode ``"off"``, when the extension is missing)."""

    mode: str  # off | observe | active | draining
    slot_size: int
    keep: int  # free slots kept resident, at most
    slots_in_use: int
    slots_free_resident: int
    slots_free_returned: int  # free slots whose memory went back to the OS
    slots_carved: int  # slots ever used: the high-water mark of the reservation
    bytes_reserved: int  # address space only
    bytes_committed: int  # writable part of the reservation (commit charge, not RSS)
    bytes_returned: int  # given back with madvise since the module was loaded
    slots_handed_out: int  # since the module was loaded
    overflow: int  # chunk requests the original allocator served: reservation full
    passed_through: int  # requests served by the original allocator
    heap_trims: int  # malloc_trim(0) calls at the end of a burst (and by trim())


def _load() -> tuple[_Extension | None, str]:
    try:
        module = importlib.import_module("greenserve._speedups")
    except ImportError as exc:
        return None, f"the C extension greenserve._speedups is not built ({exc})"
    ext = cast(_Extension, module)
    if ext.UNSUPPORTED:
        return None, ext.UNSUPPORTED
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None, "free-threaded build: the shim is not written for it"
    return ext, ""


_ext, _unavailable = _load()
_lock = threading.Lock()
_verdict: str | None = None  # the probe's: "" fit, else why not; None before the first
_reason: str | None = _unavailable or None


def available() -> bool:
    """Whether the extension is built for this interpreter (``install()`` may still refuse
    it, after checking how new greenlets allocate)."""
    return _ext is not None


def reason() -> str | None:
    """Why ``install()`` returned False (before any call: why it would, if the extension
    is missing or unfit); None after one that succeeded."""
    return _reason


def installed() -> bool:
    """Whether the shim is handing out slots (not after ``uninstall()``, even draining)."""
    return _ext is not None and _ext.stats()["mode"] == "active"


def install(keep: int = DEFAULT_KEEP, trim_heap: bool = True) -> bool:
    """Install the accelerator, keeping at most ``keep`` free slots resident and, with
    ``trim_heap``, trimming glibc's heap at the end of a burst. True if it is installed
    (again: idempotent; new arguments apply at once), False with ``reason()`` if not.
    Never raises for an unfit interpreter."""
    global _reason
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    with _lock:
        if _ext is None:
            _reason = _unavailable
            return False
        problem = _check(_ext)
        if problem:
            _reason = problem
            return False
        _ext.activate(keep, trim_heap)
        _reason = None
        return True


def uninstall() -> bool:
    """Stop handing out slots. True if the original allocator is back; False while slots
    handed out are still in use (the shim then only takes them back: see the module's
    docstring). Idempotent. Raises ``RuntimeError`` if another arena allocator was
    installed over this one (removing ours would drop it)."""
    if _ext is None:
        return True
    with _lock:
        return _ext.deactivate()


def trim() -> int:
    """Give the memory of every free slot, and glibc's free heap memory, back to the OS
    now; returns the slots' bytes."""
    return 0 if _ext is None else _ext.trim()


def stats() -> Stats:
    """The shim's counters."""
    if _ext is None:
        return Stats("off", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    return Stats(**_ext.stats())


def install_default(enabled: bool = True) -> bool:
    """What the processes greenserve owns call once at start: ``install()`` unless
    ``enabled`` is False (the command's ``--no-speedups``) or ``GREENSERVE_SPEEDUPS=0``.
    Logs one DEBUG line either way, never raises for an unfit interpreter."""
    if not enabled:
        log.debug("speedups: off (turned off by the caller)")
        return False
    if os.environ.get(ENV, "").strip().lower() in _OFF_VALUES:
        log.debug("speedups: off (%s=%s)", ENV, os.environ[ENV])
        return False
    if install():
        log.debug("speedups: installed (frame-stack slots of %d bytes)", stats().slot_size)
        return True
    log.debug("speedups: not installed: %s", _reason)
    return False


def _check(ext: _Extension) -> str:
    """Probe once per process: "" if the interpreter suits the shim, else why not."""
    global _verdict
    if _verdict is None:
        mode = ext.stats()["mode"]
        _verdict = "" if mode in ("active", "draining") else _probe(ext)
    return _verdict


def _probe(ext: _Extension) -> str:
    """Watch one new greenlet take its frame-stack chunk and give it back, with the shim
    in the allocator chain passing everything through; take the shim out again unless the
    chunk is what it serves."""
    ext.observe()
    try:
        # A Python function: calling it pushes the greenlet's first frame, in a new chunk.
        chunk = greenlet.greenlet(lambda: ext.current_chunk()).switch()
        events, dropped = ext.events()
        problem = _judge(chunk, events, ext.SLOT_SIZE)
    except BaseException:
        ext.deactivate()
        raise
    if problem:
        if dropped:
            problem += f" ({dropped} allocator calls were not recorded)"
        ext.deactivate()
    return problem


def _judge(chunk: int | None, events: list[tuple[str, int, int]], slot_size: int) -> str:
    sizes = [size for kind, address, size in events if kind == "alloc" and address == chunk]
    if chunk is None or not sizes:
        return "a new greenlet's frame stack does not come from the arena allocator"
    if sizes[0] != slot_size:
        return (f"a new greenlet's frame-stack chunk is {sizes[0]} bytes; "
                f"the shim serves {slot_size}")
    if ("free", chunk, slot_size) not in events:
        return "a finished greenlet does not give its frame-stack chunk back to the allocator"
    return ""
