"""Benchmark: a cold pull + checkout in one pass against the serial ``tar -xzf`` floor.

The benchmark image (:func:`bench.common.bench_image`) is served by a fresh plain-HTTP
registry on 127.0.0.1; each round, on tmpfs:
- one pass: ``pull_image(..., extract=...)`` (every layer inflated into the layer cache while
  it downloads, layers concurrently) then ``checkout`` into a new DEST, in one child process
  (what ``install``/``up`` do for an image not yet stored);
- two passes: ``bootstrap pull REF`` then ``bootstrap checkout REF DEST`` (download, then
  extract from the stored blobs);
- floor: ``tar -xzf`` of each layer blob in order into one dir (no download, no verification).
Prints the medians, one pass / floor (target <= 0.8) and the one-pass child's peak RSS (target
< 100 MB, GNU time).

    .venv/bin/python bench/onepass.py [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    bench_image,
    check,
    human,
    machine_note,
    median,
    scratch,
    served_bench_image,
    timed,
)
from bench.unpack import layer_blobs

TARGET = 0.8
RSS_TARGET = 100 * 1024 * 1024
ONE_PASS = """
import sys
from pathlib import Path
from bootstrap.image.pull import pull_image
from bootstrap.image.reference import Reference
from bootstrap.image.store import Store
from bootstrap.image.unpack import UnpackOptions, checkout
store = Store(Path(sys.argv[1]))
image = pull_image(store, Reference.parse(sys.argv[2]), extract=UnpackOptions()).image
assert checkout(store, image, Path(sys.argv[3])).extracted == 0
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    layout = bench_image()
    blobs = layer_blobs(layout, BENCH_TAG)
    rows: dict[str, list[float]] = {"one": [], "two": [], "tar": [], "rss": []}
    print(machine_note())
    with served_bench_image(layout) as (ref, env):
        for i in range(args.rounds + 1):
            with scratch("bench-1p-") as d:
                run = check(
                    timed([sys.executable, "-c", ONE_PASS, d / "store", ref, d / "root"], env),
                    "one-pass pull + checkout",
                )
                one, rss = run.seconds, run.max_rss
            with scratch("bench-2p-") as d:
                base = [BOOTSTRAP, "-q", "--store", d / "store"]
                two = check(timed([*base, "pull", ref], env), "pull").seconds
                two += check(timed([*base, "checkout", ref, d / "root"], env), "checkout").seconds
            with scratch("bench-tar-") as d:
                script = "; ".join(f"tar -xzf {b} -C {d}" for b in blobs)
                tar = check(timed(["sh", "-ec", script]), "tar -xzf").seconds
            if i == 0:
                continue  # warm-up: page caches, imports
            for key, value in zip(rows, (one, two, tar, float(rss)), strict=True):
                rows[key].append(value)
            print(
                f"round {i}: one pass {one:.2f}s ({human(rss)}) two passes {two:.2f}s "
                f"tar {tar:.2f}s"
            )
    m = {k: median(v) for k, v in rows.items()}
    peak = max(rows["rss"])
    ratio = m["one"] / m["tar"]
    print(f"median: one pass {m['one']:.2f}s, two passes {m['two']:.2f}s, tar -xzf {m['tar']:.2f}s")
    print(
        f"one pass / tar -xzf floor: {ratio:.2f} (target <= {TARGET}: "
        f"{'ok' if ratio <= TARGET else 'MISSED'}); two passes / floor: {m['two'] / m['tar']:.2f}"
    )
    print(
        f"peak RSS one pass: {human(peak)} (target < {human(RSS_TARGET)}: "
        f"{'ok' if peak < RSS_TARGET else 'MISSED'})"
    )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
