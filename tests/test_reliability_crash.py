"""Crash consistency: ``bootstrap pull``, ``checkout`` and ``import`` killed with SIGKILL at
random points, 100 rounds in all (40 pull, 40 checkout, 20 import; ``BOOTSTRAP_CRASH_ROUNDS``
scales them, ``BOOTSTRAP_CRASH_SEED`` picks the seed).

Kill points: half the rounds after a seeded random delay (a fraction of the command's measured
duration), half when the file system shows the command mid-write (a temp blob of at least a
random size in ``STORE/tmp``; index.json's temp file while the tag is written; a layer-cache
temp dir; the ``DEST.tmp-*`` composition dir), plus a small random delay. The image is small
and is served through a throttling relay while a pull is being killed, so kills land
mid-download; reruns go at full speed.

After each kill: ``bootstrap fsck`` exits 0; after ``bootstrap gc`` no temp file or dir is left
in the store; a killed checkout left nothing at DEST; and rerunning the same command completes
with the right result (the pushed digest; a tree equal to a reference checkout; the reference
import's digest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootstrap.fsutil import remove_tree
from bootstrap.image import maintenance
from bootstrap.image.store import Store
from tests.harness import treediff
from tests.harness.cli import bootstrap
from tests.harness.crashloop import (
    Kill,
    ThrottledRelay,
    dest_leftovers,
    path_appears,
    registries_env,
    run_and_kill,
    store_leftovers,
    tmp_file_at_least,
)
from tests.harness.imagebuilder import (
    BuiltImage,
    File,
    ImageSpec,
    Layer,
    build_image,
    busybox_layer,
    random_content,
    save_docker_archive,
)
from tests.harness.registry import Registry

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("BOOTSTRAP_CRASH_SEED", "20261125"))
SCALE = int(os.environ.get("BOOTSTRAP_CRASH_ROUNDS", "100")) / 100
PULL_ROUNDS = max(1, round(40 * SCALE))
CHECKOUT_ROUNDS = max(1, round(40 * SCALE))
IMPORT_ROUNDS = max(1, round(20 * SCALE))
THROTTLE = 5 * 1024 * 1024  # bytes/s while a pull is being killed
BIG = 2 * 1024 * 1024 + 4321
REPO = "crash/img"

STATS: dict[str, list[dict[str, Any]]] = {}


def crash_spec() -> ImageSpec:
    """busybox + a layer with one 2 MiB incompressible file and 400 small files (so checkout
    has enough entries to be killed in the middle of)."""
    small = [
        File(f"data/d{i // 50:02d}/f{i:04d}", random_content(i, 700, compressible=True))
        for i in range(400)
    ]
    return ImageSpec(
        layers=[
            busybox_layer(),
            Layer([File("data/big.bin", random_content(99, BIG)), *small]),
        ],
        cmd=("sh",),
    )


@dataclass
class Setup:
    registry: Registry
    relay: ThrottledRelay
    image: BuiltImage
    ref: str
    env: dict[str, str]
    archive: Path
    archive_digest: str
    reference_tree: dict[str, treediff.Node]
    root: Path


@pytest.fixture(scope="module")
def setup(_registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("crash")
    reg = _registry_plain
    if not reg.running:
        reg.start()
    spec = crash_spec()
    image = build_image(root / "oci", "t", spec)
    reg.push(root / "oci", "t", f"{REPO}:1")
    archive = root / "image.tar"
    save_docker_archive(spec, archive, "crash/imported:1")
    with ThrottledRelay(("127.0.0.1", reg.port)) as relay:
        env = registries_env(root, relay.host)
        ref = f"{relay.host}/{REPO}:1"
        # reference results, from a store nobody kills
        ref_store = root / "ref-store"
        bootstrap("pull", ref, store=ref_store, env=env, check=True)
        bootstrap("checkout", ref, root / "ref-tree", store=ref_store, check=True)
        ran = bootstrap("--json", "import", archive, store=ref_store, check=True)
        archive_digest = ran.json()["images"][0]["digest"]
        tree = treediff.snapshot(root / "ref-tree")
        yield Setup(reg, relay, image, ref, env, archive, archive_digest, tree, root)


def _timed(fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def _after_kill(store: Path, env: dict[str, str], what: str) -> None:
    """fsck clean; gc leaves no temp file anywhere in the store."""
    ran = bootstrap("fsck", store=store, env=env)
    assert ran.rc == 0, f"{what}: fsck after the kill: {ran.stderr}"
    ran = bootstrap("gc", store=store, env=env)
    assert ran.rc == 0, f"{what}: gc after the kill: {ran.stderr}"
    left = store_leftovers(store)
    assert left == [], f"{what}: temp files survive gc: {left}"


def _record(command: str, i: int, how: str, k: Kill) -> dict[str, Any]:
    row = {
        "command": command,
        "round": i,
        "trigger": how,
        "killed": k.killed,
        "watch_fired": k.triggered,
        "at": round(k.waited, 3),
        "rc": k.rc,
    }
    STATS.setdefault(command, []).append(row)
    return row


def _summary(command: str) -> str:
    rows = STATS.get(command, [])
    killed = sum(r["killed"] for r in rows)
    kinds: dict[str, list[int]] = {}
    for r in rows:
        kind = r["trigger"].split(">=")[0].split("(")[0].strip()
        k = kinds.setdefault(kind, [0, 0])
        k[0] += 1
        k[1] += r["killed"]
    detail = ", ".join(f"{kind}: {n[1]}/{n[0]} killed" for kind, n in kinds.items())
    return f"{command}: {len(rows)} rounds, {killed} killed mid-run ({detail})"


def test_pull_killed_at_random_points(setup: Setup, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    store = tmp_path / "store"
    st = Store(store)
    setup.relay.rate = THROTTLE
    full = _timed(lambda: bootstrap("pull", setup.ref, store=store, env=setup.env, check=True))
    st.untag(setup.ref)
    maintenance.gc(st)
    started = time.monotonic()
    for i in range(PULL_ROUNDS):
        setup.relay.rate = THROTTLE
        argv = ["--store", str(store), "pull", setup.ref]
        if i % 2 == 0:
            how = "delay"
            k = run_and_kill(argv, setup.env, delay=rng.uniform(0.05, 1.1) * full)
        elif i % 4 == 3:  # while index.json is being replaced (the tag, written last)
            how = "index.json temp"
            k = run_and_kill(
                argv,
                setup.env,
                watch=path_appears(store / "oci", ".index.json."),
                delay=rng.uniform(0, 0.002),
                poll=0.0001,  # the window is a write + fsync of a small file
            )
        else:
            size = rng.randrange(1, BIG)
            how = f"tmp>={size}"
            k = run_and_kill(
                argv, setup.env, watch=tmp_file_at_least(store, size), delay=rng.uniform(0, 0.03)
            )
        row = _record("pull", i, how, k)
        assert k.killed or k.rc == 0, f"round {i} ({row}): {k.stderr}"
        _after_kill(store, setup.env, f"pull round {i} ({row})")
        setup.relay.rate = 0
        ran = bootstrap("pull", setup.ref, store=store, env=setup.env)
        assert ran.rc == 0, f"round {i}: rerun: {ran.stderr}"
        assert ran.stdout.strip() == setup.image.digest
        report = maintenance.fsck(st)
        assert report.ok and report.unreferenced == 0, report.findings()
        assert st.resolve(setup.ref).digest == setup.image.digest
        # next round downloads everything again
        st.untag(setup.ref)
        maintenance.gc(st)
    elapsed = time.monotonic() - started
    print(f"\n{_summary('pull')} in {elapsed:.1f}s (one full pull {full:.2f}s)")
    assert sum(r["killed"] for r in STATS["pull"]) >= PULL_ROUNDS * 0.5


def test_checkout_killed_at_random_points(setup: Setup, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    store = tmp_path / "store"
    st = Store(store)
    setup.relay.rate = 0
    bootstrap("pull", setup.ref, store=store, env=setup.env, check=True)
    work = tmp_path / "work"
    work.mkdir()
    cold = _timed(lambda: bootstrap("checkout", setup.ref, work / "probe", store=store, check=True))
    warm = _timed(
        lambda: bootstrap("checkout", setup.ref, work / "probe2", store=store, check=True)
    )
    for p in ("probe", "probe2"):
        remove_tree(work / p)
    sibling_leaks = 0
    started = time.monotonic()
    for i in range(CHECKOUT_ROUNDS):
        dest = work / f"root{i}"
        argv = ["--store", str(store), "checkout", setup.ref, str(dest)]
        is_cold = rng.random() < 0.6
        if is_cold:
            for algdir in st.layers.iterdir():
                remove_tree(algdir)
        span = cold if is_cold else warm
        mode = i % 3
        if mode == 0:
            how = f"delay({'cold' if is_cold else 'warm'})"
            k = run_and_kill(argv, {}, delay=rng.uniform(0.03, 1.05) * span)
        elif mode == 1 and is_cold:
            how = "layer-cache tmp dir"
            k = run_and_kill(
                argv,
                {},
                watch=path_appears(st.layers / "sha256", "."),
                delay=rng.uniform(0, 0.06),
            )
        else:
            how = f"DEST.tmp ({'cold' if is_cold else 'warm'})"
            k = run_and_kill(
                argv, {}, watch=path_appears(work, f"{dest.name}.tmp-"), delay=rng.uniform(0, 0.02)
            )
        row = _record("checkout", i, how, k)
        assert k.killed or k.rc == 0, f"round {i} ({row}): {k.stderr}"
        if k.killed:
            assert (
                not dest.exists()
                or treediff.diff(setup.reference_tree, treediff.snapshot(dest)) == []
            ), f"round {i}: a partial checkout at DEST"
        _after_kill(store, {}, f"checkout round {i} ({row})")
        # every cache entry left behind (a kill mid-extraction leaves only a dot temp dir)
        # matches its record, path by path
        damaged = [c.findings() for c in maintenance.fsck(Store(store)).layers if not c.ok]
        assert damaged == [], f"round {i} ({row}): cache entries damaged: {damaged}"
        # DEST.tmp-* beside DEST (outside the store: gc cannot see it) is removed by the rerun
        leaks = [n for n in dest_leftovers(dest) if n != dest.name]
        sibling_leaks += bool(leaks)
        if dest.exists():  # the kill came after the rename: complete, checked above
            remove_tree(dest)
        ran = bootstrap("checkout", setup.ref, dest, store=store)
        assert ran.rc == 0, f"round {i}: rerun: {ran.stderr}"
        problems = treediff.diff(setup.reference_tree, treediff.snapshot(dest))
        assert problems == [], f"round {i}: rerun tree differs: {problems}"
        assert dest_leftovers(dest) == [dest.name], f"round {i}: temp dirs survive the rerun"
        remove_tree(dest)
        STATS["checkout"][-1]["dest_tmp_leak"] = bool(leaks)
    assert maintenance.fsck(Store(store)).ok
    elapsed = time.monotonic() - started
    print(
        f"\n{_summary('checkout')} in {elapsed:.1f}s (cold {cold:.2f}s, warm {warm:.2f}s); "
        f"{sibling_leaks} left DEST.tmp-* beside DEST (removed by the rerun)"
    )
    assert sum(r["killed"] for r in STATS["checkout"]) >= CHECKOUT_ROUNDS * 0.5


def test_import_killed_at_random_points(setup: Setup, tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    store = tmp_path / "store"
    st = Store(store)
    argv = ["--store", str(store), "import", str(setup.archive)]
    full = _timed(lambda: bootstrap(*argv[2:], store=store, check=True))
    name = "docker.io/crash/imported:1"
    st.untag(name)
    maintenance.gc(st)
    started = time.monotonic()
    for i in range(IMPORT_ROUNDS):
        if i % 2 == 0:
            how = "delay"
            k = run_and_kill(argv, {}, delay=rng.uniform(0.03, 1.05) * full)
        else:
            size = rng.randrange(1, BIG)
            how = f"tmp>={size}"
            k = run_and_kill(
                argv, {}, watch=tmp_file_at_least(store, size), delay=rng.uniform(0, 0.02)
            )
        row = _record("import", i, how, k)
        assert k.killed or k.rc == 0, f"round {i} ({row}): {k.stderr}"
        _after_kill(store, {}, f"import round {i} ({row})")
        ran = bootstrap("--json", *argv, store=None)
        assert ran.rc == 0, f"round {i}: rerun: {ran.stderr}"
        assert ran.json()["images"][0]["digest"] == setup.archive_digest
        assert maintenance.fsck(st).ok
        st.untag(name)
        maintenance.gc(st)
    elapsed = time.monotonic() - started
    print(f"\n{_summary('import')} in {elapsed:.1f}s (one import {full:.2f}s)")
    out = setup.root / "crash-stats.json"
    out.write_text(json.dumps(STATS, indent=1))
    assert sum(r["killed"] for r in STATS["import"]) >= IMPORT_ROUNDS * 0.5


def test_rerun_removes_the_temp_dir_of_a_killed_checkout(setup: Setup, tmp_path: Path) -> None:
    """A checkout killed while composing leaves ``DEST.tmp-*`` (and its lock file) beside DEST,
    outside the store; the next checkout into DEST removes them."""
    store = tmp_path / "store"
    bootstrap("pull", setup.ref, store=store, env=setup.env, check=True)
    dest = tmp_path / "rootfs"

    def composing() -> bool:  # the temp dir itself (its .lock file is created first)
        return any(e.name.startswith("rootfs.tmp-") and e.is_dir() for e in os.scandir(tmp_path))

    left: list[str] = []
    for _ in range(5):  # the kill is timed by polling: retry until it lands mid-compose
        k = run_and_kill(
            ["--store", str(store), "checkout", setup.ref, str(dest)], {}, watch=composing
        )
        assert k.killed or k.rc == 0, k.stderr
        left = [n for n in dest_leftovers(dest) if n != dest.name]
        if left:
            break
        remove_tree(dest)
    assert left, "no kill landed while the checkout was composing"
    # the rerun alone cleans up (gc removing recorded temp dirs is tested in test_maintenance.py)
    bootstrap("checkout", setup.ref, dest, store=store, check=True)
    assert [n for n in dest_leftovers(dest) if n != dest.name] == []
    shutil.rmtree(dest)
    assert dest_leftovers(dest) == []


GC_ROUNDS = max(1, round(10 * SCALE))


def _litter(store: Path, rng: random.Random, n: int) -> None:
    """``n`` unreferenced blobs (written directly: test setup, no fsync) for gc to remove."""
    d = store / "oci" / "blobs" / "sha256"
    for _ in range(n):
        data = rng.randbytes(64)
        (d / hashlib.sha256(data).hexdigest()).write_bytes(data)


def test_gc_killed_at_random_points(setup: Setup, tmp_path: Path) -> None:
    """Extra rounds beyond the 100: ``bootstrap gc`` killed while it deletes 3000 unreferenced
    blobs; the tagged image must stay whole (fsck, a checkout equal to the reference) and the
    rerun must finish the job."""
    rng = random.Random(SEED + 4)
    store = tmp_path / "store"
    st = Store(store)
    bootstrap("pull", setup.ref, store=store, env=setup.env, check=True)
    _litter(store, rng, 3000)
    full = _timed(lambda: bootstrap("gc", store=store, check=True))
    for i in range(GC_ROUNDS):
        _litter(store, rng, 3000)
        k = run_and_kill(["--store", str(store), "gc"], {}, delay=rng.uniform(0.05, 1.0) * full)
        row = _record("gc", i, "delay", k)
        assert k.killed or k.rc == 0, f"gc round {i} ({row}): {k.stderr}"
        report = maintenance.fsck(st)
        assert report.ok, (row, report.findings())
        dest = tmp_path / f"root{i}"
        bootstrap("checkout", setup.ref, dest, store=store, check=True)
        assert treediff.diff(setup.reference_tree, treediff.snapshot(dest)) == []
        remove_tree(dest)
        bootstrap("gc", store=store, check=True)
        report = maintenance.fsck(st)
        assert report.ok and report.unreferenced == 0, (row, report.to_json())
    print(f"\n{_summary('gc')} (one gc of 3000 blobs {full:.2f}s)")


# ---- install and update, inside a real systemd node -------------------------------------------

NODE_ROUNDS = max(1, round(6 * SCALE))
NODE_STATE = "/var/lib/bootstrap"


def _kill_in_node(node: Any, args: list[str], env: dict[str, str], delay: float) -> Kill:
    """Run ``bootstrap ARGS`` inside ``node`` and SIGKILL it (and everything it started)
    ``delay`` seconds later, unless it ended first."""
    import signal
    import subprocess

    from bootstrap.demo.machine import descendants
    from tests.harness.node import VENV

    proc = subprocess.Popen(
        node.nsenter_argv([str(VENV / "bin/bootstrap"), *args]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=node.exec_env(env),
    )
    started = time.monotonic()
    end = started + delay
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    waited = time.monotonic() - started
    if proc.poll() is not None:
        _, err = proc.communicate()
        return Kill(False, proc.returncode, waited, False, err.decode(errors="replace"))
    for pid in [*reversed(descendants(proc.pid)), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    return Kill(True, None, waited, False, err.decode(errors="replace"))


def _node_checks(node: Any, env: dict[str, str], what: str) -> None:
    ran = node.bootstrap("fsck", env=env)
    assert ran.rc == 0, f"{what}: fsck: {ran.stderr}"
    ran = node.bootstrap("gc", env=env)
    assert ran.rc == 0, f"{what}: gc: {ran.stderr}"
    left = store_leftovers(node.path(NODE_STATE))
    assert left == [], f"{what}: temp files survive gc: {left}"


def _overlays(node: Any, name: str) -> list[str]:
    """Slots of container ``name`` whose rootfs is an overlay mount in the node."""
    out = node.run("cat", "/proc/self/mountinfo").stdout
    prefix = f"{NODE_STATE}/containers/{name}."
    return sorted(
        Path(line.split()[4]).parent.name
        for line in out.splitlines()
        if " - overlay " in line and line.split()[4].startswith(prefix)
    )


#: What bootstrap's init as the container's pid 1 puts before the image's command.
INIT_PREFIX = "/run/.bootstrap-init -- "


def _running_args(node: Any, name: str) -> str:
    """The command line of ``name``'s pid 1, without bootstrap's init in front of it."""
    out = node.run("runc", "list", "--format", "json", check=False).stdout.strip()
    for c in json.loads(out or "null") or []:
        if c["id"] == name and c["status"] == "running":
            line = node.run("cat", f"/proc/{c['pid']}/cmdline").stdout.replace("\0", " ")
            return str(line).removeprefix(INIT_PREFIX)
    return ""


def _assert_running(node: Any, name: str, digest: str, args: str, what: str) -> None:
    """``name`` settles active and enabled, its link names a slot (not the staged dir) whose
    info.json has ``digest``, and the process runc runs is ``args`` (the image's command)."""
    unit = f"{name}.service"
    deadline = time.monotonic() + 30
    while True:
        state = node.systemctl("is-active", unit).stdout.strip()
        if state not in ("activating", "deactivating", "reloading") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert state == "active", f"{what}: {unit} is {state}: {node.journal(unit, 20)}"
    assert node.systemctl("is-enabled", unit).stdout.strip() == "enabled", what
    link = node.path(f"{NODE_STATE}/containers/{name}")
    target = os.readlink(link)
    assert target in (f"{name}.0", f"{name}.1"), f"{what}: {name} -> {target}"
    info = json.loads((link / "info.json").read_text())
    assert info["digest"] == digest, f"{what}: active deployment is {info['digest']}"
    deadline = time.monotonic() + 10
    # the image's command, after the init bootstrap runs as pid 1 ("INIT -- ARGS")
    while (
        running := _running_args(node, name).split(" -- ", 1)[-1]
    ) != args and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running == args, f"{what}: runc runs {running!r}, expected {args!r}"
    # exactly the active slot's rootfs is mounted (an overlay), no other slot's
    assert _overlays(node, name) == [target], f"{what}: overlays {_overlays(node, name)}"


@pytest.fixture(scope="module")
def app_images(setup: Setup) -> dict[str, tuple[str, str, str]]:
    """app:1 and app:2 (busybox ``sleep``) on the registry: tag -> (ref, manifest digest,
    the process's command line)."""
    from tests.harness.imagebuilder import busybox_spec

    out = {}
    for tag, secs in (("1", "3600"), ("2", "3601")):
        built = build_image(setup.root / "apps", tag, busybox_spec(cmd=("sleep", secs)))
        setup.registry.push(setup.root / "apps", tag, f"crash/app:{tag}")
        out[tag] = (f"{setup.registry.host}/crash/app:{tag}", built.digest, f"sleep {secs} ")
    return out


@pytest.mark.node
def test_install_and_update_killed_at_random_points(
    node: Any, setup: Setup, app_images: dict[str, tuple[str, str, str]]
) -> None:
    rng = random.Random(SEED + 3)
    conf = "/etc/bootstrap-test/registries.conf"
    node.write_file(conf, f'[[registry]]\nlocation = "{setup.registry.host}"\ninsecure = true\n')
    env = {"REGISTRIES_CONFIG_PATH": conf, "BOOTSTRAP_SETTLE_SECONDS": "1"}
    (ref1, digest1, args1), (ref2, digest2, args2) = app_images["1"], app_images["2"]
    started = time.monotonic()
    t_install = _timed(lambda: node.bootstrap("install", "probe", ref1, env=env, check=True))
    node.bootstrap("uninstall", "probe", env=env, check=True)
    for i in range(NODE_ROUNDS):  # install, killed; rerun; uninstall
        k = _kill_in_node(node, ["install", "inst", ref1], env, rng.uniform(0.05, 1.1) * t_install)
        row = _record("install", i, "delay", k)
        assert k.killed or k.rc == 0, f"install round {i} ({row}): {k.stderr}"
        _node_checks(node, env, f"install round {i} ({row})")
        ran = node.bootstrap("install", "inst", ref1, env=env)
        assert ran.rc == 0, f"install round {i} ({row}): rerun: {ran.stderr}"
        _assert_running(node, "inst", digest1, args1, f"install round {i} ({row})")
        ran = node.bootstrap("uninstall", "inst", env=env)
        assert ran.rc == 0, f"install round {i}: uninstall: {ran.stderr}"
        assert not node.path("/etc/systemd/system/inst.service").exists()
        assert _overlays(node, "inst") == [], f"install round {i}: still mounted"
        node.bootstrap("gc", env=env, check=True)  # holds of killed installs are gone with them
        holds = node.path(f"{NODE_STATE}/holds")
        assert not holds.is_dir() or not any(holds.iterdir()), f"install round {i}: holds left"
    node.bootstrap("install", "upd", ref1, env=env, check=True)
    t_update = _timed(lambda: node.bootstrap("update", "upd", ref2, env=env, check=True))
    current = ref2
    for i in range(NODE_ROUNDS):  # update to the other image, killed; rerun
        target, digest, args = (ref1, digest1, args1) if current == ref2 else (ref2, digest2, args2)
        k = _kill_in_node(node, ["update", "upd", target], env, rng.uniform(0.05, 1.1) * t_update)
        row = _record("update", i, "delay", k)
        assert k.killed or k.rc == 0, f"update round {i} ({row}): {k.stderr}"
        _node_checks(node, env, f"update round {i} ({row})")
        ran = node.bootstrap("update", "upd", target, env=env)
        assert ran.rc == 0, f"update round {i} ({row}): rerun: {ran.stderr}"
        _assert_running(node, "upd", digest, args, f"update round {i} ({row})")
        current = target
    node.bootstrap("uninstall", "upd", env=env, check=True)
    assert _overlays(node, "upd") == []
    print(
        f"\n{_summary('install')}; {_summary('update')} in {time.monotonic() - started:.1f}s "
        f"(install {t_install:.2f}s, update {t_update:.2f}s)"
    )


def _env_in(node: Any, setup: Setup) -> dict[str, str]:
    conf = "/etc/bootstrap-test/registries.conf"
    node.write_file(conf, f'[[registry]]\nlocation = "{setup.registry.host}"\ninsecure = true\n')
    return {"REGISTRIES_CONFIG_PATH": conf, "BOOTSTRAP_SETTLE_SECONDS": "1"}


@pytest.mark.node
def test_update_killed_right_after_the_switch_is_completed_by_a_rerun(
    node: Any, setup: Setup, app_images: dict[str, tuple[str, str, str]]
) -> None:
    """SIGKILL the moment the NAME link points at the staged NAME.new (before the unit is
    restarted and the slot renamed); rerunning the update must end with the new image running
    from a real slot."""
    import subprocess

    from bootstrap.demo.machine import descendants
    from tests.harness.node import VENV

    env = _env_in(node, setup)
    (ref1, _, _), (ref2, digest2, args2) = app_images["1"], app_images["2"]
    node.bootstrap("install", "sw", ref1, env=env, check=True)
    node.bootstrap("pull", ref2, env=env, check=True)
    link = node.path(f"{NODE_STATE}/containers/sw")
    proc = subprocess.Popen(
        node.nsenter_argv([str(VENV / "bin/bootstrap"), "update", "sw", ref2]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=node.exec_env(env),
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if os.readlink(link) == "sw.new":
                break
        time.sleep(0.0005)
    assert proc.poll() is None, "the update ended before the switch was seen"
    for pid in [*reversed(descendants(proc.pid)), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    proc.wait(30)
    ran = node.bootstrap("update", "sw", ref2, env=env)
    assert ran.rc == 0, ran.stderr
    _assert_running(node, "sw", digest2, args2, "rerun after a kill at the switch")


@pytest.mark.node
def test_auto_update_killed_at_random_points(
    node: Any, setup: Setup, app_images: dict[str, tuple[str, str, str]]
) -> None:
    """A moving tag flips between app:1 and app:2; ``bootstrap auto-update`` is killed at a
    random point of each run. The link always names a deployment (old, new or the staged one
    being proven), and a rerun ends with the tag's image running from a real slot."""
    rng = random.Random(SEED + 5)
    env = _env_in(node, setup)
    apps = setup.root / "apps"
    reg = setup.registry
    reg.push(apps, "1", "crash/app:live")
    live = f"{reg.host}/crash/app:live"
    node.bootstrap("install", "--auto-update", "registry", "au", live, env=env, check=True)
    link = node.path(f"{NODE_STATE}/containers/au")
    current = "1"
    reg.push(apps, "2", "crash/app:live")
    t_run = _timed(lambda: node.bootstrap("auto-update", env=env, check=True))
    current = "2"
    for i in range(NODE_ROUNDS):
        target = "1" if current == "2" else "2"
        _ref, digest, args = app_images[target]
        reg.push(apps, target, "crash/app:live")
        k = _kill_in_node(node, ["auto-update"], env, rng.uniform(0.05, 1.1) * t_run)
        row = _record("auto-update", i, "delay", k)
        assert k.killed or k.rc == 0, f"auto-update round {i} ({row}): {k.stderr}"
        assert os.readlink(link) in ("au.0", "au.1", "au.new"), f"round {i} ({row})"
        _node_checks(node, env, f"auto-update round {i} ({row})")
        ran = node.bootstrap("--json", "auto-update", env=env)
        assert ran.rc == 0, f"auto-update round {i} ({row}): rerun: {ran.stderr}"
        assert ran.json()["units"][0]["result"] in ("updated", "unchanged"), ran.stdout
        _assert_running(node, "au", digest, args, f"auto-update round {i} ({row})")
        current = target
    node.bootstrap("uninstall", "au", env=env, check=True)
    print(f"\n{_summary('auto-update')} (auto-update {t_run:.2f}s)")
