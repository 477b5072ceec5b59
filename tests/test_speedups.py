"""greenserve.speedups, the optional C accelerator for greenlet frame stacks.

It changes how the whole process allocates, so each test runs its scenario in a fresh
interpreter (a script; its last line of output is JSON the test checks): installing it
here would change the rest of the suite's process. The tests skip only when the
extension is not built (no compiler when greenserve was installed), with the reason;
the fallback test runs either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from greenserve import speedups

ROOT = Path(__file__).parent.parent
SLOT = 16384

needs_extension = pytest.mark.skipif(
    not speedups.available(), reason=f"speedups not available: {speedups.reason()}")

# Prepended to every script: ctypes access to the arena allocator the interpreter uses
# right now, to call it directly and to compare it with what was there before.
PRELUDE = """
import ctypes, gc, json, sys
import greenlet, gevent
from greenserve import speedups
from greenserve import _speedups as ext

ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

class Arena(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]

def arena():
    a = Arena()
    ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(a))
    return a

def set_arena(a):
    ctypes.pythonapi.PyObject_SetArenaAllocator(ctypes.byref(a))

def report(**values):
    print(json.dumps(values))
"""


def run(script: str, **env: str) -> dict[str, Any]:
    """Runs PRELUDE + script in a fresh interpreter; its last output line, as JSON."""
    code = PRELUDE + textwrap.dedent(script)
    inherited = {k: v for k, v in os.environ.items()  # a tox env's own switches
                 if k not in (speedups.ENV, "GREENSERVE_SPEEDUPS_TESTS")}
    full_env = {**inherited, **env, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"script failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


@needs_extension
def test_only_requests_of_one_chunk_get_slots() -> None:
    r = run("""
        assert speedups.install(), speedups.reason()
        a = arena()
        alloc, free = ALLOC(a.alloc), FREE(a.free)
        owned = {}
        for size in (4096, 8192, SLOT - 8, SLOT, SLOT + 4096, 2 * SLOT, 256 << 10, 1 << 20):
            p = alloc(a.ctx, size)
            ctypes.memset(p, 0xA5, size)  # writable, all of it
            owned[size] = ext.owns(p) and p % 4096 == 0
            free(a.ctx, p, size)
        report(owned=owned, in_use=speedups.stats().slots_in_use)
    """.replace("SLOT", str(SLOT)))
    assert r["owned"] == {str(s): s == SLOT for s in
                          (4096, 8192, SLOT - 8, SLOT, SLOT + 4096, 2 * SLOT, 256 << 10, 1 << 20)}
    assert r["in_use"] == 0


@needs_extension
def test_pymalloc_arenas_and_big_frames_pass_through() -> None:
    r = run("""
        assert speedups.install(), speedups.reason()
        before = speedups.stats()
        # ~100 MiB of small objects: pymalloc takes ~100 arenas of 1 MiB, then frees them.
        data = [(i, str(i)) for i in range(1_000_000)]
        total = sum(i for i, s in data if int(s) == i)
        del data
        gc.collect()
        # A frame bigger than a chunk: its greenlet's first chunk is 32 KiB or more.
        names = [f"v{i}" for i in range(2500)]
        src = "def big():\\n" + "".join(f"    {n} = {i}\\n" for i, n in enumerate(names))
        src += "    return " + " + ".join(names[-3:]) + "\\n"
        ns = {}
        exec(src, ns)
        big_result = greenlet.greenlet(ns["big"]).switch()
        after = speedups.stats()
        report(total=total, big=big_result,
               passed=after.passed_through - before.passed_through,
               handed_out=after.slots_handed_out - before.slots_handed_out,
               in_use=after.slots_in_use)
    """)
    assert r["total"] == sum(range(1_000_000))
    assert r["big"] == 2497 + 2498 + 2499
    assert r["passed"] >= 50  # pymalloc's arenas and the big chunk, from the original
    assert r["handed_out"] <= 2  # nothing of that took a slot (the gc may run a greenlet)
    assert r["in_use"] == 0


@needs_extension
def test_many_gevent_greenlets_work_and_give_their_slots_back() -> None:
    r = run("""
        assert speedups.install(), speedups.reason()

        def depth(n):  # deep enough to chain several chunks
            return 0 if n == 0 else 1 + depth(n - 1)

        def work(i):
            gevent.sleep(0)
            if i % 7 == 0:
                raise ValueError(i)
            return depth(300) + i

        gs = [gevent.spawn(work, i) for i in range(10_000)]
        gevent.joinall(gs)
        ok = all(g.value == 300 + i for i, g in enumerate(gs) if i % 7)
        failed = sum(isinstance(g.exception, ValueError) for g in gs)
        s = speedups.stats()
        report(ok=ok, failed=failed, in_use=s.slots_in_use, handed_out=s.slots_handed_out,
               resident=s.slots_free_resident, keep=s.keep)
    """)
    assert r["ok"] and r["failed"] == len(range(0, 10_000, 7))
    assert r["handed_out"] >= 10_000
    assert r["in_use"] == 1  # gevent's hub, suspended: its own chunk
    assert r["resident"] <= r["keep"]


@needs_extension
def test_memory_goes_back_after_a_burst() -> None:
    r = run("""
        import resource
        from gevent.event import Event

        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

        assert speedups.install(keep=100), speedups.reason()
        gevent.get_hub()

        def burst():
            go = Event()
            gs = [gevent.spawn(go.wait) for _ in range(20_000)]
            gevent.sleep(0)
            peak, at_peak = rss(), speedups.stats()
            go.set()
            gevent.joinall(gs)
            return peak, at_peak

        burst()  # the first burst also builds what stays: lazily made structures
        before = rss()
        peak, at_peak = burst()
        after, stats = rss(), speedups.stats()
        trimmed = speedups.trim()
        report(before=before, peak=peak, after=after, peak_in_use=at_peak.slots_in_use,
               in_use=stats.slots_in_use, resident=stats.slots_free_resident,
               returned=stats.bytes_returned - at_peak.bytes_returned,
               heap_trims=stats.heap_trims - at_peak.heap_trims, trimmed=trimmed,
               resident_after_trim=speedups.stats().slots_free_resident)
    """)
    assert r["peak_in_use"] >= 20_000
    assert r["in_use"] == 1 and r["resident"] == 100
    # Every slot freed beyond the 100 kept resident went back to the OS...
    assert r["returned"] == (r["peak_in_use"] - 1 - 100) * SLOT
    # ... and so did glibc's heap, trimmed as the burst ended (20,000 -> 5,000 -> 1,250 ->
    # 312 -> 78 in use: four trims).
    assert r["heap_trims"] == 4
    assert r["after"] - r["before"] < (r["peak"] - r["before"]) / 10, r
    # trim() returns the 100 resident slots too.
    assert r["trimmed"] == 100 * SLOT and r["resident_after_trim"] == 0


@needs_extension
def test_the_heap_is_left_alone_without_trim_heap() -> None:
    r = run("""
        assert speedups.install(trim_heap=False), speedups.reason()
        gevent.joinall([gevent.spawn(gevent.sleep, 0) for _ in range(5_000)])
        report(heap_trims=speedups.stats().heap_trims)
    """)
    assert r["heap_trims"] == 0


@needs_extension
def test_install_and_uninstall_are_idempotent_and_uninstall_waits_for_live_slots() -> None:
    r = run("""
        original = arena().alloc
        steps = {}
        steps["install"] = [speedups.install(), speedups.install(), speedups.installed()]
        g = greenlet.greenlet(lambda: greenlet.getcurrent().parent.switch())
        g.switch()  # suspended: it holds a slot
        steps["in_use"] = speedups.stats().slots_in_use
        steps["uninstall"] = [speedups.uninstall(), speedups.uninstall(), speedups.installed()]
        steps["mode"] = speedups.stats().mode
        handed_out = speedups.stats().slots_handed_out
        greenlet.greenlet(lambda: None).switch()  # draining: no slot for a new one
        steps["no_new_slot"] = speedups.stats().slots_handed_out == handed_out
        g.switch()  # ends: its slot comes back, and the reservation is unmapped
        steps["drained"] = [speedups.stats().slots_in_use, speedups.stats().bytes_reserved]
        steps["removed"] = [speedups.uninstall(), speedups.uninstall(), speedups.stats().mode,
                            arena().alloc == original]
        steps["again"] = [speedups.install(), speedups.installed(), arena().alloc != original]
        greenlet.greenlet(lambda: None).switch()
        steps["slot_again"] = speedups.stats().slots_handed_out == handed_out + 1
        report(**steps)
    """)
    assert r == {
        "install": [True, True, True], "in_use": 1,
        "uninstall": [False, False, False], "mode": "draining", "no_new_slot": True,
        "drained": [0, 0], "removed": [True, True, "off", True],
        "again": [True, True, True], "slot_again": True,
    }


@needs_extension
def test_uninstall_refuses_to_drop_an_allocator_installed_over_it() -> None:
    r = run("""
        before = arena()
        assert speedups.install(), speedups.reason()
        ours = arena()
        set_arena(before)  # someone else replaces the arena allocator
        try:
            speedups.uninstall()
            refused = None
        except RuntimeError as exc:
            refused = str(exc)
        set_arena(ours)
        removed = speedups.uninstall()
        report(refused=refused, removed=removed, restored=arena().alloc == before.alloc)
    """)
    assert "another arena allocator" in r["refused"]
    assert r["removed"] is True and r["restored"] is True


@needs_extension
def test_an_unfit_interpreter_is_refused_and_the_allocator_left_as_it_was() -> None:
    r = run("""
        original = arena().alloc
        speedups._judge = lambda chunk, events, size: "a chunk of another size"
        report(installed=speedups.install(), reason=speedups.reason(),
               mode=speedups.stats().mode, untouched=arena().alloc == original)
    """)
    assert r == {"installed": False, "reason": "a chunk of another size", "mode": "off",
                 "untouched": True}


def test_the_probe_judges_what_it_saw() -> None:
    judge = speedups._judge
    a = 0x7F0000000000
    assert judge(a, [("alloc", a, SLOT), ("free", a, SLOT)], SLOT) == ""
    assert "32768 bytes" in judge(a, [("alloc", a, 32768), ("free", a, 32768)], SLOT)
    assert "does not come from the arena" in judge(a, [("alloc", a + SLOT, SLOT)], SLOT)
    assert "does not come from the arena" in judge(None, [], SLOT)
    assert "does not give" in judge(a, [("alloc", a, SLOT)], SLOT)


@needs_extension
def test_threads_and_fork() -> None:
    r = run("""
        import os, threading
        assert speedups.install(), speedups.reason()

        def in_thread():
            gs = [greenlet.greenlet(lambda i=i: i * 2) for i in range(500)]
            assert [g.switch() for g in gs] == [i * 2 for i in range(500)]

        threads = [threading.Thread(target=in_thread) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        in_use_after_threads = speedups.stats().slots_in_use
        pid = os.fork()
        if pid == 0:  # the child allocates and frees through the inherited shim
            ok = greenlet.greenlet(lambda: 42).switch() == 42
            os._exit(0 if ok and speedups.installed() else 1)
        _, status = os.waitpid(pid, 0)
        report(in_use=in_use_after_threads, child=status)
    """)
    assert r == {"in_use": 0, "child": 0}


def test_without_the_extension_install_says_why_and_changes_nothing() -> None:
    # Runs whether or not the extension is built: its import is made to fail.
    code = textwrap.dedent("""
        import importlib.abc, json, logging, sys

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "greenserve._speedups":
                    raise ImportError("hidden by the test")

        sys.meta_path.insert(0, Hide())
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append((record.levelname, record.getMessage()))
        logging.getLogger("greenserve").addHandler(handler)
        logging.getLogger("greenserve").setLevel(logging.DEBUG)
        from greenserve import speedups
        print(json.dumps({
            "available": speedups.available(), "install": speedups.install(),
            "reason": speedups.reason(), "installed": speedups.installed(),
            "uninstall": speedups.uninstall(), "mode": speedups.stats().mode,
            "trim": speedups.trim(), "default": speedups.install_default(), "log": lines,
        }))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(speedups.ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    r = json.loads(proc.stdout)
    assert "not built" in r["reason"] and "hidden by the test" in r["reason"]
    assert r["log"] == [["DEBUG", f"speedups: not installed: {r['reason']}"]]
    del r["reason"], r["log"]
    assert r == {"available": False, "install": False, "installed": False,
                 "uninstall": True, "mode": "off", "trim": 0, "default": False}


@needs_extension
@pytest.mark.parametrize(("env", "enabled", "expected"), [
    ({}, True, True), ({"GREENSERVE_SPEEDUPS": "0"}, True, False),
    ({"GREENSERVE_SPEEDUPS": "off"}, True, False), ({}, False, False),
])
def test_install_default_follows_the_switches(env: dict[str, str], enabled: bool,
                                              expected: bool) -> None:
    r = run(f"""
        import logging
        lines = []
        handler = logging.Handler()
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger("greenserve.speedups").addHandler(handler)
        logging.getLogger("greenserve.speedups").setLevel(logging.DEBUG)
        report(result=speedups.install_default({enabled}), installed=speedups.installed(),
               log=lines)
    """, **env)
    assert r["result"] is expected and r["installed"] is expected
    assert len(r["log"]) == 1 and r["log"][0].startswith(
        "speedups: installed" if expected else "speedups: off")


def test_stats_without_the_extension_are_zero() -> None:
    if speedups.available():
        assert speedups.stats().slot_size == SLOT
    else:
        assert speedups.stats() == speedups.Stats("off", *[0] * 13)
