"""Applying a layer (bootstrap/image/apply.py, over tarstream's parsing and tree's path safety):
real layers against ``umoci unpack``, compressions and damaged input; hostile layers refused;
random stacks applied layer by layer agreeing with a checkout from the layer cache.

Sections, in this order:

- **real layers** — apply_layer on layers from the image builder, compared with ``umoci
  unpack`` of the same image.
- **hostile layers** — table-driven: each is refused with IntegrityError (exit 4) naming the
  entry, nothing outside the rootfs changes, and no partial rootfs (or cache entry) is left
  behind. Every case runs through both paths: ``apply_layer`` onto a tree (one layer after
  another), and ``checkout`` from a store (per-layer cache extraction, then composition).
- **random stacks** — differential: applying layers one by one onto a tree (``apply_layer``)
  and a checkout from the layer cache (extract each layer alone, compose) must agree — the same
  tree, or both refuse with IntegrityError. Well-formed stacks must succeed both ways, and the
  tree must equal ``umoci unpack``'s (umoci failing on one is a test failure, not a skip)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootstrap.errors import IntegrityError
from bootstrap.image.apply import UnpackOptions, apply_layer
from bootstrap.image.compose import checkout
from bootstrap.image.model import LAYER_COMPRESSION, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Descriptor
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.image_fixtures import ImageBuilder
from tests.harness.imagebuilder import (
    Dir,
    File,
    ImageSpec,
    Layer,
    Raw,
    blob_path,
    busybox_layer,
    init_layout,
    put_blob,
)
from tests.harness.treediff import assert_same_tree, diff, snapshot
from tests.harness.unpack_support import CAP_NET_RAW, load_layout, rich_spec, umoci_rootfs

# ---- real layers ---------------------------------------------------------------------------------


ROOT = os.geteuid() == 0


def apply_all(layout: Path, tag: str, dest: Path, options: UnpackOptions) -> None:
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"].values() and tag)
    manifest = json.loads(blob_path(layout, entry["digest"]).read_bytes())
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
    dest.mkdir(mode=0o755)
    os.chmod(dest, 0o755)
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        with blob_path(layout, desc["digest"]).open("rb") as fh:
            got = apply_layer(
                fh,
                LAYER_COMPRESSION[desc["mediaType"]],
                dest,
                options=options,
                layer_name=desc["digest"],
                diff_id=diff_id,
            )
        assert got == diff_id


@pytest.mark.skipif(not ROOT, reason="owners and devices need root")
def test_rich_image_equals_umoci(image_builder: ImageBuilder, tmp_path: Path) -> None:
    layout, _ = image_builder(rich_spec())
    umoci_layout, _ = image_builder(rich_spec(zstd=False), layout=tmp_path / "gz")
    reference = umoci_rootfs(umoci_layout, "t", tmp_path / "bundle")
    ours = tmp_path / "ours"
    apply_all(layout, "t", ours, UnpackOptions(devices=True))
    assert_same_tree(reference, ours, mtimes=True)
    snap = snapshot(ours)
    # spot checks of what the comparison covers
    assert snap["usr/bin/suid"].mode == 0o6755
    assert snap["shared"].mode == 0o1777
    assert snap["etc/owned"].uid == 2000 and snap["etc"].mode == 0o751
    assert dict(snap["data/cap"].xattrs)["security.capability"] == CAP_NET_RAW.hex()
    assert snap["data/fifo"].kind == "fifo"
    assert snap["dev/null2"].kind == "chr"
    assert snap["data/hard2"].group == ("data/hard",)
    assert snap["newdir/a"].group == ("newdir/b",)
    assert snap["d2f"].kind == "symlink" and snap["f2d"].kind == "file"
    assert "data/gone" not in snap and "bin/ls" not in snap and "opq/old" not in snap
    assert sorted(p for p in snap if p.startswith("d3/")) == ["d3/fresh"]
    assert snap["."].mode == 0o751  # the root entry of layer 4
    assert (snap["xdir"].mode, snap["xdir"].uid) == (0o710, 5)  # implicit in layer 4: kept
    assert snap["implicit/x"].mode == 0o755


def test_devices_skipped_unless_asked(image_builder: ImageBuilder, tmp_path: Path) -> None:
    layout, _ = image_builder(rich_spec())
    ours = tmp_path / "ours"
    apply_all(layout, "t", ours, UnpackOptions())
    assert not os.path.lexists(ours / "dev/null2")
    assert (ours / "dev").is_dir()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions(image_builder: ImageBuilder, tmp_path: Path, compression: str) -> None:
    spec = ImageSpec(
        layers=[
            Layer([File("a/b", b"x" * 100_000), Dir("c", mode=0o700)], compression=compression),
            Layer([File("a/d", b"y")], compression=compression),
        ]
    )
    layout, _ = image_builder(spec)
    ours = tmp_path / "ours"
    apply_all(layout, "t", ours, UnpackOptions())
    assert (ours / "a/b").read_bytes() == b"x" * 100_000
    assert stat.S_IMODE((ours / "c").stat().st_mode) == 0o700


def test_diff_id_mismatch(image_builder: ImageBuilder, tmp_path: Path) -> None:
    layout, image = image_builder(ImageSpec(layers=[Layer([File("a", b"x")])]))
    dest = tmp_path / "d"
    dest.mkdir()
    with (
        blob_path(layout, image.layers[0]).open("rb") as fh,
        pytest.raises(IntegrityError, match="the image config says"),
    ):
        apply_layer(fh, "gzip", dest, options=UnpackOptions(), diff_id="sha256:" + "0" * 64)


def test_corrupt_gzip_is_integrity_error(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="decompress"):
        apply_layer(
            io.BytesIO(b"\x1f\x8b\x08\x00garbage" * 10), "gzip", dest, options=UnpackOptions()
        )


def _tar_bytes(size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("f")
        ti.size = size
        tar.addfile(ti, io.BytesIO(os.urandom(size)))
    return buf.getvalue()


@pytest.mark.parametrize(
    "damage",
    ["garbage", "flipped", "truncated", "trailing-garbage"],
)
def test_corrupt_zstd_is_integrity_error(tmp_path: Path, damage: str) -> None:
    import zstandard

    frame = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(_tar_bytes(200_000)))
    data = {
        "garbage": b"\x28\xb5\x2f\xfd" + b"garbage" * 50,  # the zstd magic, then nothing valid
        "flipped": bytes(frame[:-8]) + bytes(b ^ 0xFF for b in frame[-8:]),  # checksum/last block
        "truncated": bytes(frame[: len(frame) // 2]),
        "trailing-garbage": bytes(frame) + b"\x00not a frame" * 8,
    }[damage]
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(IntegrityError) as info:
        apply_layer(io.BytesIO(data), "zstd", dest, options=UnpackOptions())
    assert info.value.hint  # one line and a hint, as every error


def test_truncated_tar(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        ti = tarfile.TarInfo("f")
        ti.size = 10_000
        tar.addfile(ti, io.BytesIO(b"z" * 10_000))
    data = buf.getvalue()[:2048]
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(IntegrityError, match="truncated"):
        apply_layer(io.BytesIO(data), "none", dest, options=UnpackOptions())


def test_gnu_long_names_and_pax(tmp_path: Path) -> None:
    long = "d" * 120 + "/" + "f" * 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        ti = tarfile.TarInfo(long)
        ti.size = 3
        ti.mode = 0o640
        ti.mtime = 1234567890
        tar.addfile(ti, io.BytesIO(b"abc"))
        sl = tarfile.TarInfo("s" * 150)
        sl.type = tarfile.SYMTYPE
        sl.linkname = "t" * 300
        tar.addfile(sl)
    dest = tmp_path / "d"
    dest.mkdir()
    apply_layer(io.BytesIO(buf.getvalue()), "none", dest, options=UnpackOptions())
    assert (dest / long).read_bytes() == b"abc"
    assert stat.S_IMODE((dest / long).stat().st_mode) == 0o640
    assert (dest / long).stat().st_mtime == 1234567890
    assert os.readlink(dest / ("s" * 150)) == "t" * 300


def test_busybox_layer_runs(image_builder: ImageBuilder, tmp_path: Path) -> None:
    """A plain layer from the builder, applied: the busybox binary is intact and executable."""
    layout, _ = image_builder(ImageSpec(layers=[busybox_layer(extra=[Raw(_fifo("p"))])]))
    ours = tmp_path / "ours"
    apply_all(layout, "t", ours, UnpackOptions())
    assert os.access(ours / "bin/busybox", os.X_OK)
    assert os.readlink(ours / "bin/sh") == "busybox"
    assert stat.S_ISFIFO(os.lstat(ours / "p").st_mode)


def _fifo(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.FIFOTYPE
    ti.mode = 0o644
    return ti


# ---- hostile layers ------------------------------------------------------------------------------


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


# ---- random stacks -------------------------------------------------------------------------------


NAMES = ["a", "b", "a/x", "a/y", "b/x", "a/x/z", "c"]
SEEDS = range(150)


def random_stack(rng: random.Random, *, well_formed: bool) -> list[bytes]:
    """2 to 4 random layers (see :func:`random_layer`); well-formed ones over the tree the
    layers below them leave."""
    lower: dict[str, str] = {}
    return [
        random_layer(rng, well_formed=well_formed, lower=lower) for _ in range(rng.randint(2, 4))
    ]


def _merge(lower: dict[str, str], entries: list[tuple[str, str]]) -> None:
    """Update ``lower`` (path -> "dir" or another kind) with what a layer of ``entries`` does."""

    def drop_below(path: str) -> None:
        for p in [p for p in lower if p.startswith(path + "/")]:
            del lower[p]

    for name, kind in entries:
        head, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            drop_below(head)
        elif base.startswith(".wh."):
            victim = (head + "/" if head else "") + base[4:]
            lower.pop(victim, None)
            drop_below(victim)
        else:
            if kind != "dir":
                drop_below(name)
            lower[name] = kind


def random_layer(
    rng: random.Random, *, well_formed: bool, lower: dict[str, str] | None = None
) -> bytes:
    """A random layer over a small namespace. ``well_formed``: what image builders produce —
    each path at most once, sorted by path (parents first; whiteout markers among their
    siblings), whiteouts only of paths this layer does not also create, hardlinks only to
    regular files earlier in the same layer, nothing below a path that this layer or the
    layers below (``lower``, path -> kind, updated with this layer) leave a file or a symlink.
    Otherwise anything goes (order, repeats, forward and cross-layer hardlinks)."""
    below: dict[str, str] = lower if lower is not None else {}
    entries: list[tuple[str, str]] = []
    for _ in range(rng.randint(1, 6)):
        name = rng.choice(NAMES)
        kind = rng.choice(["file", "file", "dir", "dir", "symlink", "hardlink", "wh", "opq"])
        head, _, base = name.rpartition("/")
        if kind == "wh":
            name, kind = (f"{head}/.wh.{base}" if head else f".wh.{base}"), "marker"
        elif kind == "opq":
            name, kind = f"{name}/.wh..wh..opq", "marker"
        entries.append((name, kind))
    if well_formed:
        seen: dict[str, str] = {}
        for name, kind in entries:
            seen.setdefault(name, kind)
        entries = sorted(seen.items())
        made = {n for n, k in entries if k != "marker"}
        parents = {n.rsplit("/", i)[0] for n in made for i in range(1, n.count("/") + 1)}
        kept = []
        for name, kind in entries:
            head, _, base = name.rpartition("/")
            ancestors = {name.rsplit("/", i)[0] for i in range(1, name.count("/") + 1)}
            if any(seen.get(a, below.get(a, "dir")) != "dir" for a in ancestors):
                continue  # below something this layer or a lower one makes a file or symlink
            if base.startswith(".wh.") and base != ".wh..wh..opq":
                victim = (head + "/" if head else "") + base[4:]
                if victim in made or victim in parents:
                    continue
            if base == ".wh..wh..opq" and (head in made and seen.get(head) != "dir"):
                continue
            kept.append((name, kind))
        entries = kept
        _merge(below, entries)
    files: list[str] = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000 + rng.randint(0, 1000)
            ti.uid = rng.choice([0, 0, 7])
            data = b""
            if kind == "hardlink" and well_formed and not files:
                kind = "file"
            if kind in ("file", "marker"):
                ti.mode = rng.choice([0o644, 0o755, 0o4755])
                data = rng.randbytes(rng.randint(0, 20)) if kind == "file" else b""
                ti.size = len(data)
                if kind == "file":
                    files.append(name)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = rng.choice([0o755, 0o700, 0o1777])
            elif kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = rng.choice(["a", "x", "../b", "/c", "nowhere"])
            else:
                ti.type = tarfile.LNKTYPE
                ti.linkname = rng.choice(files if well_formed else NAMES)
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def build(layout: Path, layers: list[bytes]) -> None:
    init_layout(layout)
    descs = []
    for data in layers:
        digest, size = put_blob(layout, data)
        descs.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }
    cdigest, csize = put_blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": descs,
    }
    mdigest, msize = put_blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def _run_both(
    layers: list[bytes], tmp_path: Path
) -> tuple[Path, IntegrityError | None, IntegrityError | None]:
    """Apply ``layers`` both ways; return the OCI layout and the errors (None: success)."""
    applied = tmp_path / "applied"
    applied.mkdir(mode=0o755)
    os.chmod(applied, 0o755)
    apply_error: IntegrityError | None = None
    try:
        for i, data in enumerate(layers):
            apply_layer(
                io.BytesIO(data), "none", applied, options=UnpackOptions(), layer_name=f"{i}"
            )
    except IntegrityError as exc:
        apply_error = exc
    layout = tmp_path / "oci"
    build(layout, layers)
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", "example.com/r:1")
    checkout_error: IntegrityError | None = None
    try:
        checkout(store, store.image("example.com/r:1"), tmp_path / "checkout")
    except IntegrityError as exc:
        checkout_error = exc
    return layout, apply_error, checkout_error


@pytest.mark.skipif(os.geteuid() != 0, reason="owners need root")
@pytest.mark.parametrize("seed", SEEDS)
def test_apply_and_checkout_agree(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    layers = random_stack(rng, well_formed=True)
    applied = tmp_path / "applied"
    layout, apply_error, checkout_error = _run_both(layers, tmp_path)
    assert apply_error is None and checkout_error is None, (apply_error, checkout_error)
    problems = diff(snapshot(applied, mtimes=True), snapshot(tmp_path / "checkout", mtimes=True))
    assert not problems, "\n".join(problems)
    proc = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:t", str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"umoci unpack failed on a well-formed stack: {proc.stderr}"
    reference = tmp_path / "bundle" / "rootfs"
    problems = diff(snapshot(reference, mtimes=True), snapshot(applied, mtimes=True))
    assert not problems, "differs from umoci:\n" + "\n".join(problems)


@pytest.mark.parametrize("seed", SEEDS)
def test_ill_formed_layers_fail_cleanly(seed: int, tmp_path: Path) -> None:
    """Repeated paths, children before parents, forward and cross-layer hardlinks, whiteouts of
    what the layer itself makes: apply and checkout agree as the module promises — both refuse
    with IntegrityError (no other exception; a refused checkout leaves nothing behind) or both
    succeed with the same tree."""
    rng = random.Random(seed)
    layers = random_stack(rng, well_formed=False)
    _, apply_error, checkout_error = _run_both(layers, tmp_path)
    assert (apply_error is None) == (checkout_error is None), (apply_error, checkout_error)
    if checkout_error is not None:
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("checkout")]
        return
    applied, checked_out = tmp_path / "applied", tmp_path / "checkout"
    problems = diff(snapshot(applied, mtimes=True), snapshot(checked_out, mtimes=True))
    assert not problems, "\n".join(problems)
