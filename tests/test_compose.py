"""Composition (bootstrap/image/compose.py): a checkout equals umoci's rootfs of the same image;
hardlinked or copied (in parallel copiers, on threads when the process has other threads);
atomic (a failure or a kill leaves no DEST, and stale temp dirs are removed). What the layer
cache under it does is tests/test_layercache.py's, gc's tests/test_maintenance.py's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bootstrap.errors import UsageError
from bootstrap.image.compose import checkout
from bootstrap.image.store import Store
from bootstrap.locks import flocked
from tests.harness.cli import bootstrap
from tests.harness.image_fixtures import ImageBuilder
from tests.harness.imagebuilder import File, Hardlink, ImageSpec, Layer
from tests.harness.registry import Registry
from tests.harness.treediff import assert_same_tree, snapshot
from tests.harness.unpack_support import (
    load_layout,
    plain_tar,
    rich_spec,
    store_plain,
    umoci_rootfs,
)

ROOT = os.geteuid() == 0
SKOPEO_COPY = ["skopeo", "copy", "--quiet", "--src-tls-verify=false"]
NAME = "example.com/rich:1"


@pytest.fixture
def rich_store(image_builder: ImageBuilder, tmp_path: Path) -> tuple[Store, Path]:
    """A store holding the rich image as NAME, and umoci's rootfs of the same image."""
    layout, _ = image_builder(rich_spec())
    gz_layout, _ = image_builder(rich_spec(zstd=False), layout=tmp_path / "gz")
    reference = umoci_rootfs(gz_layout, "t", tmp_path / "bundle")
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", NAME)
    return store, reference


def _cache_inodes(store: Store) -> set[tuple[int, int]]:
    out = set()
    for dirpath, _dirs, files in os.walk(store.layers):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            out.add((st.st_dev, st.st_ino))
    return out


@pytest.mark.skipif(not ROOT, reason="owners and devices need root")
def test_checkout_equals_umoci_hardlinked(rich_store: tuple[Store, Path], tmp_path: Path) -> None:
    store, reference = rich_store
    image = store.image(NAME)
    first = checkout(store, image, tmp_path / "one", devices=True, hardlink=True)
    assert (first.layers, first.extracted) == (4, 4)
    assert_same_tree(reference, tmp_path / "one", mtimes=True)
    snap = snapshot(tmp_path / "one")
    assert snap["."].mode == 0o751 and (snap["xdir"].mode, snap["xdir"].uid) == (0o710, 5)
    # second checkout: everything cached, built from hardlinks into the cache
    second = checkout(store, image, tmp_path / "two", devices=True, hardlink=True)
    assert second.extracted == 0 and second.mode == "hardlink"
    assert_same_tree(reference, tmp_path / "two", mtimes=True)
    busybox = os.lstat(tmp_path / "two/bin/busybox")
    assert (busybox.st_dev, busybox.st_ino) in _cache_inodes(store)
    assert os.lstat(tmp_path / "one/bin/busybox").st_ino == busybox.st_ino
    assert second.to_json()["layers_cached"] == 4


@pytest.mark.skipif(not ROOT, reason="owners and devices need root")
def test_checkout_copy_is_independent(rich_store: tuple[Store, Path], tmp_path: Path) -> None:
    store, reference = rich_store
    image = store.image(NAME)
    checkout(store, image, tmp_path / "linked", devices=True, hardlink=True)
    result = checkout(store, image, tmp_path / "copy", devices=True)  # the default
    assert result.copy and result.extracted == 0 and result.mode in ("copy", "reflink")
    assert_same_tree(reference, tmp_path / "copy", mtimes=True)
    cache = _cache_inodes(store)
    for dirpath, _dirs, files in os.walk(tmp_path / "copy"):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            assert (st.st_dev, st.st_ino) not in cache, name
    (tmp_path / "copy/etc/owned").write_bytes(b"changed")
    assert (tmp_path / "linked/etc/owned").read_bytes() == b"owned2"


def test_devices_not_created_unless_asked(rich_store: tuple[Store, Path], tmp_path: Path) -> None:
    store, _ = rich_store
    checkout(store, store.image(NAME), tmp_path / "r")
    assert not os.path.lexists(tmp_path / "r/dev/null2")
    if ROOT:
        checkout(store, store.image(NAME), tmp_path / "r2", devices=True)
        assert os.path.lexists(tmp_path / "r2/dev/null2")


def test_dest_must_not_exist(rich_store: tuple[Store, Path], tmp_path: Path) -> None:
    store, _ = rich_store
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        checkout(store, store.image(NAME), tmp_path / "exists")
    with pytest.raises(UsageError, match=r"parent directory .* does not exist"):
        checkout(store, store.image(NAME), tmp_path / "missing-parent" / "x")
    assert os.listdir(tmp_path / "exists") == []


@pytest.mark.slow
def test_cli_checkout_json(rich_store: tuple[Store, Path], tmp_path: Path) -> None:
    store, _ = rich_store
    ran = bootstrap("--json", "checkout", NAME, tmp_path / "r", store=store.root, check=True)
    doc = ran.json()
    assert doc["dest"] == str(tmp_path / "r") and doc["layers"] == 4 and doc["copy"]
    assert doc["mode"] in ("copy", "reflink")
    ran = bootstrap("checkout", "--copy", NAME, tmp_path / "c", store=store.root, check=True)
    assert "copied" in ran.stdout or "reflinked" in ran.stdout
    assert snapshot(tmp_path / "r") == snapshot(tmp_path / "c")
    ran = bootstrap("checkout", "--hardlink", NAME, tmp_path / "h", store=store.root, check=True)
    assert "shares inodes" in ran.stdout
    ran = bootstrap("checkout", "--copy", "--hardlink", NAME, tmp_path / "x", store=store.root)
    assert ran.rc == 2 and not (tmp_path / "x").exists()
    ran = bootstrap("checkout", NAME, tmp_path / "r", store=store.root)
    assert ran.rc == 2 and "already exists" in ran.stderr
    ran = bootstrap(
        "checkout", "--pull", "never", "example.com/nope:1", tmp_path / "n", store=store.root
    )
    assert ran.rc == 2 and "bootstrap pull example.com/nope:1" in ran.stderr
    assert not (tmp_path / "n").exists()


DROP = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_UNPRIVILEGED = """
import sys
from pathlib import Path
from bootstrap.image.store import Store
from bootstrap.image.compose import checkout
from bootstrap.locks import flocked
from tests.harness.unpack_support import load_layout
work = Path(sys.argv[1])
store = Store(work / "store")
store.init()
load_layout(store, work / "oci", "t", "example.com/np:1")
image = store.image("example.com/np:1")
print(checkout(store, image, work / "r1").extracted, checkout(store, image, work / "r2").extracted)
"""


@pytest.mark.skipif(not ROOT or not shutil.which("setpriv"), reason="needs root to drop to nobody")
def test_unprivileged_checkout(image_builder: ImageBuilder) -> None:
    """As an ordinary user: no owners applied, read-only dirs and setuid bits do not get in
    the way, the cache still serves the second checkout."""
    work = Path(tempfile.mkdtemp(prefix="unpack-np-"))
    try:
        image_builder(rich_spec(), layout=work / "oci")
        for dirpath, dirnames, filenames in os.walk(work):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.lchown(name, 65534, 65534)
        proc = subprocess.run(
            [*DROP, sys.executable, "-c", _UNPRIVILEGED, str(work)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["4", "0"]
        snap = snapshot(work / "r2")
        assert {n.uid for n in snap.values()} == {65534}
        assert snap["usr/bin/suid"].mode == 0o6755 and snap["etc"].mode == 0o751
        assert "dev/null2" not in snap
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.mark.slow
@pytest.mark.skipif(not ROOT, reason="owners and devices need root")
def test_pull_checkout_equals_skopeo_umoci(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """The real pipeline: the rich image pushed to a docker-registry, then `bootstrap pull` +
    `bootstrap checkout` against `skopeo copy` + `umoci unpack`."""
    layout, _ = image_builder(rich_spec(zstd=False))
    registry.push(layout, "t", "unpack/rich:1")
    ref = f"{registry.host}/unpack/rich:1"
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    env = {"REGISTRIES_CONFIG_PATH": str(conf)}
    store = tmp_path / "store"
    bootstrap("pull", ref, store=store, env=env, check=True)
    bootstrap("checkout", "--devices", ref, tmp_path / "ours", store=store, check=True)
    copied = subprocess.run(
        [*SKOPEO_COPY, f"docker://{ref}", f"oci:{tmp_path / 'ref'}:t"],
        capture_output=True,
        text=True,
    )
    assert copied.returncode == 0, copied.stderr
    reference = umoci_rootfs(tmp_path / "ref", "t", tmp_path / "bundle")
    assert_same_tree(reference, tmp_path / "ours", mtimes=True)


def test_stale_temp_dirs_of_killed_checkouts_are_removed(tmp_path: Path) -> None:
    """A checkout killed midway leaves DEST.tmp-X (+ its unlocked .lock); the next checkout of
    DEST removes it. One whose lock is held (a checkout at work) is left alone."""
    store = Store(tmp_path / "store")
    store.init()
    layer = plain_tar({"a": b"a"})
    store_plain(store, "example.com/s:1", layer, "sha256:" + hashlib.sha256(layer).hexdigest())
    stale = tmp_path / "r.tmp-dead"
    (stale / "usr").mkdir(parents=True)
    (tmp_path / "r.tmp-dead.lock").touch()
    busy = tmp_path / "r.tmp-busy"
    busy.mkdir()
    with flocked(tmp_path / "r.tmp-busy.lock"):
        checkout(store, store.image("example.com/s:1"), tmp_path / "r")
        assert busy.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("r")) == [
        "r",
        "r.tmp-busy",
        "r.tmp-busy.lock",
    ]


def test_parallel_copy_out_equals_the_hardlinked_tree(
    image_builder: ImageBuilder,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Layers with hundreds of files in many directories are copied by several processes
    (threads when the process has other threads): the result equals the hardlinked
    composition (content, modes, owners, times, xattrs), hardlinks inside a layer stay one
    inode of the checkout's own, upper layers replace lower files."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # four idle cores
    old_umask = os.umask(0o027)
    request.addfinalizer(lambda: os.umask(old_umask))
    owner = {"uid": 7, "gid": 8} if ROOT else {}
    low = Layer(
        [File(f"d{i % 9}/f{i}", b"low %d" % i, mode=0o640, **owner) for i in range(300)]
        + [File("big", os.urandom(3 << 20)), Hardlink("d0/again", "d0/f0")]
        + [File("x/attr", b"x", xattrs={"user.k": "v"})]
        + [File("m/open", b"o", mode=0o666), File("m/suid", b"s", mode=0o4755, **owner)]
        + [File(f"m/f{i}", b"m", mode=0o777 if i % 2 else 0o400) for i in range(70)]
    )
    high = Layer(
        [File(f"d{i % 9}/f{i}", b"high %d" % i, mode=0o600) for i in range(0, 300, 2)]
        + [File(f"e{i % 5}/g{i}", b"g", mode=0o755) for i in range(200)]
        + [Hardlink("e0/g0-again", "e0/g0")]
    )
    layout, _ = image_builder(ImageSpec(layers=[low, high]))
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", NAME)
    image = store.image(NAME)
    linked = checkout(store, image, tmp_path / "linked", hardlink=True)
    copied = checkout(store, image, tmp_path / "copy")
    assert linked.mode == "hardlink" and copied.mode in ("copy", "reflink")
    assert_same_tree(tmp_path / "linked", tmp_path / "copy", mtimes=True)
    assert (tmp_path / "copy/d4/f4").read_bytes() == b"high 4"
    assert (tmp_path / "copy/d5/f5").read_bytes() == b"low 5"
    a, b = os.lstat(tmp_path / "copy/d0/f0"), os.lstat(tmp_path / "copy/d0/again")
    assert a.st_ino != b.st_ino  # f0 was replaced by the upper layer: the link keeps the lower
    g, g2 = os.lstat(tmp_path / "copy/e0/g0"), os.lstat(tmp_path / "copy/e0/g0-again")
    assert g.st_ino == g2.st_ino and g.st_nlink == 2
    assert g.st_ino != os.lstat(tmp_path / "linked/e0/g0").st_ino
    if ROOT:
        assert (
            os.lstat(tmp_path / "copy/d5/f5").st_uid,
            os.lstat(tmp_path / "copy/d5/f5").st_gid,
        ) == (7, 8)
    assert os.getxattr(tmp_path / "copy/x/attr", "user.k") == b"v"
    # modes the umask would take and special bits are set, whatever the umask
    assert stat.S_IMODE(os.lstat(tmp_path / "copy/m/open").st_mode) == 0o666
    assert stat.S_IMODE(os.lstat(tmp_path / "copy/m/suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(tmp_path / "copy/m/f1").st_mode) == 0o777
    records = [json.loads((p / "layer.json").read_text()) for p in store.layers.glob("*/*")]
    assert sorted(r["xattrs"] for r in records) == [False, True]


def _many_files_image(image_builder: ImageBuilder, tmp_path: Path) -> tuple[Store, Path]:
    layer = Layer([File(f"d{i % 7}/f{i}", b"%d" % i) for i in range(200)])
    layout, _ = image_builder(ImageSpec(layers=[layer]))
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", NAME)
    return store, layout


def test_a_failing_copy_process_fails_the_checkout_and_leaves_nothing(
    image_builder: ImageBuilder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that fails in a forked copier is the checkout's error (with the copier's errno
    and file); nothing is left at DEST or beside it."""
    from bootstrap.errors import BootstrapError
    from bootstrap.image import compose

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    store, _ = _many_files_image(image_builder, tmp_path)
    real = compose._Composer._copy_file

    def failing(self: compose._Composer, src: str, dst: str, st: os.stat_result) -> None:
        if os.getpid() != parent:  # only in the forked copier
            raise OSError(28, "No space left on device", dst)
        real(self, src, dst, st)

    parent = os.getpid()
    monkeypatch.setattr(compose._Composer, "_copy_file", failing)
    with pytest.raises(BootstrapError, match="No space left on device"):
        checkout(store, store.image(NAME), tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oci", "store"]


def test_copy_out_on_threads_when_the_process_has_other_threads(
    image_builder: ImageBuilder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked beside another thread"))
    store, _ = _many_files_image(image_builder, tmp_path)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        checkout(store, store.image(NAME), tmp_path / "dest")
    finally:
        stop.set()
        other.join()
    assert (tmp_path / "dest/d3/f10").read_bytes() == b"10"
    assert len(list((tmp_path / "dest").rglob("f*"))) == 200
