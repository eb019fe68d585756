"""The image builder makes layouts the reference tools (umoci, skopeo) accept, byte for byte
reproducibly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from bootstrap.demo.oci import ImageBuildError
from bootstrap.image.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
)
from tests.harness.image_fixtures import ImageBuilder, Layout
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
    build_image,
    busybox_layer,
    busybox_spec,
    save_docker_archive,
    save_oci_archive,
    synthetic_layer,
)

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def rich_spec() -> ImageSpec:
    return ImageSpec(
        layers=[
            busybox_layer(
                extra=[
                    File("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755),
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
                    Device("dev/null2", "c", 1, 3),
                    File(
                        "data/cap",
                        b"cap",
                        mode=0o755,
                        xattrs={"security.capability": CAP_NET_RAW, "user.k": "v"},
                    ),
                ]
            ),
            Layer([Whiteout("data/gone"), Opaque("opq"), File("opq/new", b"new")]),
            Layer([File("/plain.txt", b"plain")], compression="none"),
        ],
        entrypoint=("/bin/sh", "-c"),
        cmd=("echo hi",),
        env=("PATH=/bin", "A=b"),
        working_dir="/data",
        user="0:0",
        labels={"l": "v"},
    )


def run(*argv: str | os.PathLike[str]) -> str:
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


def test_deterministic(tmp_path: Path) -> None:
    a = build_image(tmp_path / "a", "t", rich_spec())
    b = build_image(tmp_path / "b", "t", rich_spec())
    assert a == b
    blobs_a = sorted(p.name for p in (tmp_path / "a/blobs/sha256").iterdir())
    blobs_b = sorted(p.name for p in (tmp_path / "b/blobs/sha256").iterdir())
    assert blobs_a == blobs_b
    for name in blobs_a:  # content addressed: the name is the hash of the bytes
        data = (tmp_path / "a/blobs/sha256" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == name
    # rebuilding into the same layout keeps one entry per tag
    build_image(tmp_path / "a", "t", rich_spec())
    index = json.loads((tmp_path / "a/index.json").read_text())
    assert len(index["manifests"]) == 1
    assert [layer for layer in a.layer_sizes if layer > 0] and len(a.layers) == 3


def test_layer_media_types_and_diff_ids(image_builder: ImageBuilder) -> None:
    layout, image = image_builder(rich_spec())
    manifest = json.loads(blob_path(layout, image.manifest_digest).read_bytes())
    assert [la["mediaType"] for la in manifest["layers"]] == [
        OCI_LAYER_GZIP,
        OCI_LAYER_GZIP,
        OCI_LAYER,
    ]
    assert image.layers[2] == image.diff_ids[2]  # uncompressed: digest == diff_id
    config = json.loads(blob_path(layout, image.config_digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == list(image.diff_ids)
    with tarfile.open(blob_path(layout, image.layers[1])) as tar:
        names = tar.getnames()
    assert names == ["data", "data/.wh.gone", "opq", "opq/.wh..wh..opq", "opq/new"]


def test_umoci_unpack_rich_image(image_builder: ImageBuilder, tmp_path: Path) -> None:
    layout, _ = image_builder(rich_spec())
    run("umoci", "unpack", "--image", f"{layout}:t", tmp_path / "bundle")
    root = tmp_path / "bundle" / "rootfs"
    # whiteouts applied
    assert not (root / "data/gone").exists()
    assert sorted(os.listdir(root / "opq")) == ["new"]
    assert stat.S_IMODE((root / "opq").stat().st_mode) == 0o755  # auto dir of layer 2
    # modes and owners
    assert stat.S_IMODE((root / "usr/bin/suid").stat().st_mode) == 0o4755
    owned = (root / "etc/owned").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 1001, 0o600)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    # links
    assert os.readlink(root / "data/link") == "keep"
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "bin/sh") == "busybox"
    assert (root / "data/hard").stat().st_ino == (root / "data/keep").stat().st_ino
    assert (root / "data/keep").stat().st_nlink == 2
    # special files
    assert stat.S_ISFIFO((root / "data/fifo").lstat().st_mode)
    dev = (root / "dev/null2").lstat()
    assert stat.S_ISCHR(dev.st_mode) and (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (1, 3)
    # xattrs, including raw bytes
    assert os.getxattr(root / "data/cap", "security.capability") == CAP_NET_RAW
    assert (root / "plain.txt").read_bytes() == b"plain"
    assert (root / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    # the runtime config umoci derived from the image config
    config = json.loads((tmp_path / "bundle/config.json").read_text())
    assert config["process"]["args"] == ["/bin/sh", "-c", "echo hi"]
    assert config["process"]["cwd"] == "/data"
    assert "A=b" in config["process"]["env"]


def test_skopeo_inspect(image_builder: ImageBuilder) -> None:
    layout, image = image_builder(rich_spec(), tag="v1")
    info = json.loads(run("skopeo", "inspect", f"oci:{layout}:v1"))
    assert info["Digest"] == image.manifest_digest
    assert info["Layers"] == list(image.layers)
    assert info["Labels"] == {"l": "v"}
    config = json.loads(run("skopeo", "inspect", "--config", f"oci:{layout}:v1"))
    assert config["config"]["Cmd"] == ["echo hi"]
    assert config["config"]["Entrypoint"] == ["/bin/sh", "-c"]


def test_busybox_image_fixture(busybox_image: Layout) -> None:
    assert busybox_image.tag == "latest"
    config = json.loads(run("skopeo", "inspect", "--config", busybox_image.ref))
    assert config["config"]["Cmd"] == ["sleep", "3600"]


def test_multi_platform_index(image_builder: ImageBuilder, tmp_path: Path) -> None:
    specs = [
        busybox_spec(architecture="amd64"),
        busybox_spec(cmd=("true",), architecture="arm64", variant="v8"),
    ]
    layout, index = image_builder.index(specs, tag="multi")
    raw = json.loads(run("skopeo", "inspect", "--raw", f"oci:{layout}:multi"))
    assert raw["mediaType"] == OCI_INDEX
    assert [m["platform"] for m in raw["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    assert [m["digest"] for m in raw["manifests"]] == [c.manifest_digest for c in index.children]
    arm = json.loads(
        run("skopeo", "--override-arch", "arm64", "inspect", "--config", f"oci:{layout}:multi")
    )
    assert arm["architecture"] == "arm64" and arm["config"]["Cmd"] == ["true"]
    run("skopeo", "copy", "--all", f"oci:{layout}:multi", f"oci:{tmp_path / 'copy'}:multi")


def test_zstd_layer(image_builder: ImageBuilder, tmp_path: Path) -> None:
    spec = busybox_spec(
        extra=[Layer([File("z/data", b"zstd" * 1000), Symlink("z/l", "data")], compression="zstd")]
    )
    layout, image = image_builder(spec)
    manifest = json.loads(blob_path(layout, image.manifest_digest).read_bytes())
    assert manifest["layers"][1]["mediaType"] == OCI_LAYER_ZSTD
    with blob_path(layout, image.layers[1]).open("rb") as f:
        plain = zstandard.ZstdDecompressor().stream_reader(f).read()
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == image.diff_ids[1]
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        assert tar.getnames() == ["z", "z/data", "z/l"]
    # the zstd CLI agrees, and skopeo can recompress it (so its digests check out)
    run("zstd", "-t", "-q", blob_path(layout, image.layers[1]))
    run(
        "skopeo", "copy", "--dest-compress", "--dest-compress-format", "gzip",
        f"oci:{layout}:t", f"oci:{tmp_path / 'gz'}:t",
    )  # fmt: skip
    run("umoci", "unpack", "--image", f"{tmp_path / 'gz'}:t", tmp_path / "bundle")
    assert (tmp_path / "bundle/rootfs/z/data").read_bytes() == b"zstd" * 1000


def test_raw_entries_are_verbatim(image_builder: ImageBuilder) -> None:
    evil = tarfile.TarInfo("../escape")
    absolute = tarfile.TarInfo("/abs/file")
    link = tarfile.TarInfo("out")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc"
    long = tarfile.TarInfo("d/" + "n" * 300)
    layer = Layer([Raw(evil, b"x"), Raw(absolute, b"y"), Raw(link), Raw(long, b"z")])
    layout, image = image_builder(ImageSpec(layers=[layer]))
    with tarfile.open(blob_path(layout, image.layers[0])) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["../escape", "/abs/file", "out", "d/" + "n" * 300]
    assert members[0].size == 1 and members[2].linkname == "/etc"


def test_synthetic_layer_is_deterministic_and_sized(tmp_path: Path) -> None:
    spec = ImageSpec(layers=[synthetic_layer(1, 50, 1000, 2, 300_000)])
    a = build_image(tmp_path / "a", "t", spec)
    b = build_image(tmp_path / "b", "t", spec)
    assert a == b
    with tarfile.open(blob_path(tmp_path / "a", a.layers[0])) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
        assert len(files) == 52
        assert sorted({m.size for m in files}) == [1000, 300_000]
        large = tar.extractfile("s1/large/b000")
        assert large is not None and len(set(large.read())) > 200  # incompressible bytes
    assert a.layer_sizes[0] > 600_000  # the large files do not compress


def test_archives(tmp_path: Path) -> None:
    spec = busybox_spec(extra=[Layer([File("x", b"x")])])
    image = save_docker_archive(spec, tmp_path / "d.tar", "example.com/app:1")
    info = json.loads(run("skopeo", "inspect", f"docker-archive:{tmp_path / 'd.tar'}"))
    assert info["Layers"] == list(image.diff_ids)
    layout = tmp_path / "oci"
    built = build_image(layout, "v1", spec)
    save_oci_archive(layout, tmp_path / "o.tar")
    info = json.loads(run("skopeo", "inspect", f"oci-archive:{tmp_path / 'o.tar'}:v1"))
    assert info["Digest"] == built.manifest_digest


def test_docker_media_types(tmp_path: Path) -> None:
    image = build_image(tmp_path / "d", "t", busybox_spec(), docker=True)
    manifest = json.loads(blob_path(tmp_path / "d", image.manifest_digest).read_bytes())
    assert manifest["mediaType"] == DOCKER_MANIFEST == image.media_type
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert manifest["layers"][0]["mediaType"] == DOCKER_LAYER_GZIP
    with pytest.raises(ImageBuildError, match="zstd"):
        build_image(tmp_path / "z", "t", ImageSpec([Layer([], compression="zstd")]), docker=True)
