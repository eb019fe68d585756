"""Benchmark: checkouts that never share inodes with the layer cache, and verifying the cache.

The ~250 MB (gzip), 5-layer, ~20k-file benchmark image (:func:`bench.common.bench_image`) is
loaded into a fresh store on tmpfs each round, then:

- cold: ``bootstrap checkout REF DEST`` (every layer extracted into the cache, then composed
  into files of DEST's own: reflinks where the file system can, copies here on tmpfs);
- warm: the same into another DEST (layers cached; the data is still copied);
- tree: composing the image's lower tree in the store (hardlinks from the cache; done once per
  image, by the first deployment);
- mount (the warm path of a deployment): tree lookup + ``mount -t overlay`` of a rootfs with
  its own upper/work dirs, measured in-process (no interpreter start-up), then unmounted;
- fsck: ``bootstrap fsck`` (every blob re-hashed, every cached file re-hashed against its
  record);
- floor: ``tar -xzf`` of each layer blob in order into one dir.

Targets: mount <= 50 ms; cold checkout / tar floor reported. Needs root (overlay mounts).

    .venv/bin/python bench/checkout.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    bench_image,
    check,
    machine_note,
    median,
    scratch,
    timed,
)
from bench.unpack import layer_blobs
from bootstrap.image.compose import image_tree
from bootstrap.image.store import Store
from tests.harness.unpack_support import load_layout

REF = "example.com/bench:1"


def mount_once(store: Store, work: Path) -> float:
    """Seconds for the warm deployment path: find the tree, mount the overlay (then unmount)."""
    for sub in ("rootfs", "upper", "work"):
        (work / sub).mkdir()
    started = time.perf_counter()
    with store.using():
        tree, _ = image_tree(store, store.image(REF))
    opts = f"lowerdir={tree},upperdir={work / 'upper'},workdir={work / 'work'}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, work / "rootfs"], check=True)
    took = time.perf_counter() - started
    assert os.path.exists(work / "rootfs/bin/busybox")
    subprocess.run(["umount", work / "rootfs"], check=True)
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/checkout.py needs root (overlay mounts)", file=sys.stderr)
        return 2
    layout = bench_image()
    blobs = layer_blobs(layout, BENCH_TAG)
    rows: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "tree", "mount", "fsck", "tar")}
    print(machine_note())
    for i in range(args.rounds + 1):
        with scratch("bench-co-") as d:
            store = Store(d / "store")
            store.init()
            load_layout(store, layout, BENCH_TAG, REF)
            base = [BOOTSTRAP, "-q", "--store", store.root]
            cold = check(timed([*base, "checkout", REF, d / "r1"]), "checkout").seconds
            warm = check(timed([*base, "checkout", REF, d / "r2"]), "warm checkout").seconds
            started = time.perf_counter()
            with store.using():
                image_tree(store, store.image(REF))
            tree = time.perf_counter() - started
            (d / "m").mkdir()
            mount = mount_once(store, d / "m")
            fsck = check(timed([*base, "fsck"]), "fsck").seconds
        with scratch("bench-tar-") as d:
            script = "; ".join(f"tar -xzf {b} -C {d}" for b in blobs)
            tar = check(timed(["sh", "-ec", script]), "tar -xzf").seconds
        if i == 0:
            continue  # warm-up: page caches, imports
        for key, value in zip(rows, (cold, warm, tree, mount, fsck, tar), strict=True):
            rows[key].append(value)
        print(
            f"round {i}: cold {cold:.2f}s warm {warm:.2f}s tree {tree:.2f}s "
            f"mount {mount * 1000:.1f}ms fsck {fsck:.2f}s tar {tar:.2f}s"
        )
    m = {k: median(v) for k, v in rows.items()}
    print(
        f"median: cold {m['cold']:.2f}s warm {m['warm']:.2f}s tree {m['tree']:.2f}s "
        f"mount {m['mount'] * 1000:.1f}ms fsck {m['fsck']:.2f}s tar {m['tar']:.2f}s"
    )
    verdict = "ok" if m["mount"] <= 0.05 else "MISSED"
    print(f"warm deployment mount: {m['mount'] * 1000:.1f} ms (target <= 50 ms: {verdict})")
    print(f"cold checkout / tar -xzf floor: {m['cold'] / m['tar']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
