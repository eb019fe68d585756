"""bootstrap import: docker-archive, oci-archive and plain rootfs tars, each imported and checked
out; hostile or inconsistent archives refused with exit 4 and nothing tagged."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.image.archive import import_archive
from bootstrap.image.compose import checkout
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.image_fixtures import ImageBuilder
from tests.harness.imagebuilder import (
    File,
    ImageSpec,
    Layer,
    build_image,
    save_docker_archive,
    save_oci_archive,
)
from tests.harness.treediff import assert_same_tree
from tests.harness.unpack_support import rich_spec, umoci_rootfs

ROOT = os.geteuid() == 0


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            if ti.isreg():
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    return ti, data


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti, b""


LAYER = _tar([reg("hello", b"hello\n"), reg("etc/os-release", b"ID=test\n")])
DIFF_ID = "sha256:" + hashlib.sha256(LAYER).hexdigest()


def docker_archive(
    path: Path,
    *,
    layer: bytes = LAYER,
    diff_id: str = DIFF_ID,
    manifest: object = None,
    extra: list[tuple[tarfile.TarInfo, bytes]] | None = None,
    manifest_member: tuple[tarfile.TarInfo, bytes] | None = None,
) -> None:
    """A hand-written `docker save` tarball with one image of one layer."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    if manifest is None:
        manifest = [
            {"Config": cfg_name, "RepoTags": ["example.com/hand:1"], "Layers": ["l1/layer.tar"]}
        ]
    members = [reg(cfg_name, config), reg("l1/layer.tar", layer), *(extra or [])]
    members.append(manifest_member or reg("manifest.json", json.dumps(manifest).encode()))
    path.write_bytes(_tar(members))


# ---- the three kinds ---------------------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="owners need root")
def test_docker_archive_rich_equals_umoci(
    store: Store, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    spec = rich_spec(devices=False, zstd=False)
    save_docker_archive(spec, tmp_path / "img.tar", "example.com/app:1")
    result = import_archive(store, tmp_path / "img.tar", None)
    assert result.kind == "docker-archive"
    assert [i.name for i in result.images] == ["example.com/app:1"]
    checkout(store, store.image("example.com/app:1"), tmp_path / "ours")
    layout, _ = image_builder(spec)
    reference = umoci_rootfs(layout, "t", tmp_path / "bundle")
    assert_same_tree(reference, tmp_path / "ours", mtimes=True)


def test_docker_archive_hand_written_and_normalized_name(store: Store, tmp_path: Path) -> None:
    docker_archive(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        config_name = next(n for n in tar.getnames() if n.endswith(".json") and "/" not in n)
    manifest = [{"Config": config_name, "RepoTags": ["hand:2"], "Layers": ["l1/layer.tar"]}]
    docker_archive(tmp_path / "b.tar", manifest=manifest)
    result = import_archive(store, tmp_path / "b.tar", None)
    assert [i.name for i in result.images] == ["docker.io/library/hand:2"]
    image = store.image("docker.io/library/hand:2")
    assert image.config.cmd == ("/hello",) and image.config.diff_ids == (DIFF_ID,)
    checkout(store, image, tmp_path / "r")
    assert (tmp_path / "r/hello").read_bytes() == b"hello\n"
    # --name wins over RepoTags
    result = import_archive(store, tmp_path / "b.tar", "other")
    assert [i.name for i in result.images] == ["docker.io/library/other:latest"]


def test_oci_archive(store: Store, image_builder: ImageBuilder, tmp_path: Path) -> None:
    spec = ImageSpec(
        layers=[Layer([File("a/b", b"b")]), Layer([File("c", b"c")], compression="zstd")],
        cmd=("sh",),
    )
    layout, built = image_builder(spec)
    save_oci_archive(layout, tmp_path / "img.oci.tar")
    # the layout names only the tag "t": a name is needed
    with pytest.raises(UsageError, match="names only the tag"):
        import_archive(store, tmp_path / "img.oci.tar", None)
    result = import_archive(store, tmp_path / "img.oci.tar", "example.com/oci:1")
    assert result.kind == "oci-archive"
    assert result.images[0].digest == built.manifest_digest  # blobs copied as they are
    checkout(store, store.image("example.com/oci:1"), tmp_path / "r")
    assert (tmp_path / "r/a/b").read_bytes() == b"b" and (tmp_path / "r/c").read_bytes() == b"c"


def test_oci_archive_with_full_ref_name(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_image(layout, "registry.example.com/team/app:2.0", ImageSpec([Layer([File("x")])]))
    save_oci_archive(layout, tmp_path / "a.tar")
    result = import_archive(store, tmp_path / "a.tar", None)
    assert [i.name for i in result.images] == ["registry.example.com/team/app:2.0"]


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
def test_plain_rootfs_tar(store: Store, tmp_path: Path, compress: str) -> None:
    data = {
        "none": LAYER,
        "gzip": gzip.compress(LAYER, mtime=0),
        "zstd": zstandard.ZstdCompressor().compress(LAYER),
    }[compress]
    (tmp_path / "rootfs.tar").write_bytes(data)
    with pytest.raises(UsageError, match="--name"):
        import_archive(store, tmp_path / "rootfs.tar", None)
    first = import_archive(store, tmp_path / "rootfs.tar", "example.com/plain:1")
    assert first.kind == "rootfs-tar"
    again = import_archive(store, tmp_path / "rootfs.tar", "example.com/plain:1")
    assert again.images == first.images  # deterministic: same tar, same image
    image = store.image("example.com/plain:1")
    assert image.config.diff_ids == (DIFF_ID,)
    assert image.manifest.layers[0].media_type.endswith({"none": "tar"}.get(compress, compress))
    checkout(store, image, tmp_path / "r")
    assert (tmp_path / "r/etc/os-release").read_bytes() == b"ID=test\n"


@pytest.mark.slow
def test_cli_import_json(tmp_path: Path) -> None:
    docker_archive(tmp_path / "a.tar")
    ran = bootstrap("--json", "import", tmp_path / "a.tar", store=tmp_path / "s", check=True)
    doc = ran.json()
    assert doc["kind"] == "docker-archive"
    assert doc["images"][0]["name"] == "example.com/hand:1"
    ran = bootstrap("checkout", "example.com/hand:1", tmp_path / "r", store=tmp_path / "s")
    assert ran.rc == 0, ran.stderr
    (tmp_path / "plain.tar").write_bytes(LAYER)
    ran = bootstrap("import", tmp_path / "plain.tar", store=tmp_path / "s")
    assert ran.rc == 2 and "--name" in ran.stderr


# ---- hostile and inconsistent archives ---------------------------------------------------------


def _hostile_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, expect: str, **kw: object) -> None:
        path = tmp_path / f"{name}.tar"
        docker_archive(path, **kw)  # type: ignore[arg-type]
        cases[name] = (path, expect)

    case("member-dotdot", "../evil", extra=[reg("../evil", b"x")])
    case("member-absolute", "/etc/evil", extra=[reg("/etc/evil", b"x")])
    case(
        "manifest-symlink",
        "manifest.json",
        manifest_member=link("manifest.json", "/etc/passwd"),
    )
    case(
        "manifest-hardlink",
        "manifest.json",
        extra=[reg("real.json", b"[]")],
        manifest_member=link("manifest.json", "real.json", tarfile.LNKTYPE),
    )
    case(
        "layer-path-dotdot",
        "../l1/layer.tar",
        manifest=[{"Config": "x.json", "RepoTags": ["a/b:1"], "Layers": ["../l1/layer.tar"]}],
    )
    case("wrong-diff-id", "diff_id", diff_id="sha256:" + "2" * 64)
    case(
        "layer-modified",
        "diff_id",
        layer=_tar([reg("hello", b"HELLO\n"), reg("etc/os-release", b"ID=test\n")]),
    )
    case("unknown-member-type", "weird", extra=[(_typed("weird", b"Z"), b"")])
    return cases


def _typed(name: str, kind: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    return ti


HOSTILE = [
    "member-dotdot",
    "member-absolute",
    "manifest-symlink",
    "manifest-hardlink",
    "layer-path-dotdot",
    "wrong-diff-id",
    "layer-modified",
    "unknown-member-type",
]


@pytest.mark.parametrize("which", HOSTILE)
def test_hostile_archive_refused(store: Store, tmp_path: Path, which: str) -> None:
    path, expect = _hostile_cases(tmp_path)[which]
    if which == "layer-path-dotdot":  # its Config must exist for the Layers check to matter
        docker_archive(path)
        with tarfile.open(path) as tar:
            cfg = next(n for n in tar.getnames() if n.endswith(".json") and n != "manifest.json")
        docker_archive(
            path, manifest=[{"Config": cfg, "RepoTags": ["a/b:1"], "Layers": ["../l1/layer.tar"]}]
        )
    with pytest.raises(IntegrityError) as info:
        import_archive(store, path, None)
    assert expect in info.value.message
    assert store.images() == []


@pytest.mark.slow
def test_hostile_archive_cli_exit_4(tmp_path: Path) -> None:
    path, _ = _hostile_cases(tmp_path)["manifest-symlink"]
    ran = bootstrap("import", path, store=tmp_path / "s")
    assert ran.rc == 4 and "manifest.json" in ran.stderr
    ran = bootstrap("images", store=tmp_path / "s")
    assert "example.com/hand" not in ran.stdout


def test_multi_image_archive_with_name_is_usage_error(store: Store, tmp_path: Path) -> None:
    docker_archive(tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        cfg = next(n for n in tar.getnames() if n.endswith(".json") and n != "manifest.json")
    entry = {"Config": cfg, "RepoTags": ["x/y:1"], "Layers": ["l1/layer.tar"]}
    docker_archive(tmp_path / "b.tar", manifest=[entry, {**entry, "RepoTags": ["x/y:2"]}])
    with pytest.raises(UsageError, match="holds 2 images"):
        import_archive(store, tmp_path / "b.tar", "z:1")
    result = import_archive(store, tmp_path / "b.tar", None)
    assert sorted(i.name for i in result.images) == ["docker.io/x/y:1", "docker.io/x/y:2"]


def test_missing_file_is_usage_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        import_archive(store, tmp_path / "nope.tar", "a:1")


def test_hostile_plain_tar_refused(store: Store, tmp_path: Path) -> None:
    (tmp_path / "evil.tar").write_bytes(_tar([reg("ok", b"ok"), reg("../../etc/evil", b"x")]))
    with pytest.raises(IntegrityError, match=r"\.\./\.\./etc/evil"):
        import_archive(store, tmp_path / "evil.tar", "example.com/evil:1")
    assert store.images() == []


# ---- digests and passes ------------------------------------------------------------------------


def _sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def oci_archive_sha512(path: Path, *, tamper: bool = False) -> str:
    """A hand-written oci-archive whose every descriptor (layer, config, manifest) is sha512;
    returns the manifest digest. ``tamper``: the manifest blob differs from its digest."""
    layer = gzip.compress(LAYER, mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [DIFF_ID]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha512(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _sha512(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    digest = _sha512(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest,
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": "example.com/s512:1"},
                }
            ],
        }
    ).encode()
    stored = manifest[:-1] + b" " if tamper else manifest  # same size, other bytes
    blobs = [(layer, _sha512(layer)), (config, _sha512(config))]
    members = [
        reg("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
        reg("index.json", index),
        *(reg(f"blobs/sha512/{d.split(':')[1]}", b) for b, d in blobs),
        reg(f"blobs/sha512/{digest.split(':')[1]}", stored),
    ]
    path.write_bytes(_tar(members))
    return digest


def test_oci_archive_with_sha512_descriptors(store: Store, tmp_path: Path) -> None:
    digest = oci_archive_sha512(tmp_path / "a.tar")
    result = import_archive(store, tmp_path / "a.tar", None)
    assert [(i.name, i.digest) for i in result.images] == [("example.com/s512:1", digest)]
    image = store.image("example.com/s512:1")
    assert image.manifest.digest == digest and image.config.digest.startswith("sha512:")
    checkout(store, image, tmp_path / "r")
    assert (tmp_path / "r/hello").read_bytes() == b"hello\n"

    oci_archive_sha512(tmp_path / "bad.tar", tamper=True)
    other = Store(tmp_path / "other")
    other.init()
    with pytest.raises(IntegrityError, match="does not match its descriptor"):
        import_archive(other, tmp_path / "bad.tar", None)
    assert other.images() == []


def test_one_digest_helper() -> None:
    from bootstrap.image import model

    data = b"abc"
    assert model.digest_of(data) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert model.digest_of(data, "sha512") == _sha512(data)
    assert model.matches(data, _sha512(data)) and not model.matches(b"abd", _sha512(data))
    h = model.new_hasher(_sha512(data))
    h.update(data)
    assert "sha512:" + h.hexdigest() == _sha512(data)
    with pytest.raises(IntegrityError, match="not a supported digest"):
        model.matches(data, "md5:" + hashlib.md5(data).hexdigest())


def test_docker_archive_compressed_layer_read_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond the archive's listing scan, a compressed layer is read in one pass that checks
    its diff_id and stores it; a mismatch stores nothing."""
    from bootstrap.image import archive

    layer = gzip.compress(LAYER, mtime=0)
    docker_archive(tmp_path / "a.tar", layer=layer)
    read: dict[str, int] = {}
    real_open, real_fetch = archive._Members.open_region, archive._Members.fetch

    class Counting:
        def __init__(self, fh: Any, name: str) -> None:
            self.fh, self.name = fh, name

        def read(self, n: int = -1) -> bytes:
            data: bytes = self.fh.read(n)
            read[self.name] = read.get(self.name, 0) + len(data)
            return data

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    def open_region(self: Any, name: str, what: str) -> tuple[Any, int]:
        fh, size = real_open(self, name, what)
        return Counting(fh, name), size

    def fetch(self: Any, name: str, what: str) -> Any:
        inner = real_fetch(self, name, what)

        def counted(write: Any) -> None:
            def w(chunk: bytes) -> None:
                read[name] = read.get(name, 0) + len(chunk)
                write(chunk)

            inner(w)

        return counted

    monkeypatch.setattr(archive._Members, "open_region", open_region)
    monkeypatch.setattr(archive._Members, "fetch", fetch)
    import_archive(store, tmp_path / "a.tar", None)
    head = 8  # the compression sniff
    assert read["l1/layer.tar"] == len(layer) + head
    image = store.image("example.com/hand:1")
    assert image.manifest.layers[0].digest == "sha256:" + hashlib.sha256(layer).hexdigest()
    checkout(store, image, tmp_path / "r")
    assert (tmp_path / "r/hello").read_bytes() == b"hello\n"

    other = Store(tmp_path / "other")
    other.init()
    docker_archive(tmp_path / "b.tar", layer=layer, diff_id="sha256:" + "3" * 64)
    with pytest.raises(IntegrityError, match="the config says"):
        import_archive(other, tmp_path / "b.tar", None)
    assert [p for p in (other.root / "blobs").rglob("*") if p.is_file()] == []
    assert not any(other.tmp.iterdir())


# ---- what a damaged or wrong file says: the archive, what is wrong in it, a hint about it ----


def _flip_in_largest_member(archive: Path, out: Path) -> None:
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tf:
        big = max(tf.getmembers(), key=lambda m: m.size)
    data[big.offset_data + big.size // 2] ^= 0xFF
    out.write_bytes(bytes(data))


def _bad_number_tar(out: Path) -> None:
    data = bytearray(_tar([reg("x", b"abc")]))
    header = next(i for i in range(0, len(data), 512) if data[i : i + 1] == b"x")
    data[header + 124 : header + 136] = b"sa\xebDzzzzzzzz"  # size: not octal
    data[header + 148 : header + 156] = b" " * 8
    checksum = sum(data[header : header + 512])
    data[header + 148 : header + 156] = f"{checksum:06o}\0 ".encode()
    out.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("case", "rc", "message", "hint"),
    [
        ("garbage", 2, "garbage.tar: not a tar archive", "bootstrap import reads a docker-archive"),
        ("not-a-gzip-tar", 2, "gz.tar.gz: not a gzip tar", "bootstrap import reads"),
        ("truncated docker-archive", 4, "half.tar: the archive ends early", "incomplete"),
        ("flipped oci-archive", 4, "flip.tar: blobs/sha256/", "the archive is damaged"),
        ("bad header number", 4, "num.tar: damaged tar archive", "the archive is damaged"),
    ],
)
def test_import_errors_name_the_archive_and_hint_at_it(
    tmp_path: Path, case: str, rc: int, message: str, hint: str
) -> None:
    spec = ImageSpec(layers=[Layer([File("etc/hello", os.urandom(200_000))])])
    if case == "garbage":
        path = tmp_path / "garbage.tar"
        path.write_bytes(os.urandom(3000))
    elif case == "not-a-gzip-tar":
        path = tmp_path / "gz.tar.gz"
        path.write_bytes(gzip.compress(os.urandom(3000)))
    elif case == "truncated docker-archive":
        whole = tmp_path / "whole.tar"
        save_docker_archive(spec, whole, "local/x:1")
        path = tmp_path / "half.tar"
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    elif case == "flipped oci-archive":
        build_image(tmp_path / "oci", "t", spec)
        save_oci_archive(tmp_path / "oci", tmp_path / "good.tar")
        path = tmp_path / "flip.tar"
        _flip_in_largest_member(tmp_path / "good.tar", path)
    else:
        path = tmp_path / "num.tar"
        _bad_number_tar(path)
    store = tmp_path / "store"
    ran = bootstrap("import", "--name", "local/g:1", path, store=store)
    assert ran.rc == rc, ran.stderr
    error, given_hint = ran.stderr.splitlines()
    assert error.startswith("bootstrap: error: ") and message in error, error
    assert hint in given_hint, given_hint
    for word in ("pull", "registry", "mirror", "invalid literal", "Traceback", "layer "):
        assert word not in ran.stderr, (word, ran.stderr)
    assert bootstrap("--json", "images", store=store, check=True).json() == []


@pytest.mark.parametrize("kind", ["docker", "docker-gzip", "oci", "rootfs"])
def test_importing_again_heals_damaged_blobs(store: Store, tmp_path: Path, kind: str) -> None:
    """Blobs already stored are hashed before they count as present (as ``bootstrap pull``
    does): after every stored blob is damaged in place (same size), importing the same archive
    again moves each aside, stores the archive's, and fsck is clean."""
    from bootstrap.image import maintenance

    archive = tmp_path / "a.tar"
    name = None
    if kind == "docker":
        docker_archive(archive)
    elif kind == "docker-gzip":
        docker_archive(archive, layer=gzip.compress(LAYER, mtime=0))
    elif kind == "oci":
        layout = tmp_path / "layout"
        spec = ImageSpec([Layer([File("x", b"x" * 4096)]), Layer([File("y")], "zstd")])
        build_image(layout, "registry.example.com/team/app:2.0", spec)
        save_oci_archive(layout, archive)
    else:
        archive.write_bytes(LAYER)
        name = "example.com/plain:1"
    first = import_archive(store, archive, name)
    blobs = sorted(p for p in (store.root / "oci" / "blobs").rglob("*") if p.is_file())
    assert blobs
    for blob in blobs:
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.chmod(0o644)
        blob.write_bytes(bytes(data))
    assert not maintenance.fsck(store).ok
    again = import_archive(store, archive, name)
    assert again.images == first.images
    assert maintenance.fsck(store).ok
    aside = [p for p in (store.root / "damaged").rglob("*") if p.is_file()]
    assert len(aside) == len(blobs), aside
