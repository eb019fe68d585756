"""Benchmark: N simulated nodes pulling the same image at the same moment through one site
mirror, Debian's ``docker-registry`` in pull-through cache mode.

Upstream: a plain-HTTP docker-registry on 127.0.0.1 holding the image. Mirror: a second
docker-registry whose config has ``proxy: remoteurl:`` pointing at the upstream, with a cold
cache for every N. Each node is a ``bootstrap pull`` process with its own store and state
directory on tmpfs and a registries.conf that lists the mirror for the upstream
(``[[registry.mirror]]``); all N start at once. Measured per N: time until every node has
pulled, the bytes the upstream served (summed from its access log: GET answers with 200/206),
as a ratio to the image's size, and ``bootstrap fsck`` of every node's store (must be clean).

With ``--jitter S`` every node pulls with ``bootstrap pull --jitter S`` (a random wait of
0..S seconds first, what ``registries.jitter`` does in ``bootstrap up``). Each round also sums
the nodes' CPU time (user + sys of the ``bootstrap`` processes, from ``RUSAGE_CHILDREN``):
per node, and as the seconds of both cores it fills, the bound of time-to-all-pulled.

Goals: every node fsck-clean; upstream bytes <= 1.5x the image at N = 50; time at N = 50
<= 10x N = 1.

    .venv/bin/python bench/fleet.py [--nodes 1,10,50] [--image small|large] [--rounds R]
                                    [--jitter S]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    SCRATCH_ROOT,
    bench_image,
    human,
    layout_size,
    log,
    machine_note,
    median,
    scratch,
    small_image,
)
from tests.harness.registry import Registry

REPO_NAME = "bench/image"
# gorilla/handlers combined log: ... "GET /v2/... HTTP/1.1" 200 12345 "referer" "agent"
_ACCESS = re.compile(r'"(GET|HEAD) (\S+) HTTP/[\d.]+" (\d{3}) (\d+|-)')


class MirrorRegistry(Registry):
    """A docker-registry in pull-through cache mode for ``remote`` (an http(s) URL)."""

    remote: str = ""

    def _config(self) -> dict[str, object]:
        config = super()._config()
        config["proxy"] = {"remoteurl": self.remote}
        return config


def upstream_bytes(log_text: str) -> tuple[int, int]:
    """(bytes served in GET answers 200/206, number of blob GETs) from an access log."""
    total = blobs = 0
    for m in _ACCESS.finditer(log_text):
        method, path, status, size = m.groups()
        if method == "GET" and status in ("200", "206") and size != "-":
            total += int(size)
            if "/blobs/" in path:
                blobs += 1
    return total, blobs


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fleet_round(
    upstream: Registry, n: int, size: int, work: Path, jitter: float = 0.0
) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-mirror-", dir=SCRATCH_ROOT))
    mirror = MirrorRegistry.create("plain", root, start=False)
    mirror.remote = upstream.url
    mirror.start()
    try:
        conf = work / f"registries-{n}.conf"
        conf.write_text(
            f'[[registry]]\nlocation = "{upstream.host}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror.host}"\ninsecure = true\n'
        )
        env = dict(os.environ, REGISTRIES_CONFIG_PATH=str(conf))
        before = len(upstream.log_path.read_bytes())
        nodes = [work / f"n{n}-{i}" for i in range(n)]
        ref = upstream.ref(REPO_NAME)
        pull = ["pull", "--jitter", str(jitter), ref] if jitter else ["pull", ref]
        cpu_before = _children_cpu()  # the registries are children too, but not reaped yet
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [BOOTSTRAP, "-q", "--store", d / "store", "--state", d / "state", *pull],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for d in nodes
        ]
        failed = 0
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                failed += 1
                log(f"node failed (exit {p.returncode}): {err.decode(errors='replace')[-500:]}")
        elapsed = time.monotonic() - started
        cpu = _children_cpu() - cpu_before
        time.sleep(0.3)  # let the access log be written
        text = upstream.log_path.read_bytes()[before:].decode(errors="replace")
        served, blob_gets = upstream_bytes(text)
        unclean = 0
        for d in nodes:
            r = subprocess.run(
                [BOOTSTRAP, "-q", "--store", d / "store", "fsck"], capture_output=True, env=env
            )
            unclean += r.returncode != 0
            shutil.rmtree(d, ignore_errors=True)
        return {
            "n": n,
            "seconds": elapsed,
            "upstream": served,
            "ratio": served / size,
            "blob_gets": blob_gets,
            "cpu_per_node": cpu / n,
            "cpu_bound": cpu / (os.cpu_count() or 1),
            "failed": failed,
            "unclean": unclean,
        }
    finally:
        mirror.close()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", default="1,10,50", help="comma-separated N (default 1,10,50)")
    p.add_argument("--image", choices=("small", "large"), default="small")
    p.add_argument("--rounds", type=int, default=3, help="rounds per N (default 3)")
    p.add_argument(
        "--jitter", type=float, default=0.0, help="bootstrap pull --jitter S on every node"
    )
    args = p.parse_args(argv)
    layout = small_image() if args.image == "small" else bench_image()
    size = layout_size(layout)
    counts = [int(x) for x in args.nodes.split(",")]
    print(f"image: {human(size)} of blobs; {machine_note()}")
    root = Path(tempfile.mkdtemp(prefix="bench-upstream-", dir=SCRATCH_ROOT))
    upstream = Registry.create("plain", root)
    results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    try:
        upstream.push(layout, BENCH_TAG, f"{REPO_NAME}:latest")
        with scratch("bench-fleet-") as work:
            for r in range(args.rounds):
                for n in counts if r % 2 == 0 else list(reversed(counts)):
                    res = fleet_round(upstream, n, size, work, args.jitter)
                    results[n].append(res)
                    print(
                        f"N={n:<3} {res['seconds']:6.2f}s  upstream {human(res['upstream'])} "
                        f"({res['ratio']:.2f}x image, {res['blob_gets']:.0f} blob GETs)  "
                        f"CPU {res['cpu_per_node']:.2f}s/node ({res['cpu_bound']:.1f}s of all "
                        "cores)  "
                        f"failed {res['failed']:.0f}  fsck unclean {res['unclean']:.0f}",
                        flush=True,
                    )
    finally:
        upstream.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"jitter: {args.jitter:g}s" if args.jitter else "jitter: none")
    print(
        f"\n{'N':>3} {'median s':>9} {'x N=1':>6} {'upstream x image':>17} {'bad':>4} "
        f"{'CPU s/node':>10} {'CPU bound s':>11}"
    )
    base = median([x["seconds"] for x in results[counts[0]]])
    for n in counts:
        t = median([x["seconds"] for x in results[n]])
        up = max(x["ratio"] for x in results[n])
        bad = sum(x["failed"] + x["unclean"] for x in results[n])
        per_node = median([x["cpu_per_node"] for x in results[n]])
        bound = median([x["cpu_bound"] for x in results[n]])
        print(
            f"{n:>3} {t:>9.2f} {t / base:>6.1f} {up:>17.2f} {bad:>4.0f} {per_node:>10.2f} "
            f"{bound:>11.2f}"
        )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
