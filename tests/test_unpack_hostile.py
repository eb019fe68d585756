"""Malicious layers, table-driven: each is refused with IntegrityError (exit 4) naming the entry,
nothing outside the rootfs changes, and no partial rootfs (or cache entry) is left behind.

Every case runs through both paths: ``apply_layer`` onto a tree (one layer after another), and
``checkout`` from a store (per-layer cache extraction, then composition)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootstrap.errors import IntegrityError
from bootstrap.image.apply import UnpackOptions, apply_layer
from bootstrap.image.compose import checkout
from bootstrap.image.model import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Descriptor
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap

Member = tuple[tarfile.TarInfo, bytes]


def f(name: str, data: bytes = b"pwned") -> Member:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    return ti, data


def d(name: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    return ti, b""


def sym(name: str, target: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti, b""


def hard(name: str, target: str) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE
    ti.linkname = target
    return ti, b""


def typed(name: str, kind: bytes) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    return ti, b""


def tar_bytes(members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    id: str
    layers: Callable[[Path], list[list[Member]]]  # given the outside dir
    entry: str  # must appear in the error message


CASES = [
    Case("dotdot", lambda o: [[f("../outside/canary")]], "../outside/canary"),
    Case("dotdot-nested", lambda o: [[d("a"), f("a/../../outside/new")]], "a/../../outside/new"),
    Case("absolute", lambda o: [[f(f"{o}/canary")]], "canary"),
    Case(
        "symlink-then-write-same-layer",
        lambda o: [[sym("evil", str(o)), f("evil/canary")]],
        "evil/canary",
    ),
    Case(
        "symlink-then-write-later-layer",
        lambda o: [[sym("evil", str(o))], [f("evil/canary")]],
        "evil/canary",
    ),
    Case(
        "relative-symlink-escape",
        lambda o: [[d("a"), sym("a/up", "../../../../../../../../" + str(o))], [f("a/up/new")]],
        "a/up/new",
    ),
    Case(
        "symlink-deep-parent",
        lambda o: [[d("a"), sym("a/b", str(o)), f("a/b/c/d")]],
        "a/b/c/d",
    ),
    Case(
        "symlink-dir-entry-through",
        lambda o: [[sym("evil", str(o))], [d("evil/sub")]],
        "evil/sub",
    ),
    Case("hardlink-dotdot", lambda o: [[hard("h", "../outside/canary")]], "h"),
    Case("hardlink-absolute", lambda o: [[hard("h", f"{o}/canary")]], "h"),
    Case(
        "hardlink-through-symlink",
        lambda o: [[sym("evil", str(o)), hard("h", "evil/canary")]],
        "h",
    ),
    Case(
        "hardlink-through-symlink-later-layer",
        lambda o: [[sym("evil", str(o))], [hard("h", "evil/canary")]],
        "h",
    ),
    Case("whiteout-dotdot", lambda o: [[f("../outside/.wh.canary", b"")]], ".wh.canary"),
    Case(
        "whiteout-through-symlink",
        lambda o: [[sym("evil", str(o))], [f("evil/.wh.canary", b"")]],
        "evil/.wh.canary",
    ),
    Case(
        "opaque-through-symlink",
        lambda o: [[sym("evil", str(o))], [f("evil/.wh..wh..opq", b"")]],
        "evil/.wh..wh..opq",
    ),
    Case("whiteout-of-dotdot", lambda o: [[d("a"), f("a/.wh...", b"")]], "a/.wh..."),
    Case(
        "hardlink-forward-in-layer",
        lambda o: [[hard("h", "later"), f("later")]],
        "h",
    ),
    Case(
        "hardlink-to-lower-file-the-layer-replaces",
        lambda o: [[f("t", b"old")], [hard("h", "t"), f("t", b"new")]],
        "h",
    ),
    Case("component-too-long", lambda o: [[f("x" * 256)]], "xxxx"),
    Case("path-too-long", lambda o: [[f("/".join(["y" * 200] * 21))]], "yyyy"),
    Case("too-deep", lambda o: [[f("/".join(["z"] * 300))]], "z/z/z"),
    Case("unknown-type", lambda o: [[typed("weird", b"Z")]], "weird"),
    Case("sparse-type", lambda o: [[typed("sparse", b"S")]], "sparse"),
    Case("volume-header", lambda o: [[typed("vol", b"V")]], "vol"),
]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    o = tmp_path / "outside"
    o.mkdir()
    (o / "canary").write_bytes(b"canary")
    return o


def _outside_state(o: Path) -> list[tuple[str, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(o):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            out.append((str(p), p.read_bytes() if p.is_file() else b""))
    return sorted(out)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_apply_layer_refuses(case: Case, outside: Path, tmp_path: Path) -> None:
    before = _outside_state(outside)
    root = tmp_path / "work" / "rootfs"
    root.mkdir(parents=True)
    with pytest.raises(IntegrityError) as info:
        for i, members in enumerate(case.layers(outside)):
            apply_layer(
                io.BytesIO(tar_bytes(members)),
                "none",
                root,
                options=UnpackOptions(),
                layer_name=f"L{i}",
            )
    assert case.entry in info.value.message
    assert "layer L" in info.value.message
    assert _outside_state(outside) == before


def store_image(store: Store, name: str, layers: list[bytes]) -> None:
    descs = []
    for data in layers:
        descs.append(store.put_blob(data, OCI_LAYER))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [d.digest for d in descs]},
    }
    cdesc = store.put_blob(json.dumps(config).encode(), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": cdesc.to_json(),
        "layers": [d.to_json() for d in descs],
    }
    mdesc = store.put_blob(json.dumps(manifest).encode(), OCI_MANIFEST)
    store.tag(name, Descriptor(OCI_MANIFEST, mdesc.digest, mdesc.size))


NAME = "example.com/hostile:1"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_checkout_refuses(case: Case, outside: Path, tmp_path: Path) -> None:
    before = _outside_state(outside)
    store = Store(tmp_path / "store")
    store.init()
    store_image(store, NAME, [tar_bytes(m) for m in case.layers(outside)])
    dest_dir = tmp_path / "dest"
    dest_dir.mkdir()
    with pytest.raises(IntegrityError) as info:
        checkout(store, store.image(NAME), dest_dir / "rootfs")
    assert case.entry in info.value.message
    assert _outside_state(outside) == before
    assert os.listdir(dest_dir) == []  # no DEST, no DEST.tmp-*
    # every cache entry present is complete (no temp dirs), and a refused layer is not cached
    for alg in (tmp_path / "store/layers").glob("*"):
        for entry in alg.iterdir():
            assert not entry.name.startswith("."), entry
            assert (entry / "layer.json").is_file()


@pytest.mark.slow
def test_cli_exit_4_and_nothing_left(outside: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    store_image(store, NAME, [tar_bytes([sym("evil", str(outside))]), tar_bytes([f("evil/x")])])
    ran = bootstrap("checkout", NAME, tmp_path / "rootfs", store=tmp_path / "store")
    assert ran.rc == 4, ran.stderr
    assert "evil/x" in ran.stderr and "symlink" in ran.stderr
    assert not (tmp_path / "rootfs").exists()
    assert not list(tmp_path.glob("rootfs.tmp-*"))
    assert sorted(os.listdir(outside)) == ["canary"]


def test_file_replacing_symlink_does_not_write_through(outside: Path, tmp_path: Path) -> None:
    """A later layer's regular file, hardlink or dir at a symlink's path replaces the symlink."""
    store = Store(tmp_path / "store")
    store.init()
    layers = [
        [sym("evil", str(outside / "canary")), sym("evil2", str(outside)), f("t", b"t")],
        [f("evil", b"replaced"), d("evil2"), f("evil2/inside", b"in")],
    ]
    store_image(store, NAME, [tar_bytes(m) for m in layers])
    dest = tmp_path / "rootfs"
    checkout(store, store.image(NAME), dest)
    assert (dest / "evil").read_bytes() == b"replaced"
    assert (dest / "evil2/inside").read_bytes() == b"in"
    assert (outside / "canary").read_bytes() == b"canary"
    assert sorted(os.listdir(outside)) == ["canary"]


def test_symlink_targets_are_not_followed_for_metadata(outside: Path, tmp_path: Path) -> None:
    """A symlink to an outside file keeps the file's mode and owner, whatever the entry says."""
    mode_before = os.stat(outside / "canary").st_mode
    ti, _ = sym("s", str(outside / "canary"))
    ti.mode = 0o7777
    ti.uid = 4242
    root = tmp_path / "rootfs"
    root.mkdir()
    apply_layer(io.BytesIO(tar_bytes([(ti, b"")])), "none", root, options=UnpackOptions())
    assert os.stat(outside / "canary").st_mode == mode_before
    assert os.stat(outside / "canary").st_uid == os.geteuid()


def test_hardlink_to_symlink_links_the_symlink(outside: Path, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    layer = tar_bytes([sym("s", str(outside / "canary")), hard("h", "s")])
    apply_layer(io.BytesIO(layer), "none", root, options=UnpackOptions())
    assert os.readlink(root / "h") == str(outside / "canary")
    assert os.lstat(root / "h").st_ino == os.lstat(root / "s").st_ino


def test_digest_of_hostile_layer_not_cached(outside: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.init()
    bad = tar_bytes([f("ok", b"ok"), f("../outside/x")])
    store_image(store, NAME, [bad])
    with pytest.raises(IntegrityError):
        checkout(store, store.image(NAME), tmp_path / "rootfs")
    diff_id = "sha256:" + hashlib.sha256(bad).hexdigest()
    assert not store.layer_cache_dir(diff_id).exists()
