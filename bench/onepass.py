"""Benchmark: a cold pull + checkout in one pass against the serial ``tar -x`` floor.

The benchmark image (:func:`bench.common.bench_image`), once with gzip layers and once with
the same files in zstd layers, is served by a fresh plain-HTTP registry on 127.0.0.1; each
round, on tmpfs, per compression:
- one pass: ``bootstrap checkout REF DEST`` into an empty store (the image is pulled with every
  layer inflated into the layer cache while it downloads, then the rootfs is composed: files
  of its own, copies on tmpfs);
- one pass, ``--hardlink``: the same, the rootfs of hardlinks into the cache (what a
  deployment's overlay lower tree costs);
- two passes: ``bootstrap pull REF`` then ``bootstrap checkout --pull never REF DEST``;
- floor: ``tar -xzf`` (``tar --zstd -xf``) of each layer blob in order into one dir (no
  download, no verification).
Prints the medians, one pass / floor (target <= 1.0) and the one-pass peak RSS (target
< 100 MB, GNU time).

    .venv/bin/python bench/onepass.py [--rounds N] [--compression gzip|zstd|both]
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

TARGET = 1.0
RSS_TARGET = 100 * 1024 * 1024
TAR_FLAGS = {"gzip": "-xzf", "zstd": "--zstd -xf"}


def line(compression: str, rounds: int) -> dict[str, float]:
    """Rounds of one compression; returns the medians (and the peak RSS as ``rss``)."""
    layout = bench_image(zstd=compression == "zstd")
    blobs = layer_blobs(layout, BENCH_TAG)
    rows: dict[str, list[float]] = {"one": [], "hard": [], "two": [], "tar": [], "rss": []}
    with served_bench_image(layout) as (ref, env):
        for i in range(rounds + 1):
            with scratch("bench-1p-") as d:
                base = [BOOTSTRAP, "-q", "--store", d / "store"]
                run = check(timed([*base, "checkout", ref, d / "root"], env), "checkout")
                one, rss = run.seconds, run.max_rss
            with scratch("bench-1ph-") as d:
                base = [BOOTSTRAP, "-q", "--store", d / "store"]
                argv = [*base, "checkout", "--hardlink", ref, d / "root"]
                hard = check(timed(argv, env), "checkout --hardlink").seconds
            with scratch("bench-2p-") as d:
                base = [BOOTSTRAP, "-q", "--store", d / "store"]
                two = check(timed([*base, "pull", ref], env), "pull").seconds
                argv = [*base, "checkout", "--pull", "never", ref, d / "root"]
                two += check(timed(argv, env), "checkout").seconds
            with scratch("bench-tar-") as d:
                flags = TAR_FLAGS[compression]
                script = "; ".join(f"tar {flags} {b} -C {d}" for b in blobs)
                tar = check(timed(["sh", "-ec", script]), "tar -x").seconds
            if i == 0:
                continue  # warm-up: page caches, imports
            for key, value in zip(rows, (one, hard, two, tar, float(rss)), strict=True):
                rows[key].append(value)
            print(
                f"{compression} round {i}: one pass {one:.2f}s ({human(rss)}), --hardlink "
                f"{hard:.2f}s, two passes {two:.2f}s, tar {tar:.2f}s",
                flush=True,
            )
    m = {k: median(v) for k, v in rows.items() if k != "rss"}
    m["rss"] = max(rows["rss"])
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compression", choices=("gzip", "zstd", "both"), default="both")
    args = p.parse_args(argv)
    kinds = ["gzip", "zstd"] if args.compression == "both" else [args.compression]
    print(machine_note())
    results = {kind: line(kind, args.rounds) for kind in kinds}
    print(
        "| layers | one pass (copies) | one pass (--hardlink) | two passes | tar -x floor "
        "| one pass / floor | --hardlink / floor | two passes / floor | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    missed = False
    for kind, m in results.items():
        ratio = m["one"] / m["tar"]
        missed |= ratio > TARGET or m["rss"] >= RSS_TARGET
        print(
            f"| {kind} | {m['one']:.2f} s | {m['hard']:.2f} s | {m['two']:.2f} s "
            f"| {m['tar']:.2f} s | {ratio:.2f} | {m['hard'] / m['tar']:.2f} "
            f"| {m['two'] / m['tar']:.2f} | {human(m['rss'])} |"
        )
    print(
        f"targets: one pass <= {TARGET} x floor, peak RSS < {human(RSS_TARGET)}: "
        + ("MISSED (see docs/performance.md for what bounds it)" if missed else "ok")
    )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
