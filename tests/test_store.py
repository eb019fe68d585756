"""The shared store on its own: blobs verified on the way in, the OCI layout other tools read,
refs, gc, fsck and the CLI commands over a store filled locally (no registry)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bootstrap.errors import BusyError, IntegrityError, UsageError
from bootstrap.image import maintenance
from bootstrap.image.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_LAYER_GZIP,
    REF_NAME_ANNOTATION,
    Descriptor,
    Platform,
)
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.imagebuilder import (
    build_index,
    busybox_spec,
)

REF = "docker.io/library/busybox:latest"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def streamer(data: bytes, chunk: int = 7) -> Callable[[Callable[[bytes], object]], None]:
    def fetch(write: Callable[[bytes], object]) -> None:
        for i in range(0, len(data), chunk):
            write(data[i : i + chunk])

    return fetch


def copy_layout_image(store: Store, layout: Path, tag: str, name: str) -> Descriptor:
    """Copy the image tagged ``tag`` in an OCI layout into the store through ensure_blob (what a
    pull does, minus the registry) and tag it ``name``."""
    index = json.loads((layout / "index.json").read_bytes())
    entry = next(
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag
    )
    top = Descriptor.from_json(entry)

    def copy(desc: Descriptor) -> None:
        path = layout / "blobs" / desc.digest.replace(":", "/")
        data = path.read_bytes()
        store.ensure_blob(desc, streamer(data, 65536))
        if desc.media_type in INDEX_TYPES:
            for child in json.loads(data)["manifests"]:
                copy(Descriptor.from_json(child))
        elif desc.media_type in MANIFEST_TYPES:
            doc = json.loads(data)
            copy(Descriptor.from_json(doc["config"]))
            for layer in doc["layers"]:
                copy(Descriptor.from_json(layer))

    with store.using():
        copy(top)
        store.tag(name, Descriptor(top.media_type, top.digest, top.size))
    return top


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.init()
    return s


@pytest.fixture
def stored_busybox(store: Store, busybox_image: Path) -> Descriptor:
    return copy_layout_image(store, busybox_image, "latest", REF)


def no_temp_files(store: Store) -> bool:
    return not any(store.tmp.iterdir())


# ---- layout ---------------------------------------------------------------------------------


def test_init_is_idempotent_and_a_valid_layout(store: Store) -> None:
    store.init()
    Store(store.root).init()
    assert json.loads((store.oci / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((store.oci / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []
    for d in ("tmp", "locks", "layers", "oci/blobs/sha256"):
        assert (store.root / d).is_dir()


def test_skopeo_and_umoci_read_the_store(
    store: Store, stored_busybox: Descriptor, tmp_path: Path
) -> None:
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{store.oci}:{REF}"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["Digest"] == stored_busybox.digest
    bundle = tmp_path / "bundle"
    out = subprocess.run(
        ["umoci", "unpack", "--image", f"{store.oci}:{REF}", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()


# ---- blobs ----------------------------------------------------------------------------------


def test_ensure_blob_streams_verifies_and_renames(store: Store) -> None:
    data = os.urandom(100_000)
    desc = Descriptor(OCI_LAYER_GZIP, sha256(data), len(data))
    path = store.ensure_blob(desc, streamer(data, 4096))
    assert path == store.blob_path(desc.digest) and path.read_bytes() == data
    assert store.has_blob(desc.digest)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert no_temp_files(store)

    def boom(write: Callable[[bytes], object]) -> None:
        raise AssertionError("present blobs are not fetched again")

    assert store.ensure_blob(desc, boom) == path


def test_ensure_blob_sha512(store: Store) -> None:
    data = b"x" * 5000
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    path = store.ensure_blob(Descriptor(OCI_LAYER_GZIP, digest, len(data)), streamer(data))
    assert path.parent.name == "sha512" and path.read_bytes() == data


@pytest.mark.parametrize(
    ("content", "size", "what"),
    [
        (b"hello world", 11, "hashes to"),  # wrong content, right size
        (b"hello", 11, "expected 11"),  # truncated
        (b"hello world and more", 11, "more than the 11 bytes"),  # too long
    ],
)
def test_ensure_blob_mismatch_stores_nothing(
    store: Store, content: bytes, size: int, what: str
) -> None:
    desc = Descriptor(OCI_LAYER_GZIP, sha256(b"something else"), size)
    with pytest.raises(IntegrityError, match=what) as info:
        store.ensure_blob(desc, streamer(content, 4))
    assert info.value.exit_code == 4
    assert not store.has_blob(desc.digest)
    assert no_temp_files(store)


def test_ensure_blob_too_long_stops_at_once(store: Store) -> None:
    calls = 0

    def endless(write: Callable[[bytes], object]) -> None:
        nonlocal calls
        while True:
            calls += 1
            write(b"x" * 1000)

    with pytest.raises(IntegrityError):
        store.ensure_blob(Descriptor(OCI_LAYER_GZIP, sha256(b""), 2500), endless)
    assert calls == 3 and no_temp_files(store)


def test_ensure_blob_fetch_error_propagates_and_cleans_up(store: Store) -> None:
    def broken(write: Callable[[bytes], object]) -> None:
        write(b"partial")
        raise ConnectionError("reset")

    with pytest.raises(ConnectionError):
        store.ensure_blob(Descriptor(OCI_LAYER_GZIP, sha256(b"partial data"), 12), broken)
    assert no_temp_files(store) and not list((store.blobs / "sha256").iterdir())


def test_ensure_blob_refetches_a_damaged_blob_of_wrong_size(store: Store) -> None:
    data = b"0123456789" * 100
    desc = Descriptor(OCI_LAYER_GZIP, sha256(data), len(data))
    store.ensure_blob(desc, streamer(data))
    store.blob_path(desc.digest).write_bytes(data[:10])  # damaged (truncated) on disk
    store.ensure_blob(desc, streamer(data))
    assert store.blob_path(desc.digest).read_bytes() == data


def test_ensure_blob_rejects_a_lying_size(store: Store) -> None:
    data = b"abc" * 10
    store.ensure_blob(Descriptor(OCI_LAYER_GZIP, sha256(data), len(data)), streamer(data))
    with pytest.raises(IntegrityError, match="says 31 bytes"):
        store.ensure_blob(Descriptor(OCI_LAYER_GZIP, sha256(data), 31), streamer(data))


def test_concurrent_ensure_blob_fetches_once(store: Store) -> None:
    data = os.urandom(200_000)
    desc = Descriptor(OCI_LAYER_GZIP, sha256(data), len(data))
    fetches = 0
    lock = threading.Lock()

    def slow(write: Callable[[bytes], object]) -> None:
        nonlocal fetches
        with lock:
            fetches += 1
        for i in range(0, len(data), 20_000):
            time.sleep(0.01)
            write(data[i : i + 20_000])

    errors: list[BaseException] = []

    def worker() -> None:
        try:
            Store(store.root).ensure_blob(desc, slow)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and fetches == 1
    assert store.blob_path(desc.digest).read_bytes() == data


def test_put_blob_and_read_blob(store: Store) -> None:
    desc = store.put_blob(b'{"a": 1}', "application/json")
    assert desc == Descriptor("application/json", sha256(b'{"a": 1}'), 8)
    assert store.read_blob(desc.digest) == b'{"a": 1}'
    with pytest.raises(IntegrityError):
        store.put_blob(b"data", "application/json", digest=sha256(b"other"))
    store.blob_path(desc.digest).write_bytes(b'{"a": 2}')
    with pytest.raises(IntegrityError, match="damaged"):
        store.read_blob(desc.digest)
    with pytest.raises(IntegrityError, match="missing"):
        store.open_blob(sha256(b"absent"))


def test_malformed_digest_is_refused(store: Store) -> None:
    for bad in ("sha256:../../etc", "md5:abc", "sha256:" + "A" * 64):
        with pytest.raises(IntegrityError):
            store.blob_path(bad)


# ---- refs -----------------------------------------------------------------------------------


def test_tag_resolve_untag(store: Store) -> None:
    a = store.put_blob(b"manifest a", "application/vnd.oci.image.manifest.v1+json")
    b = store.put_blob(b"manifest b", "application/vnd.oci.image.manifest.v1+json")
    store.tag("example.com/x:1", a)
    store.tag("example.com/y:1", a)
    store.tag("example.com/x:1", b)  # replaces
    assert store.resolve("example.com/x:1").digest == b.digest
    assert [(r.name, r.digest) for r in store.images()] == [
        ("example.com/x:1", b.digest),
        ("example.com/y:1", a.digest),
    ]
    entries = json.loads((store.oci / "index.json").read_text())["manifests"]
    assert len(entries) == 2
    assert store.untag("example.com/x:1").digest == b.digest
    with pytest.raises(UsageError, match="not in the store") as info:
        store.resolve("example.com/x:1")
    assert info.value.hint == "bootstrap pull example.com/x:1"
    with pytest.raises(UsageError):
        store.untag("example.com/x:1")


def test_tag_requires_the_blob(store: Store) -> None:
    with pytest.raises(IntegrityError):
        store.tag("x.io/a:1", Descriptor(OCI_LAYER_GZIP, sha256(b"nope"), 4))
    assert store.images() == []


def test_image_parses_manifest_and_config(store: Store, stored_busybox: Descriptor) -> None:
    image = store.image(REF)
    assert image.name == REF
    assert image.manifest.digest == stored_busybox.digest
    assert image.config.cmd == ("sleep", "3600")
    assert len(image.config.diff_ids) == len(image.manifest.layers) == 1


def test_image_selects_platform_of_a_stored_index(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "src"
    host = Platform.host()
    other = "arm64" if host.architecture != "arm64" else "amd64"
    built = build_index(
        layout,
        "multi",
        [
            busybox_spec(cmd=("echo", "host")),
            busybox_spec(cmd=("echo", "other"), architecture=other),
        ],
    )
    copy_layout_image(store, layout, "multi", "x.io/multi:1")
    assert store.image("x.io/multi:1").config.cmd == ("echo", "host")
    assert store.image("x.io/multi:1", Platform("linux", other)).config.cmd == ("echo", "other")
    # only the other platform stored: the default falls back to the one stored
    store.blob_path(built.children[0].digest).unlink()
    assert store.image("x.io/multi:1").config.cmd == ("echo", "other")
    with pytest.raises(UsageError, match="no manifest for"):
        store.image("x.io/multi:1", Platform("linux", "s390x"))


# ---- locks ----------------------------------------------------------------------------------


def test_using_is_reentrant_and_blocks_exclusive(store: Store) -> None:
    with store.using(), store.using(), pytest.raises(BusyError), store.exclusive():
        pass
    with store.exclusive(), store.using():  # nested using inside exclusive is fine
        pass


def test_threads_exclude_each_other_like_processes(store: Store) -> None:
    orphan = store.put_blob(b"orphan", "application/octet-stream")
    outcome: list[object] = []

    def gc_thread() -> None:
        try:
            outcome.append(maintenance.gc(Store(store.root), timeout=0.3))
        except BusyError as exc:
            outcome.append(exc)

    with store.using():
        t = threading.Thread(target=gc_thread)
        t.start()
        t.join()
        assert isinstance(outcome[0], BusyError) and store.has_blob(orphan.digest)
    t = threading.Thread(target=gc_thread)
    t.start()
    t.join()
    assert not isinstance(outcome[1], BusyError) and not store.has_blob(orphan.digest)


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


# ---- gc and fsck ----------------------------------------------------------------------------


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


def _flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


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
    _flip(path)
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


def test_a_verifying_ensure_sets_a_same_size_damaged_blob_aside_and_fetches_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    data = b"0123456789" * 100
    desc = Descriptor(OCI_LAYER_GZIP, sha256(data), len(data))
    store.ensure_blob(desc, streamer(data))
    _flip(store.blob_path(desc.digest), 5)
    calls = []

    def fetch(write: Callable[[bytes], object]) -> None:
        calls.append(1)
        write(data)

    store.ensure_blob(desc, fetch)  # size only: taken as present (fsck hashes)
    assert calls == []
    with caplog.at_level("WARNING"):
        store.ensure_blob(desc, fetch, verify=True)
    assert calls == [1] and store.blob_path(desc.digest).read_bytes() == data
    (aside,) = store.set_aside_blobs()
    assert f"stored blob {desc.digest} was damaged" in caplog.text and str(aside) in caplog.text


def test_fsck_reports_a_broken_index(store: Store) -> None:
    (store.oci / "index.json").write_text("{not json")
    report = maintenance.fsck(store)
    assert not report.ok and "not a valid OCI index" in report.problems[0]


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_images_rmi_gc_fsck(store: Store, stored_busybox: Descriptor) -> None:
    ran = bootstrap("--json", "images", store=store.root, check=True)
    assert ran.json() == [
        {
            "name": REF,
            "digest": stored_busybox.digest,
            "media_type": stored_busybox.media_type,
            "size": stored_busybox.size,
        }
    ]
    ran = bootstrap("images", store=store.root, check=True)
    assert REF in ran.stdout and "REFERENCE" in ran.stdout
    assert bootstrap("fsck", store=store.root, check=True).stdout.startswith("checked 3 blobs")
    ran = bootstrap("rmi", "nothere:1", store=store.root)
    assert ran.rc == 2 and "not in the store" in ran.stderr and "bootstrap images" in ran.stderr
    ran = bootstrap("rmi", "Bad Ref", store=store.root)
    assert ran.rc == 2
    ran = bootstrap("--json", "rmi", "busybox", store=store.root, check=True)  # normalized
    assert ran.json() == {"name": REF, "digest": stored_busybox.digest}
    assert bootstrap("--json", "images", store=store.root, check=True).json() == []
    ran = bootstrap("--json", "gc", store=store.root, check=True)
    assert ran.json()["blobs_removed"] == 3


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


def test_cli_on_an_empty_or_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    assert bootstrap("--json", "images", store=missing, check=True).json() == []
    assert bootstrap("--json", "fsck", store=missing, check=True).json()["ok"] is True
    assert bootstrap("--json", "gc", store=missing, check=True).json()["blobs_removed"] == 0


def test_progress_log_lines_and_bars(caplog: pytest.LogCaptureFixture) -> None:
    from bootstrap.progress import LogProgress, RichProgress, make_progress
    from bootstrap.settings import Settings

    assert isinstance(make_progress(Settings(progress=True)), RichProgress)
    caplog.set_level("INFO", logger="bootstrap.progress")
    with make_progress(Settings()) as progress:
        assert isinstance(progress, LogProgress)
        progress.add("a", 2_000_000, "layer 1/2 aaaa")
        progress.advance("a", 2_000_000)
        progress.done("a")
        progress.add("b", 10, "layer 2/2 bbbb")
        progress.done("b", "already present")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("layer 1/2 aaaa: 2.0 MB in ")
    assert lines[1] == "layer 2/2 bbbb: already present"
    with RichProgress() as bars:  # draws on stderr; must not fail when it is not a TTY
        bars.add("c", 100, "c")
        bars.advance("c", 50)
        bars.done("c")


def test_rmi_short_name_follows_search_registries(
    store: Store, busybox_image: Path, tmp_path: Path
) -> None:
    copy_layout_image(store, busybox_image, "latest", "quay.example/busybox:latest")
    conf = tmp_path / "search.conf"
    conf.write_text('unqualified-search-registries = ["other.example", "quay.example"]\n')
    env = {"REGISTRIES_CONFIG_PATH": str(conf)}
    ran = bootstrap("--json", "rmi", "busybox", store=store.root, env=env, check=True)
    assert ran.json()["name"] == "quay.example/busybox:latest"
    assert store.images() == []
