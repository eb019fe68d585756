"""Benchmark: ``bootstrap pull`` vs ``skopeo copy docker://... oci:DIR:t``, line by line.

Each line is an image on a registry of one kind, both on 127.0.0.1 with storage on tmpfs:

- ``large/plain``: the ~250 MB gzip, 5-layer image (:func:`bench.common.bench_spec`), plain HTTP;
- ``large/token``: the same image over TLS with token auth (the harness's token server);
- ``small/plain`` and ``small/token``: a ~52 MB, 6-layer image (:func:`bench.common.small_spec`);
- ``zstd/plain``: the small image with zstd layers, next to the gzip one.

For each line and several rounds, each tool pulls into a fresh directory on tmpfs, alternating
which goes first. Prints per-round times, the medians, the ratio ours/skopeo (target <= 0.8) and
the peak RSS of each (target for ours < 100 MB).

    .venv/bin/python bench/pull.py [--rounds N] [--lines large/plain,small/token,...]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    RSS_TARGET,
    SCRATCH_ROOT,
    bench_image,
    check,
    human,
    layout_size,
    log,
    machine_note,
    median,
    scratch,
    small_image,
    timed,
)
from tests.harness.registry import Registry, client_env

PULL_TARGET = 0.8
IMPORTS = (
    "import bootstrap.cli, bootstrap.image.api, bootstrap.image.registry, bootstrap.image.pull"
)
LINES = ("small/plain", "small/token", "large/plain", "large/token", "zstd/plain")


@contextlib.contextmanager
def served(layout: Path, mode: str) -> Iterator[tuple[str, dict[str, str], list[str]]]:
    """``layout``'s ``bench`` image on a fresh registry of ``mode``; yields (reference, the
    environment for bootstrap, skopeo's source flags)."""
    root = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=SCRATCH_ROOT))
    reg = Registry.create(mode, root)
    try:
        reg.push(layout, BENCH_TAG, "bench/image:latest")
        yield reg.ref("bench/image"), client_env(reg, root), reg.skopeo_src_args()
    finally:
        reg.close()
        shutil.rmtree(root, ignore_errors=True)


def run_line(line: str, rounds: int) -> dict[str, float]:
    kind, mode = line.split("/")
    layout = bench_image() if kind == "large" else small_image(kind == "zstd")
    size = layout_size(layout)
    print(f"\n== {line}: {human(size)} of blobs")
    with served(layout, mode) as (ref, env, src_args):

        def ours() -> tuple[float, int]:
            with scratch("bench-ours-") as d:
                run = check(timed([BOOTSTRAP, "-q", "--store", d, "pull", ref], env), "pull")
            return run.seconds, run.max_rss

        def skopeo() -> tuple[float, int]:
            with scratch("bench-skopeo-") as d:
                argv = ["skopeo", "copy", "--quiet", *src_args, f"docker://{ref}", f"oci:{d}/o:t"]
                run = check(timed(argv), "skopeo copy")
            return run.seconds, run.max_rss

        def floor() -> tuple[float, int]:
            run = check(timed([sys.executable, "-c", IMPORTS]), "imports")
            return run.seconds, run.max_rss

        ours()  # warm-up (registry caches), not counted
        skopeo()
        res: dict[str, list[tuple[float, int]]] = {"ours": [], "skopeo": [], "floor": []}
        print(f"{'round':>5}  {'bootstrap pull':>14}  {'skopeo copy':>11}")
        for i in range(rounds):
            order = (("ours", ours), ("skopeo", skopeo), ("floor", floor))
            for name, fn in order if i % 2 == 0 else reversed(order):
                res[name].append(fn())
            print(f"{i + 1:>5}  {res['ours'][-1][0]:>13.2f}s  {res['skopeo'][-1][0]:>10.2f}s")
    mf = median([t for t, _ in res["floor"]])
    mo = median([t for t, _ in res["ours"]])
    ms = median([t for t, _ in res["skopeo"]])
    peak = max(r for _, r in res["ours"])
    ratio = mo / ms
    verdict = "ok" if ratio <= PULL_TARGET else "MISSED"
    print(f"median  {mo:>13.2f}s  {ms:>10.2f}s")
    print(f"start-up floor (interpreter + pull-path imports): {mf:.3f}s = {mf / ms:.2f}x skopeo")
    print(f"ratio bootstrap/skopeo: {ratio:.2f} (target <= {PULL_TARGET}: {verdict})")
    print(
        f"peak RSS: bootstrap {human(peak)} "
        f"(target < {human(RSS_TARGET)}: {'ok' if peak < RSS_TARGET else 'MISSED'}), "
        f"skopeo {human(max(r for _, r in res['skopeo']))}"
    )
    return {"ours": mo, "skopeo": ms, "ratio": ratio, "rss": peak, "floor": mf}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of each tool (default 5)")
    p.add_argument("--lines", default=",".join(LINES), help=f"comma-separated of {LINES}")
    args = p.parse_args(argv)
    print(machine_note())
    summary = {}
    for line in args.lines.split(","):
        summary[line] = run_line(line, args.rounds)
        log(f"{line} done")
    print(f"\n{'line':<12} {'ours':>6} {'skopeo':>7} {'ratio':>6} {'RSS':>8} {'floor':>6}")
    for line, r in summary.items():
        print(
            f"{line:<12} {r['ours']:>5.2f}s {r['skopeo']:>6.2f}s {r['ratio']:>6.2f} "
            f"{human(r['rss']):>8} {r['floor']:>5.2f}s"
        )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
