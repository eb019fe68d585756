"""Concurrency with real processes: 8 pulls of images sharing layers through a counting proxy
(each blob fetched once), gc racing 8 pulls and checkouts (nothing in use lost), 8 checkouts of
one image with a cold layer cache (each layer extracted once, every tree right), 8 checkouts
racing for one DEST (one wins, the rest exit 2, nothing partial), parallel imports of one
archive. Complements tests/test_concurrency_store.py (3 pulls, gc vs one pull)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootstrap.image import maintenance
from bootstrap.image.store import Store
from tests.harness import treediff
from tests.harness.cli import bootstrap, finish, spawn
from tests.harness.crashloop import (
    ThrottledRelay,
    registries_env,
    store_leftovers,
    tmp_file_at_least,
)
from tests.harness.faultproxy import MANIFEST_PATH, FaultProxy
from tests.harness.imagebuilder import (
    BuiltImage,
    File,
    Layer,
    build_image,
    busybox_spec,
    random_content,
    save_docker_archive,
)
from tests.harness.registry import Registry

pytestmark = pytest.mark.slow

N = 8
FINISH_TIMEOUT = 180  # seconds a spawned bootstrap command may take


@dataclass
class Eight:
    proxy: FaultProxy
    built: list[BuiltImage]
    refs: list[str]
    env: dict[str, str]
    shared: set[str]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, BuiltImage]]:
    """8 images: the busybox layer and a 3 MiB layer shared by all, plus one small layer each."""
    root = tmp_path_factory.mktemp("eight")
    shared = Layer([File("shared/blob", random_content(11, 3 << 20))], level=1)
    out = []
    for i in range(N):
        own = Layer([File(f"own/{i}", f"image {i}\n".encode() * 50)])
        spec = busybox_spec(cmd=("true",), extra=[shared, own])
        out.append((root / f"l{i}", build_image(root / f"l{i}", "t", spec)))
    return out


@pytest.fixture
def eight(
    registry: Registry, layouts: list[tuple[Path, BuiltImage]], tmp_path: Path
) -> Iterator[Eight]:
    for i, (layout, _) in enumerate(layouts):
        registry.push(layout, "t", f"eight/img{i}:1")
    built = [b for _, b in layouts]
    with FaultProxy.for_registry(registry) as proxy:
        yield Eight(
            proxy,
            built,
            [proxy.ref(f"eight/img{i}", "1") for i in range(N)],
            registries_env(tmp_path, proxy.host),
            {built[0].layers[0], built[0].layers[1]},
        )


def test_eight_pulls_fetch_every_blob_once(eight: Eight, tmp_path: Path) -> None:
    store = tmp_path / "store"
    # the first fetch of each shared layer answers late: all 8 pulls pile up behind it
    for digest in eight.shared:
        eight.proxy.add("delay", digest, seconds=1.0)
    started = time.monotonic()
    procs = [spawn("pull", ref, store=store, env=eight.env) for ref in eight.refs]
    results = [finish(p, FINISH_TIMEOUT) for p in procs]
    elapsed = time.monotonic() - started
    for (rc, out, err), b in zip(results, eight.built, strict=True):
        assert rc == 0, err
        assert out.strip() == b.digest
    every = {d for b in eight.built for d in (b.config_digest, *b.layers)}
    for digest in every:
        gets = [r for r in eight.proxy.matching(f"/blobs/{digest}") if r.method == "GET"]
        assert len(gets) == 1, (digest, gets)
    assert eight.proxy.count(MANIFEST_PATH) == N
    st = Store(store)
    report = maintenance.fsck(st)
    assert report.ok and report.unreferenced == 0, report.findings()
    assert sorted(r.name for r in st.images()) == sorted(eight.refs)
    assert store_leftovers(store) == []
    print(f"\n8 pulls sharing 2 layers: {elapsed:.2f}s, {len(every)} blobs, each fetched once")


def test_gc_racing_pulls_and_checkouts_loses_nothing(eight: Eight, tmp_path: Path) -> None:
    store = tmp_path / "store"
    st = Store(store)
    # one image already stored and being checked out while the others pull and gc runs
    bootstrap("pull", eight.refs[0], store=store, env=eight.env, check=True)
    orphan = st.put_blob(b"unreferenced", "application/octet-stream")
    for digest in eight.shared:
        eight.proxy.add("delay", digest, seconds=0.5)
    # start the pulls and checkouts staggered, so gc finds windows between them
    todo: list[tuple[str, ...]] = [("pull", ref) for ref in eight.refs[1:]]
    todo[1:1] = [("checkout", eight.refs[0], str(tmp_path / f"co{i}")) for i in range(3)]
    started: list[subprocess.Popen[str]] = []

    def launch() -> None:
        for argv in todo:
            started.append(spawn(*argv, store=store, env=eight.env))
            time.sleep(0.4)

    launcher = threading.Thread(target=launch)
    launcher.start()
    gcs = 0
    while launcher.is_alive() or any(p.poll() is None for p in started):
        ran = bootstrap("gc", store=store)
        assert ran.rc == 0, ran.stderr
        gcs += 1
    launcher.join()
    procs = [p for p, argv in zip(started, todo, strict=True) if argv[0] == "pull"]
    checkouts = [p for p, argv in zip(started, todo, strict=True) if argv[0] == "checkout"]
    for p, b in zip(procs, eight.built[1:], strict=True):
        rc, out, err = finish(p, FINISH_TIMEOUT)
        assert rc == 0, err
        assert out.strip() == b.digest
    reference = None
    for i, p in enumerate(checkouts):
        rc, _, err = finish(p, FINISH_TIMEOUT)
        assert rc == 0, err
        snap = treediff.snapshot(tmp_path / f"co{i}")
        reference = reference or snap
        assert treediff.diff(reference, snap) == []
    assert gcs >= 1
    assert not st.has_blob(orphan.digest)
    assert maintenance.gc(st).blobs_removed == 0  # everything left is in use
    report = maintenance.fsck(st)
    assert report.ok, report.findings()
    for ref in eight.refs:
        image = st.image(ref)
        assert all(st.has_blob(layer.digest) for layer in image.manifest.layers)
    print(f"\ngc ran {gcs} times during 7 pulls and 3 checkouts")


def test_eight_checkouts_share_the_layer_cache(eight: Eight, tmp_path: Path) -> None:
    store = tmp_path / "store"
    bootstrap("pull", eight.refs[0], store=store, env=eight.env, check=True)
    procs = [
        spawn("--json", "checkout", eight.refs[0], tmp_path / f"root{i}", store=store)
        for i in range(N)
    ]
    results = [finish(p, FINISH_TIMEOUT) for p in procs]
    extracted = 0
    for rc, out, err in results:
        assert rc == 0, err
        extracted += json.loads(out)["layers_extracted"]
    layers = len(eight.built[0].layers)
    assert extracted == layers, f"{extracted} extractions for {layers} layers"
    first = treediff.snapshot(tmp_path / "root0")
    for i in range(1, N):
        assert treediff.diff(first, treediff.snapshot(tmp_path / f"root{i}")) == []
    assert (tmp_path / "root0" / "own" / "0").read_bytes() == b"image 0\n" * 50
    assert store_leftovers(store) == []
    assert maintenance.fsck(Store(store)).ok


def test_eight_checkouts_racing_for_one_dest(eight: Eight, tmp_path: Path) -> None:
    store = tmp_path / "store"
    bootstrap("pull", eight.refs[1], store=store, env=eight.env, check=True)
    dest = tmp_path / "rootfs"
    procs = [spawn("checkout", eight.refs[1], dest, store=store) for _ in range(N)]
    results = [finish(p, FINISH_TIMEOUT) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0] + [2] * (N - 1), [(rc, err) for rc, _, err in results]
    for rc, _, err in results:
        if rc == 2:
            assert "already exists" in err
    assert (dest / "own" / "1").read_bytes() == b"image 1\n" * 50
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("rootfs")) == ["rootfs"]
    assert store_leftovers(store) == []


def test_parallel_imports_of_one_archive(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    built = save_docker_archive(
        busybox_spec(extra=[Layer([File("x", random_content(1, 1 << 20))])]),
        archive,
        "conc/imported:1",
    )
    store = tmp_path / "store"
    procs = [spawn("--json", "import", archive, store=store) for _ in range(4)]
    digests = set()
    for p in procs:
        rc, out, err = finish(p, FINISH_TIMEOUT)
        assert rc == 0, err
        digests.add(json.loads(out)["images"][0]["digest"])
    assert len(digests) == 1
    st = Store(store)
    assert [r.name for r in st.images()] == ["docker.io/conc/imported:1"]
    report = maintenance.fsck(st)
    assert report.ok and report.unreferenced == 0, report.findings()
    assert len(built.layers) == len(st.image("docker.io/conc/imported:1").manifest.layers)


def _blob_locks(pid: int, store: Path) -> set[str]:
    """The blob lock files process ``pid`` has open (held, or polled for while waiting)."""
    prefix = str(store / "locks" / "blobs") + "/"
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(prefix):
            found.add(target)
    return found


def test_puller_killed_holding_a_blob_lock_hands_over(
    registry: Registry, layouts: list[tuple[Path, BuiltImage]], tmp_path: Path
) -> None:
    """Two pulls of one image; the one downloading the shared layer (holding its blob lock) is
    SIGKILLed mid-download: the other takes the lock over, fetches the blob and completes; the
    killed one's temp file goes with gc."""
    layout, built = layouts[2]
    registry.push(layout, "t", "eight/handover:1")
    with ThrottledRelay(("127.0.0.1", registry.port), rate=2 << 20) as relay:
        env = registries_env(tmp_path, relay.host)
        ref = f"{relay.host}/eight/handover:1"
        store = tmp_path / "store"
        first = spawn("pull", ref, store=store, env=env)
        deadline = time.monotonic() + 30
        while not tmp_file_at_least(store, 256 << 10)():
            assert time.monotonic() < deadline and first.poll() is None, "no download seen"
            time.sleep(0.005)
        held = _blob_locks(first.pid, store)
        second = spawn("pull", ref, store=store, env=env)
        deadline = time.monotonic() + 30
        while not held & _blob_locks(second.pid, store):  # waiting on a lock the first holds
            assert time.monotonic() < deadline and second.poll() is None, "second never waited"
            time.sleep(0.005)
        first.kill()
        first.wait(10)
        rc, out, err = finish(second, FINISH_TIMEOUT)
    assert rc == 0, err
    assert out.strip() == built.digest
    st = Store(store)
    assert maintenance.fsck(st).ok
    assert maintenance.gc(st).temp_removed >= 1  # the killed pull's partial blob
    assert store_leftovers(store) == []
    report = maintenance.fsck(st)
    assert report.ok and report.unreferenced == 0
