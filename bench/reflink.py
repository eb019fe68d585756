"""Benchmark: a warm ``bootstrap checkout`` (layers cached) against ``cp -a`` of the same tree,
per file system the store can live on, with the new space each takes.

For each file system asked for: tmpfs (a fresh directory in /dev/shm), or XFS
(``mkfs.xfs -m reflink=1``, the RHEL default for /var/lib), btrfs or ext4, each made on a
sparse image file in a temp dir on tmpfs, attached to a loop device and mounted there (all
detached, unmounted and removed afterwards). The ~250 MB, 5-layer, ~20k-file benchmark image
(:func:`bench.common.bench_image`) is loaded into a store on that file system and checked out
once (the layer cache filled, and the reference tree ``r0``). Then, alternating which goes
first, each round on the same file system:
- ``bootstrap checkout REF DEST`` into a fresh DEST (files of its own: FICLONE reflinks where
  the file system has them, copies otherwise);
- the peer: ``cp -a --reflink=always r0 DEST`` where the file system reflinks, ``cp -a r0 DEST``
  elsewhere (tmpfs, ext4);
- the same followed by ``sync -f DEST``: a checkout is durable before it is renamed into place
  (``syncfs``), ``cp`` alone is not; on a file system that writes back (ext4, XFS, btrfs) the
  flush is part of what a checkout costs;
with ``df`` (used bytes of the file system, after ``sync``) before and after each (on tmpfs,
shared with everything else in /dev/shm, ``du`` of the new tree instead), and the directory
removed afterwards. Prints the medians, checkout / peer (targets: <= 0.8 x ``cp -a``
on tmpfs, <= 1.0 x ``cp -a --reflink=always`` on XFS and btrfs, with no more new space than
the peer's copy) and the new space of each. Needs root (loop devices, mounts).

    .venv/bin/python bench/reflink.py [--rounds N] [--fs tmpfs,xfs,btrfs,ext4] [--size GB]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH_TAG,
    BOOTSTRAP,
    SCRATCH_ROOT,
    bench_image,
    check,
    human,
    log,
    machine_note,
    median,
    timed,
)
from bootstrap.image.store import Store
from tests.harness.unpack_support import load_layout

REF = "example.com/bench:1"
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
REFLINKS = {"xfs", "btrfs"}


def run(*argv: str | Path) -> str:
    return subprocess.run(
        [str(a) for a in argv], check=True, capture_output=True, text=True
    ).stdout.strip()


@contextlib.contextmanager
def filesystem(kind: str, size_gb: int) -> Iterator[Path]:
    """A fresh, empty directory on a file system of ``kind``: a directory on tmpfs, or the
    root of a new XFS/btrfs/ext4 on a loop device over a sparse file on tmpfs. Everything is
    unmounted, detached and removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-fs-{kind}-", dir=SCRATCH_ROOT))
    try:
        if kind == "tmpfs":
            yield work
            return
        image = work / "fs.img"
        with image.open("wb") as fh:
            fh.truncate(size_gb << 30)
        dev = run("losetup", "--find", "--show", image)
        try:
            run(*MKFS[kind], dev)
            mnt = work / "mnt"
            mnt.mkdir()
            run("mount", dev, mnt)
            try:
                yield mnt
            finally:
                run("umount", mnt)
        finally:
            run("losetup", "-d", dev)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def used(path: Path) -> int:
    """Bytes in use on the file system holding ``path`` (``df``, after a sync of it)."""
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def tree_bytes(path: Path) -> int:
    """Bytes allocated to the files and directories under ``path`` (``du``): on the shared
    /dev/shm, whose ``df`` counts every other user's files too."""
    total = 0
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def peer_argv(kind: str, src: Path, dest: Path) -> list[str | Path]:
    if kind in REFLINKS:
        return ["cp", "-a", "--reflink=always", src, dest]
    return ["cp", "-a", src, dest]


def line(kind: str, rounds: int, size_gb: int) -> dict[str, float]:
    layout = bench_image()
    rows: dict[str, list[float]] = {
        "ours": [],
        "peer": [],
        "synced": [],
        "ours_space": [],
        "peer_space": [],
        "synced_space": [],
    }
    with filesystem(kind, size_gb) as root:
        store = Store(root / "store")
        store.init()
        load_layout(store, layout, BENCH_TAG, REF)
        base = [BOOTSTRAP, "-q", "--store", store.root]
        check(timed([*base, "checkout", "--pull", "never", REF, root / "r0"]), "cold checkout")
        for i in range(rounds + 1):
            results: dict[str, tuple[float, int]] = {}
            order = ("ours", "peer", "synced") if i % 2 == 0 else ("synced", "peer", "ours")
            for who in order:
                dest = root / f"{who}{i}"
                argv: list[str | Path] = [*base, "checkout", "--pull", "never", REF, dest]
                if who != "ours":
                    argv = peer_argv(kind, root / "r0", dest)
                if who == "synced":
                    argv = ["sh", "-ec", '"$@"; sync -f "$0"', dest, *argv]
                os.sync()  # nothing of the last round left to write back
                before = used(root)
                took = check(timed(argv), who).seconds
                space = tree_bytes(dest) if kind == "tmpfs" else used(root) - before
                results[who] = (took, space)
                shutil.rmtree(dest)
            if i == 0:
                continue  # warm-up
            for who, (took, space) in results.items():
                rows[who].append(took)
                rows[f"{who}_space"].append(float(space))
            print(
                f"{kind} round {i}: checkout {results['ours'][0]:.2f}s "
                f"(+{human(results['ours'][1])}), peer {results['peer'][0]:.2f}s "
                f"(+{human(results['peer'][1])}), peer + sync {results['synced'][0]:.2f}s",
                flush=True,
            )
    return {k: median(v) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fs", default="tmpfs,xfs,btrfs,ext4")
    p.add_argument("--size", type=int, default=4, help="GB of each loop file system (sparse)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/reflink.py needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    kinds = [k for k in args.fs.split(",") if k]
    for kind in kinds:
        if kind != "tmpfs" and kind not in MKFS:
            p.error(f"--fs: unknown file system {kind!r}")
        if kind in MKFS and shutil.which(MKFS[kind][0]) is None:
            p.error(f"{MKFS[kind][0]} is missing (sudo ./install.sh --dev installs it)")
    print(machine_note())
    results = {}
    for kind in kinds:
        log(f"{kind}: preparing the store ...")
        results[kind] = line(kind, args.rounds, args.size)
    print(
        "| file system | warm checkout | peer | peer + sync -f | peer command | checkout / peer "
        "| checkout / (peer + sync) | new space: checkout | new space: peer |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, m in results.items():
        peer = "cp -a --reflink=always" if kind in REFLINKS else "cp -a"
        print(
            f"| {kind} | {m['ours']:.2f} s | {m['peer']:.2f} s | {m['synced']:.2f} s | `{peer}` "
            f"| {m['ours'] / m['peer']:.2f} | {m['ours'] / m['synced']:.2f} "
            f"| {human(m['ours_space'])} | {human(m['peer_space'])} |"
        )
    print("targets: tmpfs <= 0.8 x cp -a; xfs/btrfs <= 1.0 x cp -a --reflink=always, space <= peer")
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
