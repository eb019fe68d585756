"""Profile: where the CPU of one ``bootstrap pull`` goes, sampled with py-spy.

The small benchmark image (:func:`bench.common.small_image`, 53 MB, 6 layers) on a fresh
plain-HTTP registry on 127.0.0.1; each round pulls it into a fresh store on tmpfs, once timed
(CPU seconds, user + sys, from ``wait4``) and once under ``py-spy record`` (every thread,
samples of running threads only). Each sample is put in one bucket by its stack: start-up
(imports: a frame of ``importlib._bootstrap``; the interpreter's own start and exit show as
samples without a Python frame), hashing (the sampled line
calls ``update``/``hexdigest``), writes to the store (``write``/``fsync``/``rename`` lines of
the store), network (socket, http.client, urllib3, ssl frames), other. Prints the median CPU
per pull and each bucket's share of the samples and of that CPU.

    .venv/bin/python bench/profile.py [--rounds N] [--rate HZ] [--keep DIR]
"""

from __future__ import annotations

import argparse
import linecache
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    check,
    machine_note,
    median,
    scratch,
    served_bench_image,
    small_image,
    timed,
)

PY_SPY = Path(sys.executable).parent / "py-spy"
NETWORK = ("socket.py", "http/client.py", "urllib3/", "ssl.py", "requests/")
BUCKETS = (
    "interpreter (no Python frame)",
    "start-up and imports",
    "hashing",
    "store writes",
    "network",
    "other",
)


def bucket(stack: str) -> str:
    """The bucket of one py-spy raw stack (``frame;frame;...``, leaf last, each frame
    ``function (file:line)``)."""
    if not stack.strip():
        return "interpreter (no Python frame)"
    frames = stack.split(";")
    if any("importlib._bootstrap" in f or "<frozen importlib" in f for f in frames):
        return "start-up and imports"
    leaf = frames[-1]
    source = ""
    if leaf.endswith(")") and " (" in leaf:
        where = leaf.rsplit(" (", 1)[1][:-1]
        path, _, line = where.rpartition(":")
        if line.isdigit():
            source = linecache.getline(path, int(line))
    if ".update(" in source or "hexdigest" in source:
        return "hashing"
    if "bootstrap/image/store.py" in leaf and any(
        k in source for k in ("write(", "fsync", "replace(", "rename(", "mkstemp", "fchmod")
    ):
        return "store writes"
    if any(k in leaf for k in NETWORK):
        return "network"
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--keep", type=Path, help="keep py-spy's raw profiles in this directory")
    args = p.parse_args(argv)
    if not PY_SPY.exists():
        print(f"{PY_SPY} is missing: pip install py-spy (the dev extra)", file=sys.stderr)
        return 2
    print(machine_note())
    counts: Counter[str] = Counter()
    print(f"pulls of the small image ({BENCH_TAG}) from a plain registry on 127.0.0.1")
    cpu: list[float] = []
    out = Path(tempfile.mkdtemp(prefix="bench-profile-")) if args.keep is None else args.keep
    out.mkdir(parents=True, exist_ok=True)
    try:
        with served_bench_image(small_image()) as (ref, env):
            for i in range(args.rounds + 1):
                with scratch("bench-prof-") as d:
                    argv_ = [BOOTSTRAP, "-q", "--store", d / "s", "pull", ref]
                    run = check(timed(argv_, env), "pull")
                    raw = out / f"pull-{i}.txt"
                    spy = [PY_SPY, "record", "-r", str(args.rate), "--nonblocking"]
                    spy += ["--full-filenames", "-f", "raw"]
                    spy += ["-o", raw, "--", *argv_[:3], d / "s2", "pull", ref]
                    profiled = subprocess.run(
                        [str(a) for a in spy],
                        cwd=d,
                        env={**__import__("os").environ, **env},
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    if profiled.returncode != 0 or not (d / "s2" / "oci" / "index.json").exists():
                        raise SystemExit(f"profiled pull failed: {profiled.stderr[-2000:]!r}")
                if i == 0:
                    continue  # warm-up
                cpu.append(run.cpu)
                for line in raw.read_text().splitlines():
                    stack, _, n = line.rpartition(" ")
                    if n.isdigit():
                        counts[bucket(stack)] += int(n)
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    total = sum(counts.values()) or 1
    per_pull = median(cpu)
    print(f"CPU per pull (user + sys, median of {len(cpu)}): {per_pull:.3f}s")
    print("| bucket | share of samples | ~CPU s per pull |")
    print("|---|---|---|")
    for name in BUCKETS:
        share = counts[name] / total
        print(f"| {name} | {share:.0%} | {share * per_pull:.3f} |")
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
