"""Benchmark: how long :func:`bootstrap.locks.flocked` waits for a lock another open file holds.

A lock file on tmpfs is held exclusively through a descriptor of its own (flock locks belong to
the open file description, so this is what another process holding it looks like). Each round
times:

- ``timeout 0``: the one try of ``flocked(timeout=0)`` and its ``BusyError``;
- ``timeout T`` (``--timeout``, default 0.3 s): polling until the deadline, then ``BusyError``;
- ``handover``: a waiter with a long timeout while the holder lets go after 0.2 s: the seconds
  from the release until the waiter holds the lock (its poll interval, doubling from 10 ms up
  to 200 ms).

Targets (what tests/test_core.py checks by counting tries, timed here): ``timeout 0`` < 5 ms;
``timeout T`` between T and T + 0.2 s (it never gives up early, and oversleeps at most one
poll); ``handover`` < 0.2 s.

    .venv/bin/python bench/locks.py [--rounds N] [--timeout T]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log, machine_note, median, scratch
from bootstrap.errors import BusyError
from bootstrap.locks import flocked

POLL_MAX = 0.2
"""The longest sleep between two tries of flocked (its poll interval's cap)."""


def hold(path: Path) -> int:
    """An open descriptor of ``path`` holding its exclusive flock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def gives_up(path: Path, timeout: float) -> float:
    """Seconds until ``flocked(path, timeout=timeout)`` raises BusyError (it must)."""
    started = time.monotonic()
    try:
        with flocked(path, timeout=timeout, what="bench"):
            pass
    except BusyError:
        return time.monotonic() - started
    raise SystemExit(f"{path} was had although another descriptor holds it")


def handover(path: Path, after: float) -> float:
    """Seconds from the holder's release (``after`` seconds in) until a waiter holds it."""
    fd = hold(path)
    released: list[float] = []

    def let_go() -> None:
        time.sleep(after)
        released.append(time.monotonic())
        os.close(fd)

    thread = threading.Thread(target=let_go)
    thread.start()
    with flocked(path, timeout=after + 10, what="bench"):
        had = time.monotonic()
    thread.join()
    return had - released[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="rounds of each case (default 15)")
    p.add_argument("--timeout", type=float, default=0.3, help="the timeout T (default 0.3 s)")
    args = p.parse_args(argv)
    print(machine_note())
    t = args.timeout
    times: dict[str, list[float]] = {"timeout 0": [], f"timeout {t:g}": [], "handover": []}
    with scratch("bench-locks-") as work:
        lock = work / "x.lock"
        for i in range(args.rounds):
            fd = hold(lock)
            try:
                times["timeout 0"].append(gives_up(lock, 0))
                times[f"timeout {t:g}"].append(gives_up(lock, t))
            finally:
                os.close(fd)
            times["handover"].append(handover(lock, 0.2))
            log(f"round {i + 1}/{args.rounds} done")
    bounds = {
        "timeout 0": (0.0, 0.005),
        f"timeout {t:g}": (t, t + POLL_MAX),
        "handover": (0.0, POLL_MAX),
    }
    print(f"{'case':<14} {'median':>8} {'min':>8} {'max':>8}  target")
    for name, ts in times.items():
        low, high = bounds[name]
        m = median(ts)
        ok = low <= min(ts) and m < high
        print(
            f"{name:<14} {m:>7.3f}s {min(ts):>7.3f}s {max(ts):>7.3f}s  "
            f"{low:g}-{high:g}s {'ok' if ok else 'MISSED'}"
        )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
