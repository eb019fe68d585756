"""Benchmark: ``bootstrap pull`` vs ``skopeo copy docker://... oci:DIR:t``, line by line.

Each line is an image on a registry of one kind, both on 127.0.0.1 with storage on tmpfs:

- ``large/plain``: the ~250 MB gzip, 5-layer image (:func:`bench.common.bench_spec`), plain HTTP;
- ``large/token``: the same image over TLS with token auth (the harness's token server);
- ``small/plain`` and ``small/token``: a ~52 MB, 6-layer image (:func:`bench.common.small_spec`);
- ``zstd/plain``: the small image with zstd layers, next to the gzip one.

For each line and several rounds, each tool pulls into a fresh directory on tmpfs, alternating
which goes first. Prints per-round times, the medians, the ratio ours/skopeo (target <= 0.8) and
the peak RSS of each (target for ours < 100 MB), and each tool's CPU seconds (user + sys) per
pull next to the start-up floor's (target for ours on the small image: <= 0.25 s).

    .venv/bin/python bench/pull.py [--rounds N] [--lines large/plain,small/token,...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    RSS_TARGET,
    SCRATCH_ROOT,
    Run,
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
TAG_KEY = "org.opencontainers.image.ref.name"
IMPORTS = (
    "import bootstrap.cli, bootstrap.image.api, bootstrap.image.registry, bootstrap.image.pull"
)
LINES = ("small/plain", "small/token", "large/plain", "large/token", "zstd/plain")


@dataclass(frozen=True)
class Served:
    """An image on a running registry: what each tool needs to fetch it."""

    ref: str
    env: dict[str, str]  # bootstrap's environment (registries.conf, auth, certs.d)
    skopeo_args: list[str]  # skopeo's source flags
    curl: list[str]  # curl fetching every blob of the image at once into the current dir


def _curl_argv(reg: Registry, layout: Path) -> list[str]:
    """One ``curl --parallel`` fetching each blob of ``layout`` from ``reg`` (the transfer
    floor: no manifest round trips, no verification, no auth round trips — a token for the
    repository is fetched once, beforehand)."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [m for m in index["manifests"] if m["annotations"].get(TAG_KEY) == BENCH_TAG]
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    blobs = [d["digest"][7:] for d in (manifest["config"], *manifest["layers"])]
    argv = ["curl", "-sSf", "--parallel", "--parallel-max", "8", "--parallel-immediate"]
    if reg.ca_cert is not None:
        argv += ["--cacert", str(reg.ca_cert)]
    if reg.mode == "token":
        token = reg.token("repository:bench/image:pull")
        argv += ["-H", f"Authorization: Bearer {token}"]
    elif reg.creds is not None:
        argv += ["-u", reg.creds]
    for blob in blobs:
        argv += ["-o", blob, f"{reg.url}/v2/bench/image/blobs/sha256:{blob}"]
    return argv


@contextlib.contextmanager
def served(layout: Path, mode: str) -> Iterator[Served]:
    """``layout``'s ``bench`` image on a fresh registry of ``mode``."""
    root = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=SCRATCH_ROOT))
    reg = Registry.create(mode, root)
    try:
        reg.push(layout, BENCH_TAG, "bench/image:latest")
        yield Served(
            reg.ref("bench/image"),
            client_env(reg, root),
            reg.skopeo_src_args(),
            _curl_argv(reg, layout),
        )
    finally:
        reg.close()
        shutil.rmtree(root, ignore_errors=True)


def run_line(line: str, rounds: int) -> dict[str, float]:
    kind, mode = line.split("/")
    layout = bench_image() if kind == "large" else small_image(kind == "zstd")
    size = layout_size(layout)
    print(f"\n== {line}: {human(size)} of blobs")
    with served(layout, mode) as srv:
        ref, env, src_args = srv.ref, srv.env, srv.skopeo_args

        def ours() -> Run:
            with scratch("bench-ours-") as d:
                return check(timed([BOOTSTRAP, "-q", "--store", d, "pull", ref], env), "pull")

        def skopeo() -> Run:
            with scratch("bench-skopeo-") as d:
                argv = ["skopeo", "copy", "--quiet", *src_args, f"docker://{ref}", f"oci:{d}/o:t"]
                return check(timed(argv), "skopeo copy")

        def floor() -> Run:
            return check(timed([sys.executable, "-c", IMPORTS]), "imports")

        def transfer() -> Run:
            with scratch("bench-curl-") as d:
                return check(timed(["sh", "-c", 'cd "$0" && exec "$@"', d, *srv.curl]), "curl")

        ours()  # warm-up (registry caches), not counted
        skopeo()
        res: dict[str, list[Run]] = {
            "ours": [],
            "skopeo": [],
            "floor": [],
            "curl": [],
        }
        print(f"{'round':>5}  {'bootstrap pull':>14}  {'skopeo copy':>11}  {'curl blobs':>10}")
        for i in range(rounds):
            order = (("ours", ours), ("skopeo", skopeo), ("floor", floor), ("curl", transfer))
            for name, fn in order if i % 2 == 0 else reversed(order):
                res[name].append(fn())
            print(
                f"{i + 1:>5}  {res['ours'][-1].seconds:>13.2f}s  "
                f"{res['skopeo'][-1].seconds:>10.2f}s  {res['curl'][-1].seconds:>9.2f}s"
            )
    mf = median([r.seconds for r in res["floor"]])
    mc = median([r.seconds for r in res["curl"]])
    mo = median([r.seconds for r in res["ours"]])
    ms = median([r.seconds for r in res["skopeo"]])
    cpu = {k: median([r.cpu for r in v]) for k, v in res.items()}
    peak = max(r.max_rss for r in res["ours"])
    ratio = mo / ms
    verdict = "ok" if ratio <= PULL_TARGET else "MISSED"
    print(f"median  {mo:>13.2f}s  {ms:>10.2f}s")
    print(f"start-up floor (interpreter + pull-path imports): {mf:.3f}s = {mf / ms:.2f}x skopeo")
    print(f"transfer floor (curl, all blobs in parallel): {mc:.3f}s = {mc / ms:.2f}x skopeo")
    print(f"ratio bootstrap/skopeo: {ratio:.2f} (target <= {PULL_TARGET}: {verdict})")
    print(
        f"peak RSS: bootstrap {human(peak)} "
        f"(target < {human(RSS_TARGET)}: {'ok' if peak < RSS_TARGET else 'MISSED'}), "
        f"skopeo {human(max(r.max_rss for r in res['skopeo']))}"
    )
    print(
        f"CPU (user + sys) per run: bootstrap {cpu['ours']:.3f}s (start-up floor "
        f"{cpu['floor']:.3f}s), skopeo {cpu['skopeo']:.3f}s, curl {cpu['curl']:.3f}s"
    )
    return {
        "ours": mo,
        "skopeo": ms,
        "ratio": ratio,
        "rss": peak,
        "floor": mf,
        "curl": mc,
        "cpu": cpu["ours"],
        "cpu_floor": cpu["floor"],
        "cpu_skopeo": cpu["skopeo"],
    }


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
    print(
        f"\n{'line':<12} {'ours':>6} {'skopeo':>7} {'ratio':>6} {'RSS':>8} {'start-up':>8}"
        f" {'curl':>6} {'(start-up+curl)/skopeo':>22} {'CPU ours':>8} {'CPU floor':>9}"
        f" {'CPU skopeo':>10}"
    )
    for line, r in summary.items():
        print(
            f"{line:<12} {r['ours']:>5.2f}s {r['skopeo']:>6.2f}s {r['ratio']:>6.2f} "
            f"{human(r['rss']):>8} {r['floor']:>7.2f}s {r['curl']:>5.2f}s"
            f" {(r['floor'] + r['curl']) / r['skopeo']:>22.2f} {r['cpu']:>7.3f}s"
            f" {r['cpu_floor']:>8.3f}s {r['cpu_skopeo']:>9.3f}s"
        )
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
