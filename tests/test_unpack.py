"""Layer application (apply_layer) on real layers from the image builder, compared with
``umoci unpack`` of the same image."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from bootstrap.errors import IntegrityError
from bootstrap.image.apply import UnpackOptions, apply_layer
from bootstrap.image.model import LAYER_COMPRESSION
from tests.harness.image_fixtures import ImageBuilder
from tests.harness.imagebuilder import (
    Dir,
    File,
    ImageSpec,
    Layer,
    Raw,
    blob_path,
    busybox_layer,
)
from tests.harness.treediff import assert_same_tree, snapshot
from tests.harness.unpack_support import CAP_NET_RAW, rich_spec, umoci_rootfs

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
