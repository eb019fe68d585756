"""Benchmark: start-up cost of every ``bootstrap`` command that needs no network.

Each command runs against a fresh store and state directory on tmpfs holding one imported
image (so ``images``/``fsck``/``gc`` have something to read), many rounds, alternating with the
floor ``python -c pass`` of the same interpreter. Prints the median wall time of each, the
median minus the floor (what bootstrap itself adds) and the verdict against the target
(< 150 ms per command, interpreter start-up included).

    .venv/bin/python bench/startup.py [--rounds N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BOOTSTRAP, check, log, machine_note, median, scratch, timed

TARGET = 0.150
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("--help",),
    ("--version",),
    ("pull", "--help"),
    ("images",),
    ("images", "--json"),
    ("list",),
    ("status", "--help"),
    ("fsck",),
    ("gc",),
    ("up", "--help"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="rounds of each command (default 15)")
    args = p.parse_args(argv)
    print(machine_note())
    with scratch("bench-startup-") as d:
        store, state = d / "store", d / "state"
        root = d / "rootfs"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "hostname").write_text("bench\n")
        with tarfile.open(d / "rootfs.tar", "w") as tar:
            tar.add(root, arcname=".")
        base = [str(BOOTSTRAP), "-q", "--store", str(store), "--state", str(state)]
        subprocess.run(
            [*base, "import", str(d / "rootfs.tar"), "--name", "bench/startup:1"],
            check=True,
            capture_output=True,
        )
        floor_t: list[float] = []
        times: dict[tuple[str, ...], list[float]] = {c: [] for c in COMMANDS}
        for i in range(args.rounds):
            for cmd in COMMANDS if i % 2 == 0 else tuple(reversed(COMMANDS)):
                floor_t.append(check(timed([sys.executable, "-c", "pass"]), "python").seconds)
                times[cmd].append(check(timed([*base, *cmd]), " ".join(cmd)).seconds)
            log(f"round {i + 1}/{args.rounds} done")
    floor = median(floor_t)
    print(f"floor `python -c pass`: {floor * 1000:.0f} ms")
    print(f"{'command':<20} {'median':>7} {'minus floor':>12}  target < {TARGET * 1000:.0f} ms")
    worst = 0.0
    for cmd, ts in times.items():
        m = median(ts)
        worst = max(worst, m)
        verdict = "ok" if m < TARGET else "MISSED"
        name = " ".join(cmd)
        print(f"{name:<20} {m * 1000:>5.0f}ms {(m - floor) * 1000:>10.0f}ms  {verdict}")
    print(f"slowest {worst * 1000:.0f} ms; {machine_note().replace('at start', 'at end')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
