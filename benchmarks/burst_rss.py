#!/usr/bin/env python3
"""RSS before, at the peak of and after a burst of greenlets, with and without
greenserve.speedups (docs/speedups.md).

    python benchmarks/burst_rss.py                 # 50,000 greenlets, both ways
    python benchmarks/burst_rss.py --greenlets 20000 --rounds 3

Each way runs in a fresh interpreter: gevent's hub started and a warm-up burst of 1,000
greenlets, then RSS "before"; N greenlets are spawned and each blocks on one Event
(every one has started: a frame-stack chunk each), RSS "peak"; the event is set, all
finish, the process idles for --idle seconds, RSS "after". --rounds repeats the burst in
the same process (after the last round is reported). RSS is VmRSS of /proc/self/status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def burst(n: int) -> int:
    """Spawns n greenlets that all block, returns RSS while they do, then ends them."""
    import gevent
    from gevent.event import Event

    go = Event()
    greenlets = [gevent.spawn(go.wait) for _ in range(n)]
    gevent.sleep(0)  # every greenlet runs up to its wait
    gevent.sleep(0)
    peak = rss_kib()
    go.set()
    gevent.joinall(greenlets)
    del greenlets
    return peak


def child(args: argparse.Namespace) -> None:
    import gevent

    from greenserve import speedups

    on = speedups.install() if args.speedups else False
    if args.speedups and not on:
        sys.exit(f"speedups not installed: {speedups.reason()}")
    gevent.get_hub()
    burst(1000)  # warm-up: lazily built structures are not charged to the burst
    time.sleep(args.idle)
    before = rss_kib()
    peaks = []
    for _ in range(args.rounds):
        peaks.append(burst(args.greenlets))
        gevent.sleep(args.idle)
    after = rss_kib()
    stats = speedups.stats() if on else None
    print(json.dumps({
        "before": before, "peak": max(peaks), "after": after,
        "slots_free_resident": stats.slots_free_resident if stats else None,
        "bytes_returned": stats.bytes_returned if stats else None,
    }))


def parent(args: argparse.Namespace) -> None:
    print(f"{args.greenlets:,} greenlets blocking at once, {args.rounds} round(s), "
          f"{args.idle:g} s idle after each\n")
    print("| speedups | RSS before (MiB) | peak (MiB) | after (MiB) | after - before (MiB) |")
    print("|---|---:|---:|---:|---:|")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for on in (False, True):
        cmd = [sys.executable, __file__, "--child", "--greenlets", str(args.greenlets),
               "--rounds", str(args.rounds), "--idle", str(args.idle)]
        proc = subprocess.run(cmd + (["--speedups"] if on else []), capture_output=True,
                              text=True, env=env, timeout=600)
        if proc.returncode:
            print(f"| {'on' if on else 'off'} | failed: {proc.stderr.strip()[-200:]} |||||")
            continue
        r = json.loads(proc.stdout.splitlines()[-1])
        mib = {k: r[k] / 1024 for k in ("before", "peak", "after")}
        print(f"| {'on' if on else 'off'} | {mib['before']:.1f} | {mib['peak']:.1f} | "
              f"{mib['after']:.1f} | {mib['after'] - mib['before']:+.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--greenlets", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--idle", type=float, default=2.0, help="seconds idle after each burst")
    p.add_argument("--speedups", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    (child if args.child else parent)(args)


if __name__ == "__main__":
    main()
