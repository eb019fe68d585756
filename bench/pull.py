"""Benchmark: ``bootstrap pull`` vs ``skopeo copy docker://... oci:DIR:t``.

The same ~250 MB gzip, 5-layer image (see :func:`bench.common.bench_spec`) is pushed to a local
plain-HTTP docker-registry; then, for several rounds, each tool pulls it into a fresh directory
on tmpfs, alternating which goes first. Prints per-round times, the medians, the ratio
ours/skopeo (target <= 1.0) and the peak RSS of each (target for ours < 100 MB).

    .venv/bin/python bench/pull.py [--rounds N] [--jobs N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BOOTSTRAP,
    RSS_TARGET,
    bench_image,
    check,
    human,
    layout_size,
    log,
    machine_note,
    median,
    scratch,
    served_bench_image,
    skopeo_copy_argv,
    timed,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of each tool (default 5)")
    args = p.parse_args(argv)

    layout = bench_image()
    size = layout_size(layout)
    print(f"image: {human(size)} of blobs, 5 layers; {machine_note()}")
    with served_bench_image(layout) as (ref, env):

        def ours(i: int) -> tuple[float, int]:
            with scratch("bench-ours-") as d:
                run = check(timed([BOOTSTRAP, "-q", "--store", d, "pull", ref], env), "pull")
            return run.seconds, run.max_rss

        def skopeo(i: int) -> tuple[float, int]:
            with scratch("bench-skopeo-") as d:
                run = check(timed(skopeo_copy_argv(ref, d / "oci")), "skopeo copy")
            return run.seconds, run.max_rss

        ours(-1)  # warm-up (imports, registry caches), not counted
        skopeo(-1)
        ours_t: list[float] = []
        ours_rss: list[int] = []
        sk_t: list[float] = []
        sk_rss: list[int] = []
        print(f"{'round':>5}  {'bootstrap pull':>14}  {'skopeo copy':>11}")
        for i in range(args.rounds):
            order = (ours, skopeo) if i % 2 == 0 else (skopeo, ours)
            results = {}
            for fn in order:
                results[fn] = fn(i)
            ours_t.append(results[ours][0])
            ours_rss.append(results[ours][1])
            sk_t.append(results[skopeo][0])
            sk_rss.append(results[skopeo][1])
            print(f"{i + 1:>5}  {results[ours][0]:>13.2f}s  {results[skopeo][0]:>10.2f}s")
            log(f"round {i + 1}/{args.rounds} done")

    mo, ms = median(ours_t), median(sk_t)
    ratio = mo / ms
    peak = max(ours_rss)
    print(f"median  {mo:>13.2f}s  {ms:>10.2f}s")
    print(
        f"ratio bootstrap/skopeo: {ratio:.2f} (target <= 1.0: {'ok' if ratio <= 1.0 else 'MISSED'})"
    )
    print(
        f"peak RSS: bootstrap {human(peak)} "
        f"(target < {human(RSS_TARGET)}: {'ok' if peak < RSS_TARGET else 'MISSED'}), "
        f"skopeo {human(max(sk_rss))}"
    )
    print(f"throughput: bootstrap {human(size / mo)}/s, skopeo {human(size / ms)}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
