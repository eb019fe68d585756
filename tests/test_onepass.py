"""One-pass pull: layers inflated into the layer cache while they download (``pull_image(...,
extract=...)``), through the fault proxy in front of a real registry. The result equals the
two-pass pull + checkout; wrong bytes leave neither a blob nor a cache entry."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.errors import ExitCode, IntegrityError
from bootstrap.image.apply import UnpackOptions
from bootstrap.image.compose import checkout
from bootstrap.image.layercache import cached_layer
from bootstrap.image.model import OCI_LAYER_ZSTD
from bootstrap.image.pull import pull_image
from bootstrap.image.store import Store
from tests.harness.imagebuilder import (
    BuiltImage,
    Dir,
    File,
    ImageSpec,
    Layer,
    Symlink,
    build_image,
    busybox_layer,
    random_content,
)
from tests.harness.registry import Registry
from tests.harness.treediff import assert_same_tree
from tests.test_faults import (
    LAYER_SIZE,
    Setup,
    _assert_clean,
    _blob_requests,
    fault_layout,
    served,
    setup,
)

__all__ = ["fault_layout", "setup"]  # fixtures, re-used from test_faults
pytestmark = pytest.mark.slow


def _cache_entries(store: Store) -> list[Path]:
    return sorted(p for p in store.layers.rglob("*") if p.parent.parent == store.layers)


@pytest.fixture(scope="module")
def zstd_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltImage]:
    layout = tmp_path_factory.mktemp("zstd") / "oci"
    files: list[File | Dir | Symlink] = [
        File(f"etc/conf/{i:03}", b"%d\n" % i * 50) for i in range(300)
    ]
    files += [Dir("srv", mode=0o750), Symlink("srv/current", "../etc/conf")]
    spec = ImageSpec(
        layers=[
            busybox_layer(),
            Layer(files, compression="zstd"),
            Layer([File("data/big.bin", random_content(11, LAYER_SIZE))], compression="zstd"),
        ],
        cmd=("true",),
    )
    return layout, build_image(layout, "t", spec)


@pytest.fixture
def zstd_setup(
    registry: Registry, zstd_layout: tuple[Path, BuiltImage], tmp_path: Path
) -> Iterator[Setup]:
    yield from served(registry, zstd_layout, "faults/zimg", tmp_path / "store")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_one_pass_equals_two_pass(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    setup: Setup = request.getfixturevalue("setup" if kind == "gzip" else "zstd_setup")
    with setup.client() as client:
        result = pull_image(setup.store, setup.ref, client=client, extract=UnpackOptions())
    image = result.image
    if kind == "zstd":
        assert [d.media_type for d in image.manifest.layers][1:] == [OCI_LAYER_ZSTD] * 2
    # every layer is cached by the pull itself: the checkout extracts nothing
    for diff_id in image.config.diff_ids:
        assert cached_layer(setup.store, diff_id, UnpackOptions()) is not None
    one = checkout(setup.store, image, tmp_path / "one")
    assert one.extracted == 0
    _assert_clean(setup)

    two_store = Store(tmp_path / "two-store")
    with setup.client() as client:
        two_image = pull_image(two_store, setup.ref, client=client).image
    assert _cache_entries(two_store) == []
    two = checkout(two_store, two_image, tmp_path / "two")
    assert two.extracted == len(image.config.diff_ids)
    assert_same_tree(tmp_path / "one", tmp_path / "two", mtimes=True)
    for digest in (image.config.digest, *setup.image.layers):
        assert (
            setup.store.blob_path(digest).read_bytes() == two_store.blob_path(digest).read_bytes()
        )


def test_resumed_download_still_one_pass(setup: Setup, tmp_path: Path) -> None:
    fault = setup.proxy.add("reset", setup.big_layer, after=1_500_000)
    with setup.client() as client:
        image = pull_image(setup.store, setup.ref, client=client, extract=UnpackOptions()).image
    # the cut transfer was retried (with Range from what was already written, or from 0 when
    # the reset dropped everything unread); the pipe saw each byte once, in order
    assert fault.hits == 1 and len(_blob_requests(setup, setup.big_layer)) >= 1
    assert checkout(setup.store, image, tmp_path / "root").extracted == 0
    _assert_clean(setup)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_wrong_bytes_leave_no_blob_and_no_cache_entry(
    kind: str, request: pytest.FixtureRequest
) -> None:
    setup: Setup = request.getfixturevalue("setup" if kind == "gzip" else "zstd_setup")
    setup.proxy.add("flip", setup.big_layer, after=1_234_567)
    with setup.client() as client, pytest.raises(IntegrityError) as info:
        pull_image(setup.store, setup.ref, client=client, extract=UnpackOptions())
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert not setup.store.has_blob(setup.big_layer)
    assert setup.store.images() == []
    # the big layer's partial extraction is gone (the small one may be cached: it was whole)
    kept = {p.name for p in _cache_entries(setup.store)}
    assert not any(name.startswith(".") for name in kept), kept
    assert len(kept) <= len(setup.image.layers) - 1
    _assert_clean(setup)


def test_concurrent_pullers_fetch_and_extract_once(setup: Setup, tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with setup.client() as client:
                pull_image(setup.store, setup.ref, client=client, extract=UnpackOptions())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for digest in setup.image.layers:
        assert len([r for r in _blob_requests(setup, digest) if r.method == "GET"]) == 1
    image = setup.store.image(setup.store.images()[0].name)
    assert len(_cache_entries(setup.store)) == len(set(image.config.diff_ids))
    assert checkout(setup.store, image, tmp_path / "root").extracted == 0
    _assert_clean(setup)
