"""Benchmark: N simulated nodes pulling the same image at the same moment through one site
cache: Debian's ``docker-registry`` in pull-through cache mode, or Debian's ``nginx`` as a
caching proxy that merges concurrent first requests.

Upstream: a plain-HTTP docker-registry on 127.0.0.1 holding the image. Site caches, each cold
for every round:
- ``registry``: a second docker-registry whose config has ``proxy: remoteurl:`` pointing at the
  upstream;
- ``nginx``: nginx (``nginx -c``, its own prefix in a temp dir) proxying ``/v2/`` to the
  upstream; blob GETs (``/v2/<name>/blobs/sha256:<hex>``, content-addressed, never changing)
  go through ``proxy_cache`` keyed by that path alone (not the caller's credentials) with
  ``proxy_cache_lock``: the first request for a blob fetches it, concurrent ones wait for it
  and are served from the cache; manifests and the ping pass through uncached.
Each node is a ``bootstrap pull`` process with its own store and state
directory on tmpfs and a registries.conf that lists the mirror for the upstream
(``[[registry.mirror]]``); all N start at once. Measured per N: time until every node has
pulled, the bytes the upstream served (summed from its access log: GET answers with 200/206),
as a ratio to the image's size, and ``bootstrap fsck`` of every node's store (must be clean).

With ``--jitter S`` every node pulls with ``bootstrap pull --jitter S`` (a random wait of
0..S seconds first, what ``registries.jitter`` does in ``bootstrap up``). Each round also sums
the nodes' CPU time (user + sys of the ``bootstrap`` processes, from ``RUSAGE_CHILDREN``):
per node, and as the seconds of both cores it fills, the bound of time-to-all-pulled.

Goals: every node fsck-clean; upstream bytes <= 1.1x the image at N = 50 and time at N = 50
<= 15x N = 1 (through the merging cache).

    .venv/bin/python bench/fleet.py [--nodes 1,10,50] [--image small|large] [--rounds R]
                                    [--jitter S] [--cache registry,nginx]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
from tests.harness.registry import Registry, free_port

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


NGINX_CONF = """\
daemon off;
master_process on;
user root;
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    proxy_cache_path {root}/cache levels=1:2 keys_zone=blobs:10m max_size=20g inactive=30d
                     use_temp_path=off;
    upstream registry {{ server {upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host {upstream};
        # content-addressed blobs: one cache entry per repository and digest, whoever asks
        location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
            proxy_pass http://registry;
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 30d;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
        # the ping, tokens' challenges, manifests by tag (they move): not cached
        location /v2/ {{
            proxy_pass http://registry;
            proxy_buffering off;
        }}
    }}
}}
"""


class NginxCache:
    """nginx as a blob cache in front of ``upstream`` (host:port), on a free port, everything
    of it (config, cache, logs, pid) under ``root``."""

    def __init__(self, root: Path, upstream: str) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=root, upstream=upstream, port=self.port))
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(root), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.close()
                raise SystemExit(f"nginx did not start: {err}{self.error_log()}")
            time.sleep(0.05)

    def error_log(self) -> str:
        path = self.root / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def site_cache(kind: str, upstream: Registry) -> Iterator[tuple[str, int]]:
    """A cold site cache of ``kind`` ("registry" or "nginx") for ``upstream``; yields the
    host:port nodes list as their mirror and the pid of its (main) process. Removed
    afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=SCRATCH_ROOT))
    try:
        if kind == "nginx":
            cache = NginxCache(root, upstream.host)
            try:
                yield cache.host, cache.proc.pid
            finally:
                cache.close()
        else:
            mirror = MirrorRegistry.create("plain", root, start=False)
            mirror.remote = upstream.url
            mirror.start()
            try:
                yield mirror.host, mirror.proc.pid if mirror.proc else 0
            finally:
                mirror.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


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


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, softirq) CPU seconds of the whole machine since boot, all cores
    (``/proc/stat``); softirq is mostly the loopback network's packet processing, which no
    process is charged for."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / tick, sum(fields) / tick, (fields[5] + fields[6]) / tick


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + sys) used so far by process ``pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            with open(f"/proc/{p}/task/{p}/children") as fh:
                pending += [int(c) for c in fh.read().split()]
        except (OSError, ValueError):
            continue
    return total


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fleet_round(
    upstream: Registry, n: int, size: int, work: Path, jitter: float = 0.0, cache: str = "registry"
) -> dict[str, float]:
    with site_cache(cache, upstream) as (mirror_host, cache_pid):
        conf = work / f"registries-{n}.conf"
        conf.write_text(
            f'[[registry]]\nlocation = "{upstream.host}"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{mirror_host}"\ninsecure = true\n'
        )
        env = dict(os.environ, REGISTRIES_CONFIG_PATH=str(conf))
        before = len(upstream.log_path.read_bytes())
        nodes = [work / f"n{n}-{i}" for i in range(n)]
        ref = upstream.ref(REPO_NAME)
        pull = ["pull", "--jitter", str(jitter), ref] if jitter else ["pull", ref]
        cpu_before = _children_cpu()  # the registries are children too, but not reaped yet
        cache_before, up_before = (
            tree_cpu(cache_pid),
            tree_cpu(upstream.proc.pid if upstream.proc else 0),
        )
        busy_before, total_before, irq_before = machine_cpu()
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
        busy, total, irq = machine_cpu()
        busy, total, irq = busy - busy_before, total - total_before, irq - irq_before
        cache_cpu = tree_cpu(cache_pid) - cache_before
        up_cpu = tree_cpu(upstream.proc.pid if upstream.proc else 0) - up_before
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
            "cache_cpu": cache_cpu,
            "upstream_cpu": up_cpu,
            # the machine's busy share over the wave, and what others ran meanwhile
            "busy": busy / total if total else 0.0,
            "irq_cpu": irq,
            "others_cpu": max(0.0, busy - irq - cpu - cache_cpu - up_cpu),
            "failed": failed,
            "unclean": unclean,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--nodes", default="1,10,50", help="comma-separated N (default 1,10,50)")
    p.add_argument("--image", choices=("small", "large"), default="small")
    p.add_argument("--rounds", type=int, default=3, help="rounds per N (default 3)")
    p.add_argument(
        "--jitter", type=float, default=0.0, help="bootstrap pull --jitter S on every node"
    )
    p.add_argument(
        "--cache", default="registry,nginx", help="site caches to compare (registry, nginx)"
    )
    args = p.parse_args(argv)
    layout = small_image() if args.image == "small" else bench_image()
    size = layout_size(layout)
    counts = [int(x) for x in args.nodes.split(",")]
    caches = [c for c in args.cache.split(",") if c]
    if any(c not in ("registry", "nginx") for c in caches):
        p.error("--cache takes registry and/or nginx")
    print(f"image: {human(size)} of blobs; {machine_note()}")
    root = Path(tempfile.mkdtemp(prefix="bench-upstream-", dir=SCRATCH_ROOT))
    upstream = Registry.create("plain", root)
    results: dict[tuple[str, int], list[dict[str, float]]] = {
        (c, n): [] for c in caches for n in counts
    }
    try:
        upstream.push(layout, BENCH_TAG, f"{REPO_NAME}:latest")
        with scratch("bench-fleet-") as work:
            for r in range(args.rounds):
                order = counts if r % 2 == 0 else list(reversed(counts))
                for n in order:
                    # the caches alternate too: each N runs through every cache back to back
                    for cache in caches if (r + n) % 2 == 0 else list(reversed(caches)):
                        res = fleet_round(upstream, n, size, work, args.jitter, cache)
                        results[cache, n].append(res)
                        print(
                            f"{cache:<8} N={n:<3} {res['seconds']:6.2f}s  upstream "
                            f"{human(res['upstream'])} ({res['ratio']:.2f}x image, "
                            f"{res['blob_gets']:.0f} blob GETs)  CPU {res['cpu_per_node']:.2f}"
                            f"s/node ({res['cpu_bound']:.1f}s of all cores), cache "
                            f"{res['cache_cpu']:.1f}s, upstream {res['upstream_cpu']:.1f}s, "
                            f"softirq {res['irq_cpu']:.1f}s, others {res['others_cpu']:.1f}s, "
                            f"machine {res['busy']:.0%} busy  "
                            f"failed {res['failed']:.0f}  fsck unclean {res['unclean']:.0f}",
                            flush=True,
                        )
    finally:
        upstream.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"jitter: {args.jitter:g}s" if args.jitter else "jitter: none")
    print(
        "\n| cache | N | time to all pulled (median) | x N = 1 | upstream bytes x image (max) "
        "| failed or unclean | CPU s/node | nodes' CPU s of all cores | cache CPU s "
        "| softirq CPU s | others' CPU s | machine busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cache in caches:
        base = median([x["seconds"] for x in results[cache, counts[0]]])
        for n in counts:
            rows = results[cache, n]
            t = median([x["seconds"] for x in rows])
            up = max(x["ratio"] for x in rows)
            bad = sum(x["failed"] + x["unclean"] for x in rows)
            per_node = median([x["cpu_per_node"] for x in rows])
            bound = median([x["cpu_bound"] for x in rows])
            cache_cpu = median([x["cache_cpu"] for x in rows])
            others = median([x["others_cpu"] for x in rows])
            irq = median([x["irq_cpu"] for x in rows])
            busy = median([x["busy"] for x in rows])
            print(
                f"| {cache} | {n} | {t:.2f} s | {t / base:.1f} | {up:.2f} | {bad:.0f} "
                f"| {per_node:.2f} | {bound:.2f} | {cache_cpu:.1f} | {irq:.1f} | {others:.1f} "
                f"| {busy:.0%} |"
            )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
