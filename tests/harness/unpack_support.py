"""Support for the unpack/checkout/import tests: a rich multi-layer image exercising every entry
kind, loading an OCI layout into a :class:`Store`, running ``umoci unpack`` for reference."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from bootstrap.image.model import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Descriptor
from bootstrap.image.store import Store
from tests.harness.imagebuilder import (
    Device,
    Dir,
    Fifo,
    File,
    Hardlink,
    ImageSpec,
    Layer,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    blob_path,
    busybox_layer,
)

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def rich_spec(*, devices: bool = True, zstd: bool = True) -> ImageSpec:
    """Four layers (gzip, zstd, none, gzip) with whiteouts, an opaque dir, file<->dir and
    symlink<->file replacements, hardlinks in a layer and to a lower layer, owners, setuid/setgid/
    sticky modes, xattrs incl. security.capability, a FIFO and (optionally) a device node.
    ``zstd=False`` makes layer 2 gzip (umoci 0.4 cannot read zstd layers)."""
    dev = [Device("dev/null2", "c", 1, 3, mode=0o666)] if devices else []
    base = busybox_layer(
        extra=[
            File("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755),
            File("usr/bin/sgid", b"#!/bin/sh\n", mode=0o2755, gid=50),
            Dir("shared", mode=0o1777),
            File("etc/owned", b"owned", uid=1000, gid=1001, mode=0o600),
            File("data/keep", b"keep"),
            File("data/gone", b"gone"),
            Dir("opq", mode=0o750),
            File("opq/old", b"old"),
            File("opq/sub/deep", b"deep"),
            Symlink("data/link", "keep"),
            Symlink("abs", "/etc/passwd"),
            Hardlink("data/hard", "data/keep"),
            Fifo("data/fifo", mode=0o600),
            *dev,
            File(
                "data/cap",
                b"cap",
                mode=0o755,
                xattrs={"security.capability": CAP_NET_RAW, "user.k": "v"},
            ),
            Dir("xdir", mode=0o710, uid=5, gid=6, xattrs={"user.d": "1"}),
            File("xdir/x", b"x", mtime=1600000000),
            File("f2d", b"file becomes dir"),
            Dir("d2f"),
            File("d2f/child", b"child"),
            Dir("d3"),
            File("d3/a", b"a"),
            File("d3/b/c", b"c"),
            File("big", bytes(range(256)) * 4000),
        ]
    )
    layer2 = Layer(
        [
            Whiteout("data/gone"),
            Opaque("opq"),
            File("opq/new", b"new"),
            Dir("f2d", mode=0o700),
            File("f2d/inside", b"inside"),
            File("d2f", b"dir became file", mode=0o640),
            File("data/link", b"symlink became file"),
            File("etc/owned", b"owned2", uid=2000, gid=2000, mode=0o640),
            File("newdir/a", b"a-content", mode=0o755),
            Hardlink("newdir/b", "newdir/a"),
            Whiteout("d3"),
            Symlink("newdir/rel", "../data/keep"),
        ],
        compression="zstd" if zstd else "gzip",
    )
    layer3 = Layer(
        [
            Dir("etc", mode=0o751, uid=3, gid=4),
            File("usr/bin/suid", b"#!/bin/sh\necho v2\n", mode=0o6755),
            Whiteout("bin/ls"),
            Hardlink("data/hard2", "data/keep"),  # target in a lower layer
            File("d3/fresh", b"fresh"),  # d3 was whited out below; recreated here
        ],
        compression="none",
    )
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    root.mode = 0o751
    root.mtime = 1650000000
    layer4 = Layer(
        [
            Raw(root),  # the rootfs directory's own metadata
            File("f2d", b"dir becomes file again"),
            Symlink("d2f", "data"),
            File("data/keep", b"keep v2"),  # breaks the old hardlink group
            File("implicit/x/y", b"parents not described by this layer"),
            File("xdir/new", b"xdir keeps its metadata from layer 1"),
        ],
        compression="gzip",
        auto_dirs=False,
    )
    return ImageSpec(layers=[base, layer2, layer3, layer4], cmd=("sh",))


def load_layout(store: Store, layout: Path, tag: str, name: str) -> str:
    """Copy the image tagged ``tag`` in ``layout`` into ``store`` under ``name``; return the
    manifest digest."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads(blob_path(layout, entry["digest"]).read_bytes())
    descs = [Descriptor.from_json(manifest["config"])] + [
        Descriptor.from_json(d) for d in manifest["layers"]
    ]
    top = Descriptor.from_json(entry)
    for desc in [*descs, top]:
        path = blob_path(layout, desc.digest)
        store.ensure_blob(desc, _file_fetch(path))
    store.tag(name, Descriptor(top.media_type, top.digest, top.size))
    return top.digest


def _file_fetch(path: Path) -> Callable[[Callable[[bytes], object]], None]:
    def fetch(write: Callable[[bytes], object]) -> None:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                write(chunk)

    return fetch


def umoci_rootfs(layout: Path, tag: str, bundle: Path) -> Path:
    """``umoci unpack --image LAYOUT:TAG BUNDLE``; return BUNDLE/rootfs."""
    proc = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return bundle / "rootfs"


def store_plain(store: Store, name: str, layer: bytes, diff_id: str) -> None:
    """Store a one-layer image ``name`` whose config names ``diff_id`` (right or wrong)."""
    ldesc = store.put_blob(layer, OCI_LAYER)
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
    config["rootfs"]["diff_ids"] = [diff_id]  # type: ignore[index]
    cdesc = store.put_blob(json.dumps(config).encode(), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": cdesc.to_json(),
        "layers": [ldesc.to_json()],
    }
    mdesc = store.put_blob(json.dumps(manifest).encode(), OCI_MANIFEST)
    store.tag(name, Descriptor(OCI_MANIFEST, mdesc.digest, mdesc.size))


def plain_tar(files: dict[str, bytes]) -> bytes:
    """A pax tar of regular files ``files`` (name -> content)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()
