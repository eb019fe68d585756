"""The shared store on its own (bootstrap/image/store.py): blobs verified on the way in, the OCI
layout other tools read, refs, locks (the store's, and the per-layer and per-tree build locks:
each holds the store shared, so gc waits, plus its own flock under ``locks/layers/`` or
``locks/trees/``, naming what it waits for when it gives up), the CLI commands over a store
filled locally (no registry), and privacy: the store is root's alone whatever the umask
(created under ``umask 000`` by the command and by the library, nothing in it is reachable,
readable or writable by other users except through its 0700 root; only image content, the
layer cache's and image trees' files with the modes the image gives them, may be
world-writable, below private directories; a store an older version left open is closed on its
next write; a directory made by hand keeps its mode, with a warning when others can write to
it). gc and fsck are tests/test_maintenance.py's."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from bootstrap.errors import BusyError, IntegrityError, UsageError
from bootstrap.image import maintenance
from bootstrap.image import store as store_mod
from bootstrap.image.model import (
    OCI_LAYER_GZIP,
    Descriptor,
    Platform,
)
from bootstrap.image.store import Store
from bootstrap.locks import flocked
from tests.harness.cli import BOOTSTRAP, bootstrap
from tests.harness.imagebuilder import (
    build_index,
    busybox_spec,
)
from tests.harness.store_support import (
    REF,
    copy_layout_image,
    exposures,
    flip_byte,
    sha256,
    streamer,
)


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


# ---- damaged blobs --------------------------------------------------------------------------


def test_a_verifying_ensure_sets_a_same_size_damaged_blob_aside_and_fetches_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    data = b"0123456789" * 100
    desc = Descriptor(OCI_LAYER_GZIP, sha256(data), len(data))
    store.ensure_blob(desc, streamer(data))
    flip_byte(store.blob_path(desc.digest), 5)
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


# ---- per-layer and per-tree build locks -----------------------------------------------------


DIGEST = "sha256:" + "ab" * 32

Lock = Callable[[Store, str], AbstractContextManager[None]]
CASES = [
    pytest.param(lambda s, d: s.layer_lock(d), "layers", f"layer {DIGEST}", id="layer"),
    pytest.param(lambda s, d: s.tree_lock(d), "trees", f"image tree {DIGEST}", id="tree"),
]


def _in_thread(fn: Callable[[], None]) -> BaseException | None:
    """Run ``fn`` in another thread (the store's shared hold is per thread); its exception."""
    caught: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return caught[0] if caught else None


@pytest.mark.parametrize(("lock", "kind", "what"), CASES)
def test_named_lock_is_exclusive_and_names_what_it_waits_for(
    store: Store, monkeypatch: pytest.MonkeyPatch, lock: Lock, kind: str, what: str
) -> None:
    monkeypatch.setattr(store_mod, "LAYER_LOCK_WAIT", 0.2)
    path = store.locks / kind / f"sha256-{'ab' * 32}.lock"
    with flocked(path, timeout=0):  # another builder holds it
        err = _in_thread(lambda: lock(store, DIGEST).__enter__())
    assert isinstance(err, BusyError)
    assert err.message == f"{what} is locked by another process"
    # free again: taken at once, on that very file
    with lock(store, DIGEST), pytest.raises(BusyError), flocked(path, timeout=0):
        pass


@pytest.mark.parametrize(("lock", "kind", "what"), CASES)
def test_named_lock_holds_the_store_shared(store: Store, lock: Lock, kind: str, what: str) -> None:
    with lock(store, DIGEST):
        err = _in_thread(lambda: store.exclusive(timeout=0).__enter__())
        assert isinstance(err, BusyError)  # gc cannot run while a layer or tree is built
    assert _in_thread(lambda: store.exclusive(timeout=0).__enter__()) is None


@pytest.mark.parametrize(("lock", "kind", "what"), CASES)
def test_named_lock_refuses_a_malformed_digest(
    store: Store, lock: Lock, kind: str, what: str
) -> None:
    with pytest.raises(IntegrityError), lock(store, "sha256:../../etc"):
        pass
    assert not (store.locks / kind).exists() or not any((store.locks / kind).iterdir())


# ---- privacy --------------------------------------------------------------------------------


def _rootfs_tar(tmp_path: Path) -> Path:
    """A rootfs tar with a 1777 /tmp and a 0666 file: content the store must keep as it is."""
    tree = tmp_path / "tree"
    (tree / "tmp").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("hello\n")
    os.chmod(tree / "tmp", 0o1777)
    os.chmod(tree / "etc" / "motd", 0o666)
    tar = tmp_path / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tree, arcname=".")
    return tar


def _umask_000() -> None:
    os.umask(0)


def test_store_made_by_the_command_under_umask_000_is_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tar = _rootfs_tar(tmp_path)
    for argv in (
        ["import", "--name", "a/b:1", tar],
        ["checkout", "a/b:1", tmp_path / "co"],
        ["fsck", "--repair"],
        ["gc"],
        ["rmi", "a/b:1"],
        ["import", "--name", "a/b:2", tar],
    ):
        proc = subprocess.run(
            [str(BOOTSTRAP), "--store", str(store), *map(str, argv)],
            capture_output=True,
            text=True,
            preexec_fn=_umask_000,
            timeout=300,
        )
        assert proc.returncode == 0, (argv, proc.stderr)
    assert exposures(store) == []
    # the image's own modes are kept where the image puts them
    layer = next(store.glob("layers/sha256/*/rootfs"))
    assert stat.S_IMODE((layer / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "co" / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "co" / "etc" / "motd").stat().st_mode) == 0o666
    # a checkout's own top directory is not opened to others by the umask either
    assert stat.S_IMODE((tmp_path / "co").stat().st_mode) & 0o022 == 0


def test_store_made_through_the_library_under_umask_000_is_private(tmp_path: Path) -> None:
    """Without the command's umask: the store sets its modes itself (library callers, the
    deployer inside ``up``)."""
    from bootstrap.image import api
    from bootstrap.settings import Settings

    settings = Settings(store=tmp_path / "deep" / "store", state=tmp_path / "state")
    tar = _rootfs_tar(tmp_path)
    old = os.umask(0)
    try:
        api.import_archive(settings, str(tar), name="a/b:1")
        api.checkout(settings, "a/b:1", str(tmp_path / "co"), hardlink=False, devices=False)
        store = Store(settings.store)
        image = store.image("docker.io/a/b:1")
        from bootstrap.image.compose import image_tree

        with store.using():
            image_tree(store, image)
        api.fsck(settings, repair=True)
        api.gc(settings)
    finally:
        os.umask(old)
    assert exposures(settings.store) == []
    # missing parents of the store are made private too
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700


def test_a_store_left_open_by_an_older_version_is_closed_on_its_next_write(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    tar = _rootfs_tar(tmp_path)
    bootstrap("import", "--name", "a/b:1", tar, store=store, check=True)
    for path in [store, *(p for p in store.iterdir() if p.is_dir())]:
        os.chmod(path, 0o777)  # what the older version made under umask 000
    assert exposures(store)
    bootstrap("import", "--name", "a/b:2", tar, store=store, check=True)
    assert exposures(store) == []


def test_a_directory_made_by_hand_keeps_its_mode_with_a_warning(tmp_path: Path) -> None:
    tar = _rootfs_tar(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    ran = bootstrap("import", "--name", "a/b:1", tar, store=shared, check=True)
    assert f"warning: the store {shared} is writable by other users (mode 777)" in ran.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # not ours to change
    assert [line for line in exposures(shared) if not line.startswith(str(shared))] == []
    # a private directory made by hand: nothing said
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    ran = bootstrap("import", "--name", "a/b:1", tar, store=private, check=True)
    assert "warning" not in ran.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user's view")
def test_another_user_sees_nothing_of_the_store(tmp_path: Path) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="bootstrap-privacy-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)  # reachable by anyone up to the store (pytest's dirs are not)
        store = base / "store"
        tar = _rootfs_tar(tmp_path)
        for argv in (["import", "--name", "a/b:1", tar], ["checkout", "a/b:1", base / "co"]):
            proc = subprocess.run(
                [str(BOOTSTRAP), "--store", str(store), *map(str, argv)],
                capture_output=True,
                text=True,
                preexec_fn=_umask_000,
            )
            assert proc.returncode == 0, proc.stderr
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        assert subprocess.run([*nobody, "ls", str(base)], capture_output=True).returncode == 0
        layer = next(store.glob("layers/sha256/*/rootfs"))
        for argv in (
            ["ls", store],
            ["cat", next(store.glob("oci/blobs/sha256/*"))],
            ["touch", store / "x"],
            ["touch", layer / "tmp" / "planted"],  # the cache's world-writable /tmp: unreachable
        ):
            out = subprocess.run([*nobody, *map(str, argv)], capture_output=True, text=True)
            assert out.returncode != 0 and "Permission denied" in out.stderr, (argv, out)
        assert not (layer / "tmp" / "planted").exists()
    finally:
        shutil.rmtree(base)
