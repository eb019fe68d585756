"""Fixtures for test images built offline with :mod:`tests.harness.imagebuilder`.

- ``image_builder``: a factory bound to the test's tmp dir.
  ``image_builder(spec, tag="t") -> (layout, BuiltImage)`` writes into ``tmp_path/"oci"`` (one
  layout per test, several tags allowed; pass ``layout=`` for another one).
  ``image_builder.index(specs, tag="t")`` builds a multi-platform index the same way.
- ``busybox_image`` (session): a :class:`Layout` (a ``Path`` to an OCI layout) holding a busybox
  image tagged ``latest`` whose cmd is ``sleep 3600``; ``.tag``, ``.image`` (BuiltImage) and
  ``.ref`` (``"oci:LAYOUT:latest"``) are attached.
- ``store``: an empty, initialized :class:`Store` in the test's tmp dir (``tmp_path/"store"``).
- ``stored_busybox``: ``busybox_image`` copied into ``store`` as a pull fills it, tagged
  ``store_support.REF``; its top descriptor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PosixPath

import pytest

from bootstrap.image.model import Descriptor
from bootstrap.image.store import Store
from tests.harness.imagebuilder import BuiltImage, ImageSpec, build_image, build_index, busybox_spec
from tests.harness.store_support import REF, copy_layout_image


class Layout(PosixPath):
    """A path to an OCI layout, carrying the tag and BuiltImage of the image it was made for.
    Paths derived from it (``layout / "x"``) carry no attributes."""

    tag: str
    image: BuiltImage

    @classmethod
    def of(cls, path: Path, tag: str, image: BuiltImage) -> Layout:
        layout = cls(path)
        layout.tag = tag
        layout.image = image
        return layout

    @property
    def ref(self) -> str:
        return f"oci:{self}:{self.tag}"


class ImageBuilder:
    """Builds images into OCI layouts below ``root``; the default layout is ``root/"oci"``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = root / "oci"

    def __call__(
        self, spec: ImageSpec, tag: str = "t", layout: Path | None = None
    ) -> tuple[Layout, BuiltImage]:
        path = layout or self.layout
        image = build_image(path, tag, spec)
        return Layout.of(path, tag, image), image

    def index(
        self, specs: Sequence[ImageSpec], tag: str = "t", layout: Path | None = None
    ) -> tuple[Layout, BuiltImage]:
        path = layout or self.layout
        image = build_index(path, tag, specs)
        return Layout.of(path, tag, image), image


@pytest.fixture
def image_builder(tmp_path: Path) -> ImageBuilder:
    return ImageBuilder(tmp_path)


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    path = tmp_path_factory.mktemp("busybox-image") / "oci"
    image = build_image(path, "latest", busybox_spec(cmd=("sleep", "3600")))
    return Layout.of(path, "latest", image)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.init()
    return s


@pytest.fixture
def stored_busybox(store: Store, busybox_image: Path) -> Descriptor:
    return copy_layout_image(store, busybox_image, "latest", REF)
