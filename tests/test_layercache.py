"""The layer cache (bootstrap/image/layercache.py): each layer extracted once (concurrent
checkouts, images sharing layers), nothing cached for a layer that does not match its diff_id,
never written through a checkout; its records list every path, and damage to it is found and
repaired."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from bootstrap.errors import IntegrityError
from bootstrap.image import maintenance
from bootstrap.image.compose import checkout
from bootstrap.image.layercache import verify_layer
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.image_fixtures import ImageBuilder
from tests.harness.imagebuilder import File, ImageSpec, Layer
from tests.harness.treediff import snapshot
from tests.harness.unpack_support import load_layout, plain_tar, rich_spec, store_plain

NAME = "example.com/rich:1"


@pytest.fixture
def store(image_builder: ImageBuilder, tmp_path: Path) -> Store:
    layout, _ = image_builder(rich_spec())
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", NAME)
    return store


def _cache_snapshot(store: Store) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(store.layers):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and os.path.isfile(p):
                out[p] = Path(p).read_bytes()
    return out


def _a_cached_file(store: Store) -> tuple[Path, str]:
    """A regular file of some cached layer: (its path, its path inside the layer)."""
    for dirpath, _dirs, files in os.walk(store.layers):
        for name in sorted(files):
            p = Path(dirpath) / name
            if "rootfs" in p.parts and p.is_file() and not p.is_symlink() and p.stat().st_size:
                root = next(a for a in p.parents if a.name == "rootfs")
                return p, str(p.relative_to(root))
    raise AssertionError("no cached regular file")


def test_writes_through_a_checkout_reach_nothing_else(store: Store, tmp_path: Path) -> None:
    image = store.image(NAME)
    first = checkout(store, image, tmp_path / "co1")
    assert first.mode in ("copy", "reflink")
    before = _cache_snapshot(store)
    pristine = snapshot(tmp_path / "co1")
    for dirpath, _dirs, files in os.walk(tmp_path / "co1"):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                os.chmod(p, 0o600)
                with open(p, "ab") as fh:
                    fh.write(b"appended\n")
    second = checkout(store, image, tmp_path / "co7")
    assert second.extracted == 0
    assert snapshot(tmp_path / "co7") == pristine
    assert _cache_snapshot(store) == before
    assert maintenance.fsck(store).ok


def test_fsck_finds_a_changed_file_by_path_and_repairs_it(store: Store, tmp_path: Path) -> None:
    checkout(store, store.image(NAME), tmp_path / "co")
    victim, rel = _a_cached_file(store)
    good = victim.read_bytes()
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as fh:
        fh.write(b"X")  # same size, other content
    report = maintenance.fsck(store)
    assert not report.ok and rel in [p for c in report.layers for p in c.changed]
    ran = bootstrap("--json", "fsck", store=store.root)
    assert ran.rc == 4 and rel in ran.stderr
    doc = json.loads(ran.stdout or "{}") if ran.stdout.strip() else None
    if doc is not None:
        damaged = doc.get("result", doc)["layers_damaged"]
        assert any(rel in d["changed"] for d in damaged)
    ran = bootstrap("fsck", "--repair", store=store.root)
    assert ran.rc == 0, ran.stderr
    assert "repaired 1 cached layer\n" in ran.stdout
    assert victim.read_bytes() == good
    assert maintenance.fsck(store).ok
    # removed and added paths are findings too
    victim.unlink()
    (victim.parent / "intruder").write_bytes(b"x")
    checks = [c for c in maintenance.fsck(store).layers if not c.ok]
    assert len(checks) == 1 and rel in checks[0].missing
    assert any(p.endswith("intruder") for p in checks[0].extra)
    assert maintenance.fsck(store, repair=True).ok


def test_record_lists_every_path_with_digest(store: Store, tmp_path: Path) -> None:
    checkout(store, store.image(NAME), tmp_path / "co")
    for algdir in store.layers.iterdir():
        for entry in algdir.iterdir():
            doc = json.loads((entry / "layer.json").read_text())
            assert doc["blob"].startswith("sha256:") and doc["version"] == 2
            files = [r for r in doc["entries"] if r[1] == "f"]
            assert all(len(r[7]) == 64 for r in files)
            assert verify_layer(entry, f"sha256:{entry.name}").ok


def test_gc_keeps_what_a_deployment_holds(store: Store, tmp_path: Path) -> None:
    from bootstrap.image.compose import image_tree

    image = store.image(NAME)
    with store.using():
        tree, _ = image_tree(store, image)
        slot = tmp_path / "dep.0"
        slot.mkdir()
        store.hold([slot, tmp_path / "dep.1"], image.manifest.digest, image.config.diff_ids)
        os.symlink(tree, slot / "lower")
    assert image_tree(store, image) == (tree, 0)  # warm: reused as is
    store.untag(NAME)
    maintenance.gc(store)
    assert tree.is_dir()
    assert all(store.layer_cache_dir(d).is_dir() for d in image.config.diff_ids)
    assert maintenance.fsck(store).ok
    (slot / "lower").unlink()  # the deployment is gone: its hold is stale
    maintenance.gc(store)
    assert not tree.exists() and not list(store.holds.iterdir())
    assert not any(store.layer_cache_dir(d).exists() for d in image.config.diff_ids)


def test_checkout_onto_another_file_system(store: Store, tmp_path: Path) -> None:
    """copy_file_range refuses some cross-file-system copies (EXDEV): plain copies then."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(store.root).st_dev:
        pytest.skip("needs a second file system")
    other = Path(tempfile.mkdtemp(dir=shm))
    try:
        checkout(store, store.image(NAME), tmp_path / "here")
        result = checkout(store, store.image(NAME), other / "there")
        assert result.mode == "copy"
        assert snapshot(other / "there") == snapshot(tmp_path / "here")
    finally:
        shutil.rmtree(other)


def test_wrong_diff_id_caches_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    wrong = "sha256:" + "1" * 64
    store_plain(store, "example.com/bad:1", plain_tar({"a": b"a"}), wrong)
    with pytest.raises(IntegrityError, match="the image config says"):
        checkout(store, store.image("example.com/bad:1"), tmp_path / "r")
    assert not store.layer_cache_dir(wrong).exists()
    assert [p for p in store.layer_cache_dir(wrong).parent.iterdir() if p.is_dir()] == []
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob("r.tmp-*"))
    ran = bootstrap("checkout", "example.com/bad:1", tmp_path / "r", store=tmp_path / "store")
    assert ran.rc == 4 and "the image config says" in ran.stderr


def _checkout_in_child(args: tuple[str, str, str]) -> int:
    store_root, name, dest = args
    store = Store(Path(store_root))
    return checkout(store, store.image(name), Path(dest)).extracted


def test_concurrent_checkouts_extract_once(image_builder: ImageBuilder, tmp_path: Path) -> None:
    spec = ImageSpec(
        layers=[Layer([File(f"l{i}/f{j}", os.urandom(2000)) for j in range(300)]) for i in range(3)]
    )
    layout, _ = image_builder(spec)
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", "example.com/c:1")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        counts = pool.map(
            _checkout_in_child,
            [(str(store.root), "example.com/c:1", str(tmp_path / f"r{i}")) for i in range(3)],
        )
    assert sum(counts) == 3
    for i in range(3):
        assert len(os.listdir(tmp_path / f"r{i}" / "l2")) == 300


def test_images_sharing_layers_share_the_cache(image_builder: ImageBuilder, tmp_path: Path) -> None:
    base = Layer([File(f"base/f{i}", b"%d" % i) for i in range(50)])
    layout, _ = image_builder(ImageSpec(layers=[base]), tag="a")
    image_builder(ImageSpec(layers=[base, Layer([File("top", b"top")])]), tag="b")
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "a", "example.com/a:1")
    load_layout(store, layout, "b", "example.com/b:1")
    assert checkout(store, store.image("example.com/a:1"), tmp_path / "ra").extracted == 1
    result = checkout(store, store.image("example.com/b:1"), tmp_path / "rb")
    assert (result.layers, result.extracted) == (2, 1)
    assert (tmp_path / "rb/base/f7").read_bytes() == b"7"
    # only --hardlink shares inodes between checkouts (and with the cache)
    assert os.lstat(tmp_path / "ra/base/f7").st_ino != os.lstat(tmp_path / "rb/base/f7").st_ino
    checkout(store, store.image("example.com/a:1"), tmp_path / "ha", hardlink=True)
    checkout(store, store.image("example.com/b:1"), tmp_path / "hb", hardlink=True)
    assert os.lstat(tmp_path / "ha/base/f7").st_ino == os.lstat(tmp_path / "hb/base/f7").st_ino
