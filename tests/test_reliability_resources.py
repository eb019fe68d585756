"""Resource faults: a store on a tiny tmpfs (20 MiB) that fills up in the middle of a pull, of an
import and of a checkout. Each must end with one clear error that names the lack of space and
hints at a remedy (a BootstrapError, not an "unexpected error"), leave the store valid (fsck
clean) with no tag for the failed image, and ``gc`` must give the space back, after which a
smaller image still pulls and checks out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootstrap.image import maintenance
from bootstrap.image.store import Store
from tests.harness.cli import Ran, bootstrap
from tests.harness.crashloop import fs_used, registries_env, store_leftovers, tiny_tmpfs
from tests.harness.imagebuilder import (
    BuiltImage,
    File,
    Layer,
    build_image,
    busybox_spec,
    random_content,
    save_docker_archive,
)
from tests.harness.registry import Registry

pytestmark = pytest.mark.slow

BIG = 24 << 20  # incompressible: does not fit in the 20 MiB store


@dataclass
class Full:
    store: Path
    env: dict[str, str]
    big_ref: str
    small_ref: str
    big: BuiltImage
    small: BuiltImage
    root: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltImage, BuiltImage]:
    layout = tmp_path_factory.mktemp("enospc") / "oci"
    big = build_image(
        layout,
        "big",
        busybox_spec(extra=[Layer([File("big.bin", random_content(3, BIG))], level=1)]),
    )
    small = build_image(layout, "small", busybox_spec(cmd=("true",)))
    return layout, big, small


@pytest.fixture
def full(
    registry: Registry, images: tuple[Path, BuiltImage, BuiltImage], tmp_path: Path
) -> Iterator[Full]:
    layout, big, small = images
    registry.push(layout, "big", "enospc/big:1")
    registry.push(layout, "small", "enospc/small:1")
    with tiny_tmpfs(tmp_path / "fs", "20m") as fs:
        yield Full(
            fs / "store",
            registries_env(tmp_path, registry.host),
            f"{registry.host}/enospc/big:1",
            f"{registry.host}/enospc/small:1",
            big,
            small,
            tmp_path,
        )


def assert_no_space_error(ran: Ran) -> None:
    assert ran.rc != 0
    assert "unexpected error" not in ran.stderr and "Traceback" not in ran.stderr, ran.stderr
    errors = [x for x in ran.stderr.splitlines() if x.startswith("bootstrap: error:")]
    assert len(errors) == 1, ran.stderr
    assert "space" in errors[0].lower(), ran.stderr
    assert "bootstrap: hint:" in ran.stderr


def assert_store_valid(store: Path) -> None:
    report = maintenance.fsck(Store(store))
    assert report.ok, report.findings()


def test_pull_into_a_full_store(full: Full) -> None:
    ran = bootstrap("pull", full.big_ref, store=full.store, env=full.env)
    assert_no_space_error(ran)
    st = Store(full.store)
    assert st.images() == []
    assert_store_valid(full.store)
    assert store_leftovers(full.store) == []  # the partial blob was removed at once
    used = fs_used(full.store)
    report = maintenance.gc(st)
    assert store_leftovers(full.store) == []
    assert fs_used(full.store) <= used
    # the space is usable again: a smaller image pulls and checks out
    ran = bootstrap("pull", full.small_ref, store=full.store, env=full.env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == full.small.digest
    assert_store_valid(full.store)
    print(f"\ngc after ENOSPC: {report.to_text()}")


def test_import_into_a_full_store(full: Full, images: tuple[Path, BuiltImage, BuiltImage]) -> None:
    archive = full.root / "big.tar"
    save_docker_archive(
        busybox_spec(extra=[Layer([File("big.bin", random_content(3, BIG))])]),
        archive,
        "enospc/imported:1",
    )
    ran = bootstrap("import", archive, store=full.store)
    assert_no_space_error(ran)
    assert Store(full.store).images() == []
    assert_store_valid(full.store)
    maintenance.gc(Store(full.store))
    assert store_leftovers(full.store) == []


def test_checkout_into_a_full_file_system(full: Full) -> None:
    """The layer cache lives in the store: extracting a layer that does not fit fails cleanly
    and leaves no cache temp dir."""
    ran = bootstrap("pull", full.small_ref, store=full.store, env=full.env, check=True)
    filler = full.store.parent / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill it, then free ~1 MiB: too little
        try:  # for busybox (2 MiB) to be extracted
            while True:
                fh.write(b"\1" * (1 << 20))
        except OSError:
            pass
    filler_size = filler.stat().st_size
    with open(filler, "r+b") as fh:
        fh.truncate(max(0, filler_size - (1 << 20)))
    dest = full.store.parent / "dest"
    ran = bootstrap("checkout", full.small_ref, dest, store=full.store)
    assert_no_space_error(ran)
    assert not dest.exists()
    assert [p for p in full.store.parent.iterdir() if p.name.startswith("dest")] == []
    assert store_leftovers(full.store) == []
    assert_store_valid(full.store)
    filler.unlink()
    bootstrap("checkout", full.small_ref, dest, store=full.store, check=True)
    assert (dest / "bin" / "busybox").is_file()


@pytest.mark.parametrize("where", ["first byte", "middle", "last byte"])
def test_bit_rot_in_a_stored_layer(
    registry: Registry, images: tuple[Path, BuiltImage, BuiltImage], tmp_path: Path, where: str
) -> None:
    """A stored layer blob damaged on disk after the pull (same size, one byte flipped): a
    checkout that must extract it fails with exit 4 and leaves no DEST and no cache entry;
    fsck exits 4 naming the blob, its path and the image; ``fsck --repair`` then ``pull``, or
    ``pull`` alone (it hashes stored blobs), heals the store; the damaged copy is kept aside."""
    layout, _, small = images
    registry.push(layout, "small", "enospc/small:1")
    env = registries_env(tmp_path, registry.host)
    ref = f"{registry.host}/enospc/small:1"
    store = tmp_path / "store"
    st = Store(store)
    bootstrap("pull", ref, store=store, env=env, check=True)
    blob = st.blob_path(small.layers[0])
    data = bytearray(blob.read_bytes())
    i = {"first byte": 0, "middle": len(data) // 2, "last byte": len(data) - 1}[where]
    data[i] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    dest = tmp_path / "rootfs"
    ran = bootstrap("checkout", ref, dest, store=store)
    assert ran.rc == 4, ran.stderr
    assert "Traceback" not in ran.stderr and "unexpected" not in ran.stderr
    assert not dest.exists() and store_leftovers(store) == []
    assert not any(p for p in (store / "layers" / "sha256").iterdir())
    ran = bootstrap("fsck", store=store)
    assert ran.rc == 4 and f"{small.layers[0]}: {blob} (needed by {ref})" in ran.stderr
    if where == "middle":  # healed by bootstrap alone: repair sets it aside, the pull fetches it
        ran = bootstrap("fsck", "--repair", store=store)
        assert ran.rc == 4 and f"bootstrap pull {ref}" in ran.stderr.splitlines()[-1]
        bootstrap("pull", ref, store=store, env=env, check=True)
    else:  # or by the pull at once: it hashes what it finds stored
        ran = bootstrap("pull", ref, store=store, env=env, check=True)
        assert f"stored blob {small.layers[0]} was damaged" in ran.stderr
    assert maintenance.fsck(st).ok and len(st.set_aside_blobs()) == 1
    bootstrap("checkout", ref, dest, store=store, check=True)
    assert (dest / "bin" / "busybox").is_file()
