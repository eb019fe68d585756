"""gc and fsck (bootstrap/image/maintenance.py) over a store filled locally: what gc removes
(unreferenced blobs, unused cached layers, temp dirs of killed checkouts) and keeps (what is
tagged or used), that it waits for another process using the store; what fsck finds (damaged,
missing and unreferenced blobs, a broken index), names, and repairs."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootstrap.errors import BusyError
from bootstrap.image import maintenance
from bootstrap.image.compose import checkout
from bootstrap.image.model import Descriptor
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.store_support import REF, flip_byte, sha256, streamer
from tests.harness.unpack_support import plain_tar, store_plain

# ---- gc ---------------------------------------------------------------------------------------


def test_gc_removes_only_unreferenced(
    store: Store, stored_busybox: Descriptor, tmp_path: Path
) -> None:
    image = store.image(REF)
    kept_blobs = {p.name for p in (store.blobs / "sha256").iterdir()}
    orphan = store.put_blob(b"orphan" * 1000, "application/octet-stream")
    (store.tmp / "blob-dead.part").write_bytes(b"x" * 10)
    used = store.layer_cache_dir(image.config.diff_ids[0])
    used.mkdir(parents=True)
    (used / "f").write_text("x")
    unused = store.layer_cache_dir(sha256(b"unused layer"))
    unused.mkdir(parents=True)
    (store.layers / "sha256" / ".tmp-build").mkdir()
    report = maintenance.gc(store)
    assert report.blobs_removed == 1 and report.bytes_freed == 6000
    assert report.temp_removed == 1 and report.layers_removed == 2
    assert {p.name for p in (store.blobs / "sha256").iterdir()} == kept_blobs
    assert not store.has_blob(orphan.digest)
    assert used.is_dir() and not unused.exists()
    assert maintenance.fsck(store).ok
    # after rmi, everything goes
    store.untag(REF)
    report = maintenance.gc(store)
    assert report.blobs_removed == len(kept_blobs) and report.layers_removed == 1
    assert not list((store.blobs / "sha256").iterdir())


def test_gc_drops_unused_cached_layers(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    layer = plain_tar({"a": b"a"})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    store_plain(store, "example.com/g:1", layer, diff_id)
    checkout(store, store.image("example.com/g:1"), tmp_path / "r")
    assert store.layer_cache_dir(diff_id).is_dir()
    maintenance.gc(store)
    assert store.layer_cache_dir(diff_id).is_dir()  # still referenced
    store.untag("example.com/g:1")
    maintenance.gc(store)
    assert not store.layer_cache_dir(diff_id).exists()
    assert (tmp_path / "r/a").read_bytes() == b"a"  # a checkout survives its cache


def _checkout_killed_midway(store_root: str, name: str, dest: str) -> None:
    """In a forked child: a checkout that is SIGKILLed while composing its temp dir."""
    import signal

    from bootstrap.image import compose

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    compose._Composer.layer = die  # type: ignore[method-assign]
    store = Store(Path(store_root))
    checkout(store, store.image(name), Path(dest))


def test_gc_removes_temp_dirs_of_killed_checkouts(tmp_path: Path) -> None:
    """A checkout killed -9 leaves DEST.tmp-X; gc removes it (the store recorded it), even if
    no checkout of DEST ever runs again. A record naming anything else is not followed."""
    store = Store(tmp_path / "store")
    store.init()
    layer = plain_tar({"a": b"a"})
    store_plain(store, "example.com/k:1", layer, "sha256:" + hashlib.sha256(layer).hexdigest())
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(
        target=_checkout_killed_midway,
        args=(str(store.root), "example.com/k:1", str(tmp_path / "dest" / "r")),
    )
    (tmp_path / "dest").mkdir()
    child.start()
    child.join(60)
    assert child.exitcode == -9
    left = sorted(p.name for p in (tmp_path / "dest").iterdir())
    assert len(left) == 2 and left[0].startswith("r.tmp-") and left[1] == left[0] + ".lock"
    # a forged record: gc must not follow it outside a checkout temp
    victim = tmp_path / "precious"
    victim.mkdir()
    (store.tmp / "checkout-forged.path").write_bytes(os.fsencode(str(victim)))
    report = maintenance.gc(store)
    assert report.checkouts_removed == 1
    assert list((tmp_path / "dest").iterdir()) == []
    assert victim.is_dir()
    assert not list(store.tmp.glob("checkout-*"))
    # a checkout that completes leaves no record behind
    checkout(store, store.image("example.com/k:1"), tmp_path / "dest" / "r")
    assert not list(store.tmp.glob("checkout-*")) and maintenance.gc(store).checkouts_removed == 0


def test_gc_waits_for_another_process_using_the_store(store: Store, tmp_path: Path) -> None:
    orphan = store.put_blob(b"orphan", "application/octet-stream")
    ready = tmp_path / "ready"
    code = (
        "import sys, time, pathlib\n"
        "from bootstrap.image.store import Store\n"
        f"s = Store(pathlib.Path({str(store.root)!r}))\n"
        "with s.using():\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n"
        "    time.sleep(1.5)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        while not ready.exists():
            time.sleep(0.02)
        with pytest.raises(BusyError):
            maintenance.gc(store, timeout=0.2)
        assert store.has_blob(orphan.digest)
        started = time.monotonic()
        report = maintenance.gc(store)
        assert time.monotonic() - started > 0.5  # waited for the other process
        assert report.blobs_removed == 1
    finally:
        proc.wait(timeout=10)


# ---- fsck -------------------------------------------------------------------------------------


def test_fsck_clean_damaged_missing(store: Store, stored_busybox: Descriptor) -> None:
    report = maintenance.fsck(store)
    assert report.ok and report.blobs_checked == 3 and report.refs_checked == 1
    image = store.image(REF)
    layer = store.blob_path(image.manifest.layers[0].digest)
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0x01
    layer.write_bytes(bytes(data))
    report = maintenance.fsck(store)
    assert not report.ok and report.damaged == (image.manifest.layers[0].digest,)
    layer.unlink()
    report = maintenance.fsck(store)
    assert report.missing == (image.manifest.layers[0].digest,) and not report.damaged
    orphan = store.put_blob(b"orphan", "application/octet-stream")
    assert maintenance.fsck(store).unreferenced == 1 and orphan


def test_fsck_names_paths_and_images_and_repair_sets_damaged_blobs_aside(
    store: Store, stored_busybox: Descriptor
) -> None:
    """A damaged blob is named with its path and the images that need it; ``--repair`` moves it
    into damaged/ (kept, never deleted by gc) so that it is missing, and the hint says which
    image to pull; a missing blob's hint is the pull, not "delete"."""
    second = "docker.io/library/busybox:second"
    store.tag(second, stored_busybox)
    image = store.image(REF)
    layer = image.manifest.layers[0].digest
    path = store.blob_path(layer)
    good = path.read_bytes()
    flip_byte(path)
    report = maintenance.fsck(store)
    assert report.needed_by[layer] == (REF, second) and report.paths[layer] == str(path)
    assert report.images_to_fetch() == (REF, second)
    ran = bootstrap("fsck", store=store.root)
    assert ran.rc == 4
    assert f"fsck: damaged blob {layer}: {path} (needed by {REF}, {second})" in ran.stderr
    hint = ran.stderr.splitlines()[-1]
    assert hint.startswith("bootstrap: hint: 'bootstrap fsck --repair' moves the damaged blobs")
    assert f"bootstrap pull {REF}; bootstrap pull {second}" in hint and "delete" not in hint
    doc = bootstrap("--json", "fsck", store=store.root).json()["result"]
    assert doc["blobs"] == [
        {"digest": layer, "state": "damaged", "path": str(path), "images": [REF, second]}
    ]

    ran = bootstrap("fsck", "--repair", store=store.root)
    assert ran.rc == 4  # the image still needs that blob: a pull fetches it
    (aside,) = store.set_aside_blobs()
    assert aside.name.startswith(f"sha256-{layer[7:]}.") and not path.exists()
    assert f"fsck: moved damaged blob {layer} aside to {aside}" in ran.stderr
    assert f"fsck: missing blob {layer}: {path} (needed by {REF}, {second})" in ran.stderr
    hint = ran.stderr.splitlines()[-1]
    assert hint.startswith(
        f"bootstrap: hint: pull the images that need them again: bootstrap pull {REF}"
    )
    assert "delete" not in hint

    # gc leaves the evidence alone and says so; fsck of a whole store mentions it
    ran = bootstrap("gc", store=store.root, check=True)
    assert f"1 damaged blob set aside in {store.damaged}" in ran.stdout and aside.exists()
    store.ensure_blob(image.manifest.layers[0], streamer(good))  # what a pull does
    ran = bootstrap("fsck", store=store.root, check=True)
    assert f"1 damaged blob kept aside in {store.damaged}" in ran.stdout


def test_fsck_reports_a_broken_index(store: Store) -> None:
    (store.oci / "index.json").write_text("{not json")
    report = maintenance.fsck(store)
    assert not report.ok and "not a valid OCI index" in report.problems[0]


def test_cli_fsck_damage_exits_4_with_report(store: Store, stored_busybox: Descriptor) -> None:
    image = store.image(REF)
    layer = store.blob_path(image.manifest.layers[0].digest)
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    ran = bootstrap("fsck", store=store.root)
    assert ran.rc == 4
    assert f"damaged blob {image.manifest.layers[0].digest}" in ran.stderr
    ran = bootstrap("--json", "fsck", store=store.root)
    assert ran.rc == 4
    doc = ran.json()
    assert doc["exit_code"] == 4 and doc["result"]["damaged"] == [image.manifest.layers[0].digest]
