"""The store under concurrent use by real processes: several pulls of images sharing layers fetch
each blob once; gc while pulls run loses nothing in use; a pull killed with SIGKILL mid-download
leaves a valid store and a rerun completes."""

from __future__ import annotations

import collections
import contextlib
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootstrap.image import maintenance
from bootstrap.image.store import Store
from bootstrap.locks import flocked
from tests.harness.cli import bootstrap, finish, spawn
from tests.harness.crashloop import ThrottledRelay
from tests.harness.imagebuilder import (
    BuiltImage,
    File,
    Layer,
    build_image,
    busybox_spec,
    random_content,
)
from tests.harness.registry import Registry, client_env

pytestmark = pytest.mark.slow

SHARED_SIZE = 24 * 1024 * 1024
FINISH_TIMEOUT = 120  # seconds a spawned bootstrap command may take
_BLOB_GET = re.compile(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP/[\d.]+" (\d{3})')


@dataclass
class Images:
    registry: Registry
    built: list[BuiltImage]
    refs: list[str]
    shared: str  # digest of the big layer all images share


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, BuiltImage]]:
    """Three images: busybox + one shared 24 MiB incompressible layer (gzip level 1, quick to
    build) + a small layer of their own; built once per module."""
    root = tmp_path_factory.mktemp("concurrency-images")
    shared = Layer([File("shared/big", random_content(7, SHARED_SIZE))], level=1)
    out = []
    for i in range(3):
        own = Layer([File(f"own/{i}", f"image {i}".encode() * 100)])
        out.append(
            (
                root / f"src{i}",
                build_image(root / f"src{i}", "t", busybox_spec(extra=[shared, own])),
            )
        )
    return out


@pytest.fixture
def images(
    registry_factory: Callable[..., Registry], layouts: list[tuple[Path, BuiltImage]]
) -> Images:
    """The three images on a private TLS registry (its log counts this test's requests only)."""
    reg = registry_factory("tls")
    refs = []
    for i, (layout, _) in enumerate(layouts):
        reg.push(layout, "t", f"img{i}:1")
        refs.append(f"{reg.host}/img{i}:1")
    built = [b for _, b in layouts]
    return Images(reg, built, refs, built[0].layers[1])


def wait_for(cond: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_said(proc: subprocess.Popen[str], text: str, timeout: float = 30) -> None:
    """Read ``proc``'s stderr until a line holding ``text`` (the process is still running)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"{proc.args} never said {text!r}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready and text in proc.stderr.readline():
            return


def blob_gets(reg: Registry) -> collections.Counter[str]:
    return collections.Counter(
        m.group(1) for m in _BLOB_GET.finditer(reg.log()) if m.group(2) in ("200", "206")
    )


def test_parallel_pulls_fetch_each_blob_once(images: Images, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    env = client_env(images.registry, tmp_path)
    # Hold the shared layer's lock so all three pulls are surely in flight together when it
    # becomes available; then exactly one of them may fetch it.
    with flocked(store.locks / "blobs" / f"sha256-{images.shared[7:]}.lock"):
        procs = [spawn("pull", ref, store=store.root, env=env) for ref in images.refs]
        wait_for(
            lambda: all(store.has_blob(b.layers[2]) for b in images.built),
            what="every pull to store its own layer",
        )
        time.sleep(0.3)
    results = [finish(p, FINISH_TIMEOUT) for p in procs]
    for (rc, out, err), built in zip(results, images.built, strict=True):
        assert rc == 0, err
        assert out.strip() == built.digest
    gets = blob_gets(images.registry)
    every_blob = {d for b in images.built for d in (b.config_digest, *b.layers)}
    assert set(gets) == every_blob
    assert all(n == 1 for n in gets.values()), gets
    assert maintenance.fsck(store).ok
    assert sorted(r.name for r in store.images()) == sorted(images.refs)


def test_gc_during_pull_loses_nothing(images: Images, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    orphan = store.put_blob(b"nobody references me", "application/octet-stream")
    env = client_env(images.registry, tmp_path)
    built = images.built[0]
    with flocked(store.locks / "blobs" / f"sha256-{images.shared[7:]}.lock"):
        pull = spawn("pull", images.refs[0], store=store.root, env=env)
        wait_for(lambda: store.has_blob(built.layers[2]), what="the pull's own layer")
        gc = spawn("--json", "gc", store=store.root)
        wait_said(gc, "waiting for other bootstrap commands using the store")
        assert gc.poll() is None, "gc must wait while a pull uses the store"
        assert store.has_blob(built.config_digest) and store.has_blob(orphan.digest)
    rc, _, err = finish(pull, FINISH_TIMEOUT)
    assert rc == 0, err
    rc, gc_out, err = finish(gc, FINISH_TIMEOUT)
    assert rc == 0, err
    assert '"blobs_removed": 1' in gc_out  # the orphan only
    assert not store.has_blob(orphan.digest)
    assert maintenance.fsck(store).ok
    image = store.image(images.refs[0])
    assert all(store.has_blob(layer.digest) for layer in image.manifest.layers)


@pytest.fixture
def slow_images(
    images: Images, tmp_path: Path
) -> Iterator[tuple[Images, list[str], dict[str, str]]]:
    relay = ThrottledRelay(("127.0.0.1", images.registry.port), 8 * 1024 * 1024)
    host = relay.host
    assert images.registry.ca_cert is not None
    certs = tmp_path / "relay-certs.d" / host
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(images.registry.ca_cert.read_bytes())
    conf = tmp_path / "relay-registries.conf"
    conf.write_text("")
    refs = [r.replace(images.registry.host, host) for r in images.refs]
    yield (
        images,
        refs,
        {"BOOTSTRAP_CERTS_D": str(certs.parent), "REGISTRIES_CONFIG_PATH": str(conf)},
    )
    relay.close()


def test_sigkill_mid_download_leaves_a_valid_store(
    slow_images: tuple[Images, list[str], dict[str, str]], tmp_path: Path
) -> None:
    images, refs, env = slow_images
    store = Store(tmp_path / "store")

    def partial() -> bool:
        for p in store.tmp.iterdir() if store.tmp.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # committed (renamed) meanwhile
                if p.stat().st_size > 1 << 20:
                    return True
        return False

    pull = spawn("pull", refs[0], store=store.root, env=env)
    wait_for(partial, what="a partly downloaded blob")
    pull.send_signal(signal.SIGKILL)
    pull.wait(10)
    assert store.images() == []
    report = maintenance.fsck(store)
    assert report.ok, report.findings()
    ran = bootstrap("pull", refs[0], store=store.root, env=env, check=True)
    assert ran.stdout.strip() == images.built[0].digest
    assert maintenance.fsck(store).ok
    assert maintenance.gc(store).temp_removed >= 1  # the killed pull's temp file
    assert maintenance.fsck(store).ok and not list(store.tmp.iterdir())


def test_pulls_and_gcs_racing(
    slow_images: tuple[Images, list[str], dict[str, str]], tmp_path: Path
) -> None:
    images, refs, env = slow_images
    store = Store(tmp_path / "store")
    procs = [spawn("pull", ref, store=store.root, env=env) for ref in refs]
    gcs = 0
    while any(p.poll() is None for p in procs):
        ran = bootstrap("gc", store=store.root)
        assert ran.rc == 0, ran.stderr
        gcs += 1
    for p, built in zip(procs, images.built, strict=True):
        rc, out, err = finish(p, FINISH_TIMEOUT)
        assert rc == 0, err
        assert out.strip() == built.digest
    assert gcs >= 1
    assert maintenance.gc(store).blobs_removed == 0
    assert maintenance.fsck(store).ok
    for ref in refs:
        image = store.image(ref)
        assert all(store.has_blob(layer.digest) for layer in image.manifest.layers)
