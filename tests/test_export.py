"""Stored images streamed out as oci-archives (what ``up`` hands a CRI daemon): skopeo reads the
archive back to the same manifest, a damaged blob stops the stream with an integrity error, and
``run(feed=...)`` streams it into a command without holding it in memory."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from bootstrap.errors import BootstrapError, IntegrityError
from bootstrap.image.archive import import_archive
from bootstrap.image.export import write_oci_archive
from bootstrap.image.store import Store
from bootstrap.process import run
from tests.harness.imagebuilder import File, ImageSpec, Layer, build_image, save_oci_archive

NAME = "registry.example.com/team/app:2.0"


@pytest.fixture
def stored(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    store.init()
    layout = tmp_path / "layout"
    spec = ImageSpec(
        [Layer([File("a/b", b"b" * 5000)]), Layer([File("c", b"c")], compression="zstd")],
        cmd=("sh",),
    )
    build_image(layout, NAME, spec)
    save_oci_archive(layout, tmp_path / "in.tar")
    import_archive(store, tmp_path / "in.tar", None)
    return store


def test_export_is_an_oci_archive_skopeo_reads(stored: Store, tmp_path: Path) -> None:
    image = stored.image(NAME)
    out = tmp_path / "out.tar"
    with open(out, "wb") as fh:
        done = write_oci_archive(stored, image, fh)
    assert done.manifest_digest == image.manifest.digest
    assert done.blobs == 2 + len(image.manifest.layers)
    assert done.size == out.stat().st_size
    with tarfile.open(out) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert names[:3] == ["oci-layout", "index.json", "blobs"]
    ann = index["manifests"][0]["annotations"]
    assert ann == {"org.opencontainers.image.ref.name": NAME, "io.containerd.image.name": NAME}
    inspect = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci-archive:{out}:{NAME}"],
        capture_output=True,
        check=True,
    )
    assert inspect.stdout == stored.read_blob(image.manifest.digest)
    # and bootstrap imports it again to the same image
    again = Store(tmp_path / "again")
    again.init()
    result = import_archive(again, out, None)
    assert [(i.name, i.digest) for i in result.images] == [(NAME, image.manifest.digest)]


def test_a_damaged_blob_stops_the_export(stored: Store, tmp_path: Path) -> None:
    image = stored.image(NAME)
    layer = stored.blob_path(image.manifest.layers[0].digest)
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0xFF
    layer.chmod(0o644)
    layer.write_bytes(bytes(data))
    with open(tmp_path / "out.tar", "wb") as fh, pytest.raises(IntegrityError, match="damaged"):
        write_oci_archive(stored, image, fh)
    layer.write_bytes(bytes(data[:-1]))
    with open(tmp_path / "out.tar", "wb") as fh, pytest.raises(IntegrityError, match="bytes"):
        write_oci_archive(stored, image, fh)


def test_run_feeds_a_stream_to_a_command(stored: Store) -> None:
    image = stored.image(NAME)
    sizes: list[int] = []
    proc = run(
        ["tar", "-tf", "-"], feed=lambda p: sizes.append(write_oci_archive(stored, image, p).size)
    )
    assert proc.stdout.decode().splitlines()[:2] == ["oci-layout", "index.json"]
    assert sizes and sizes[0] > 5000


def test_run_reports_the_command_when_it_stops_reading(stored: Store) -> None:
    image = stored.image(NAME)
    with pytest.raises(BootstrapError, match="exited 3: refused") as info:
        run(
            ["sh", "-c", "head -c 100 >/dev/null; echo refused >&2; exit 3"],
            feed=lambda p: write_oci_archive(stored, image, p),
        )
    assert "Broken pipe" not in info.value.message


def test_run_kills_the_command_when_the_feed_fails() -> None:
    def feed(pipe: object) -> None:
        raise IntegrityError("ours", "hint")

    with pytest.raises(IntegrityError, match="ours"):
        run(["cat"], feed=feed, timeout=30)


def test_a_cri_image_id_is_the_config_digest_with_or_without_its_algorithm() -> None:
    from bootstrap.node.pods import same_image_id

    digest = "sha256:" + "ab" * 32
    assert same_image_id(digest, digest)  # containerd
    assert same_image_id("ab" * 32, digest)  # CRI-O: containers/storage's bare id
    assert not same_image_id("sha256:" + "cd" * 32, digest)
