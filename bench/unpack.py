"""Benchmark: cold ``bootstrap pull`` + ``bootstrap checkout`` vs ``skopeo copy`` + ``umoci
unpack``, and ``bootstrap checkout`` vs the floor, ``tar -xzf`` of the same layers in order.

The ~250 MB gzip, 5-layer image (:func:`bench.common.bench_spec`) is pushed to a local plain-HTTP
docker-registry. Each round, alternating which goes first, in fresh directories on tmpfs:

- ours: ``bootstrap pull REF`` into an empty store, then ``bootstrap checkout REF DEST`` (cold:
  every layer extracted into the layer cache, then composed), then a second ``checkout`` into
  another DEST (warm: everything cached, files copied or reflinked; see bench/checkout.py
  for the deployment mount);
- reference: ``skopeo copy docker://REF oci:DIR:t`` then ``umoci unpack --image DIR:t BUNDLE``;
- floor: ``tar -xzf`` of each layer blob (from the image layout, page-cached) into one dir.

Prints per-round times, medians, the ratios against the targets (pull+checkout <= 0.7x
skopeo+umoci, cold checkout <= 1.3x the tar floor, warm checkout <= 1 s) and peak RSS
(target < 100 MB).

    .venv/bin/python bench/unpack.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
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


def layer_blobs(layout: Path, tag: str) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_text())
    return [layout / "blobs/sha256" / la["digest"][7:] for la in manifest["layers"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds of each (default 5)")
    args = p.parse_args(argv)

    layout = bench_image()
    blobs = layer_blobs(layout, BENCH_TAG)
    print(f"image: {human(layout_size(layout))} of blobs, {len(blobs)} layers; {machine_note()}")
    rows: dict[str, list[float]] = {
        k: [] for k in ("pull", "checkout", "warm", "skopeo", "umoci", "tar")
    }
    rss: dict[str, list[int]] = {k: [] for k in ("pull", "checkout", "warm", "skopeo", "umoci")}
    with served_bench_image(layout) as (ref, env):

        def ours(record: bool) -> None:
            with scratch("bench-ours-") as d:
                store = d / "store"
                pull = check(timed([BOOTSTRAP, "-q", "--store", store, "pull", ref], env), "pull")
                co = check(
                    timed([BOOTSTRAP, "-q", "--store", store, "checkout", ref, d / "r1"], env),
                    "checkout",
                )
                warm = check(
                    timed([BOOTSTRAP, "-q", "--store", store, "checkout", ref, d / "r2"], env),
                    "warm checkout",
                )
            if record:
                for key, run in (("pull", pull), ("checkout", co), ("warm", warm)):
                    rows[key].append(run.seconds)
                    rss[key].append(run.max_rss)

        def reference(record: bool) -> None:
            with scratch("bench-ref-") as d:
                sk = check(timed(skopeo_copy_argv(ref, d / "oci")), "skopeo copy")
                um = check(
                    timed(["umoci", "unpack", "--image", f"{d}/oci:t", d / "bundle"]),
                    "umoci unpack",
                )
            if record:
                for key, run in (("skopeo", sk), ("umoci", um)):
                    rows[key].append(run.seconds)
                    rss[key].append(run.max_rss)

        def floor(record: bool) -> None:
            with scratch("bench-tar-") as d:
                script = "; ".join(f"tar -xzf {b} -C {d}" for b in blobs)
                run = check(timed(["sh", "-ec", script]), "tar -xzf")
            if record:
                rows["tar"].append(run.seconds)

        steps: list[Callable[[bool], None]] = [ours, reference, floor]
        for step in steps:  # warm-up: imports, registry and page caches; not counted
            step(False)
        print(
            f"{'round':>5} {'pull':>6} {'checkout':>8} {'sum':>6} {'warm':>6} | "
            f"{'skopeo':>6} {'umoci':>6} {'sum':>6} | {'tar -xzf':>8}"
        )
        for i in range(args.rounds):
            order = steps[i % 3 :] + steps[: i % 3]
            for step in order:
                step(True)
            r = {k: v[-1] for k, v in rows.items()}
            print(
                f"{i + 1:>5} {r['pull']:>6.2f} {r['checkout']:>8.2f} "
                f"{r['pull'] + r['checkout']:>6.2f} {r['warm']:>6.2f} | {r['skopeo']:>6.2f} "
                f"{r['umoci']:>6.2f} {r['skopeo'] + r['umoci']:>6.2f} | {r['tar']:>8.2f}",
                flush=True,
            )
            log(f"round {i + 1}/{args.rounds} done")

    m = {k: median(v) for k, v in rows.items()}
    ours_sum = median([a + b for a, b in zip(rows["pull"], rows["checkout"], strict=True)])
    ref_sum = median([a + b for a, b in zip(rows["skopeo"], rows["umoci"], strict=True)])
    print(
        f"median {m['pull']:>6.2f} {m['checkout']:>8.2f} {ours_sum:>6.2f} {m['warm']:>6.2f} | "
        f"{m['skopeo']:>6.2f} {m['umoci']:>6.2f} {ref_sum:>6.2f} | {m['tar']:>8.2f}"
    )

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    r1 = ours_sum / ref_sum
    r2 = m["checkout"] / m["tar"]
    print(f"pull+checkout / skopeo+umoci: {r1:.2f} (target <= 0.7: {verdict(r1 <= 0.7)})")
    print(f"cold checkout / tar -xzf floor: {r2:.2f} (target <= 1.3: {verdict(r2 <= 1.3)})")
    print(f"warm checkout: {m['warm']:.2f}s (target <= 1 s: {verdict(m['warm'] <= 1.0)})")
    peak = max(max(rss["pull"]), max(rss["checkout"]), max(rss["warm"]))
    print(
        f"peak RSS: bootstrap pull {human(max(rss['pull']))}, checkout "
        f"{human(max(rss['checkout']))}, warm checkout {human(max(rss['warm']))} "
        f"(target < {human(RSS_TARGET)}: {verdict(peak < RSS_TARGET)}); "
        f"skopeo {human(max(rss['skopeo']))}, umoci {human(max(rss['umoci']))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
