"""Offline, deterministic test images: the product's image builder (:mod:`bootstrap.demo.oci`)
plus what only tests need.

From the product (re-exported): the entries :class:`File`, :class:`Dir`, :class:`Symlink`,
:class:`Hardlink`, :class:`Layer`, :class:`ImageSpec`, :class:`BuiltImage`, the layout helpers
(``init_layout``, ``put_blob``, ``blob_path``, ``canonical_json``) and ``save_oci_archive``.
Here: entries a normal image never has (:class:`Whiteout`, :class:`Opaque`, :class:`Fifo`,
:class:`Device`, :class:`Raw` verbatim headers for hostile layers), generated contents
(:class:`Stream`, :func:`random_content`, :func:`synthetic_layer`, :func:`synthetic_spec`),
Docker v2 schema 2 manifests, image indexes and ``docker save`` archives.

Contract::

    build_image(layout, tag, spec, docker=False) -> BuiltImage  # one manifest, tagged
    build_index(layout, tag, specs, docker=False) -> BuiltIndex # an OCI index (Docker list)
    busybox_layer(extra=(), compression="gzip") -> Layer
    busybox_spec(cmd=("sleep", "3600"), extra=(), **ImageSpec fields) -> ImageSpec
    synthetic_layer(seed, n_small, small_size, n_large, large_size, compression) -> Layer
    synthetic_spec(n_layers=5, ...) -> ImageSpec        # ~250 MB benchmark image
    random_content(seed, size, compressible=False) -> Stream
    save_oci_archive(layout, path)                      # tar of a layout (oci-archive:)
    save_docker_archive(spec, path, repo_tag)           # `docker save` format tarball

Paths in entries may be written ``"/bin/sh"``, ``"bin/sh"`` or ``"./bin/sh"``; they are stored as
``bin/sh``. :class:`Raw` entries are written verbatim. :class:`Stream` contents are generated
and hashed while being written, so memory stays flat.
"""

from __future__ import annotations

import copy
import io
import json
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from bootstrap.demo import images, oci
from bootstrap.demo.oci import (  # noqa: F401  (re-exported: part of this module's contract)
    DEFAULT_PATH_ENV,
    BuiltImage,
    Dir,
    Entry,
    File,
    Hardlink,
    ImageSpec,
    Layer,
    MediaTypes,
    Symlink,
    blob_path,
    canonical_json,
    init_layout,
    put_blob,
    save_oci_archive,
)
from bootstrap.image.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
)

DEFAULT_MTIME = oci.MTIME
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # uncompressed Docker layer
DOCKER_MEDIA = MediaTypes(
    DOCKER_MANIFEST, DOCKER_CONFIG, {"gzip": DOCKER_LAYER_GZIP, "none": DOCKER_LAYER}
)
"""Docker v2 schema 2: gzip or uncompressed layers only."""


# ---------------------------------------------------------------------------------------------
# entries only tests need


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers: written as ``DIR/.wh.NAME``."""

    path: str

    def member(self) -> str:
        parent, _, base = oci.canonical_path(self.path).rpartition("/")
        return f"{parent}/.wh.{base}" if parent else f".wh.{base}"

    def add_to(self, tar: tarfile.TarFile) -> None:
        tar.addfile(oci.header(self.member(), tarfile.REGTYPE, 0o644))


@dataclass(frozen=True)
class Opaque:
    """Hides everything below directory ``path`` from lower layers: ``path/.wh..wh..opq``."""

    path: str

    def member(self) -> str:
        return f"{oci.canonical_path(self.path)}/.wh..wh..opq"

    def add_to(self, tar: tarfile.TarFile) -> None:
        tar.addfile(oci.header(self.member(), tarfile.REGTYPE, 0o644))


@dataclass(frozen=True)
class Fifo(oci.Owned):
    path: str
    mode: int = 0o644

    def member(self) -> str:
        return oci.canonical_path(self.path)

    def add_to(self, tar: tarfile.TarFile) -> None:
        tar.addfile(self.node_header(self.path, tarfile.FIFOTYPE, self.mode))


@dataclass(frozen=True)
class Device(oci.Owned):
    """A character (``kind="c"``) or block (``kind="b"``) device node."""

    path: str
    kind: str
    major: int
    minor: int
    mode: int = 0o666

    def member(self) -> str:
        return oci.canonical_path(self.path)

    def add_to(self, tar: tarfile.TarFile) -> None:
        if self.kind not in ("c", "b"):
            raise ValueError(f"Device {self.path}: kind must be 'c' or 'b'")
        kind = tarfile.CHRTYPE if self.kind == "c" else tarfile.BLKTYPE
        info = self.node_header(self.path, kind, self.mode)
        info.devmajor, info.devminor = self.major, self.minor
        tar.addfile(info)


@dataclass(frozen=True)
class Raw:
    """A verbatim tar entry (hostile names, links out of the tree, ...). ``info`` is copied; for
    a regular file whose ``info.size`` is 0, the size is taken from ``data``."""

    info: tarfile.TarInfo
    data: bytes = b""

    def member(self) -> None:
        return None

    def add_to(self, tar: tarfile.TarFile) -> None:
        info = copy.copy(self.info)
        if info.isreg() and info.size == 0 and self.data:
            info.size = len(self.data)
        tar.addfile(info, io.BytesIO(self.data) if info.isreg() else None)


# ---------------------------------------------------------------------------------------------
# generated contents


class _StreamReader(io.RawIOBase):
    """File-like reader over a :class:`Stream`'s chunks, for ``TarFile.addfile``."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it: Iterator[bytes] = iter(chunks)
        self._chunk = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        parts: list[bytes] = []
        want = -1 if size is None else size
        while want != 0:
            if self._pos >= len(self._chunk):
                try:
                    self._chunk, self._pos = next(self._it), 0
                except StopIteration:
                    break
                continue
            end = len(self._chunk) if want < 0 else min(len(self._chunk), self._pos + want)
            parts.append(self._chunk[self._pos : end])
            if want > 0:
                want -= end - self._pos
            self._pos = end
        return b"".join(parts)


@dataclass(frozen=True)
class Stream:
    """Lazily generated file content (a :class:`bootstrap.demo.oci.Source`): exactly ``size``
    bytes yielded by ``chunks()``, which must be repeatable (each call starts afresh) so that
    rebuilding is deterministic."""

    size: int
    chunks: Callable[[], Iterable[bytes]]

    def open(self) -> IO[bytes]:
        return _StreamReader(self.chunks())  # type: ignore[return-value]


def random_content(seed: int, size: int, *, compressible: bool = False) -> Stream:
    """Deterministic pseudo-random content of ``size`` bytes from ``seed``, generated in 1 MiB
    chunks. ``compressible`` gives hex text (about 2:1 under gzip) instead of raw bytes."""

    def chunks() -> Iterator[bytes]:
        rng = random.Random(seed)
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            if compressible:
                yield rng.randbytes((n + 1) // 2).hex().encode()[:n]
            else:
                yield rng.randbytes(n)
            left -= n

    return Stream(size, chunks)


def synthetic_layer(
    seed: int,
    n_small: int,
    small_size: int,
    n_large: int,
    large_size: int,
    compression: str = "gzip",
    level: int | None = None,
) -> Layer:
    """A deterministic benchmark layer: ``n_small`` compressible (hex text) files of
    ``small_size`` bytes in directories of 100 (``s{seed}/dNNNN/fNNNNN``) and ``n_large``
    incompressible files of ``large_size`` bytes (``s{seed}/large/bNNN``). Contents are
    :class:`Stream` objects, so building stays flat in memory. Different seeds give disjoint
    paths and contents."""
    entries: list[Entry] = []
    for i in range(n_small):
        content = random_content(seed * 1_000_003 + i, small_size, compressible=True)
        entries.append(File(f"s{seed}/d{i // 100:04d}/f{i:05d}", content))
    for j in range(n_large):
        content = random_content(seed * 7919 + j + 1_000_000_000, large_size)
        entries.append(File(f"s{seed}/large/b{j:03d}", content))
    return Layer(entries, compression=compression, level=level)


def synthetic_spec(
    n_layers: int = 5,
    n_small: int = 4000,
    small_size: int = 4096,
    n_large: int = 8,
    large_size: int = 4 << 20,
    compression: str = "gzip",
    level: int | None = None,
    base: bool = True,
) -> ImageSpec:
    """A benchmark image: (with ``base``) the busybox layer, then ``n_layers`` synthetic layers
    with seeds 1..n. The defaults give about 250 MB of tar, 20k files."""
    layers = [busybox_layer(compression=compression)] if base else []
    layers += [
        synthetic_layer(seed, n_small, small_size, n_large, large_size, compression, level)
        for seed in range(1, n_layers + 1)
    ]
    return ImageSpec(layers=layers, cmd=("sleep", "3600"))


def busybox_layer(extra: Sequence[Entry] = (), compression: str = "gzip") -> Layer:
    """A runnable base layer (the demo images' :func:`bootstrap.demo.images.base_entries`:
    static ``/bin/busybox`` with its applets, ``/etc`` basics, ``/tmp``, mount points), then
    ``extra``."""
    return Layer([*images.base_entries(), *extra], compression=compression)


def busybox_spec(
    cmd: Sequence[str] = ("sleep", "3600"), extra: Sequence[Layer] = (), **kw: Any
) -> ImageSpec:
    """An ImageSpec of :func:`busybox_layer` plus ``extra`` layers, running ``cmd``."""
    return ImageSpec(layers=[busybox_layer(), *extra], cmd=tuple(cmd), **kw)


# ---------------------------------------------------------------------------------------------
# images, indexes, archives


@dataclass(frozen=True)
class BuiltIndex(BuiltImage):
    """What :func:`build_index` wrote: ``manifest_digest``, ``manifest_size`` and
    ``media_type`` describe the index; ``children`` are the per-platform images in order."""

    children: tuple[BuiltImage, ...] = ()


def build_image(layout: Path, tag: str, spec: ImageSpec, *, docker: bool = False) -> BuiltImage:
    """Write ``spec`` into the OCI layout ``layout`` (created if needed) and tag it ``tag``
    (replacing an older entry of that tag). With ``docker``, the manifest, config and layers
    carry Docker v2 schema 2 media types instead (skopeo pushes such a manifest unchanged)."""
    return oci.build_image(layout, tag, spec, DOCKER_MEDIA if docker else oci.OCI_MEDIA)


def build_index(
    layout: Path, tag: str, specs: Sequence[ImageSpec], *, docker: bool = False
) -> BuiltIndex:
    """Write every spec as a manifest, then an OCI image index over them (with each spec's
    platform), and tag the index ``tag``. With ``docker``, a Docker manifest list over Docker
    v2s2 manifests."""
    media = DOCKER_MEDIA if docker else oci.OCI_MEDIA
    children = [oci.write_manifest(layout, spec, media) for spec in specs]
    entries: list[dict[str, Any]] = []
    for spec, child in zip(specs, children, strict=True):
        platform = {"architecture": spec.architecture, "os": spec.os}
        if spec.variant:
            platform["variant"] = spec.variant
        entries.append({**child.descriptor(), "platform": platform})
    index_type = DOCKER_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": index_type, "manifests": entries}
    digest, size = put_blob(layout, canonical_json(index))
    built = BuiltIndex(digest, "", (), (), size, index_type, children=tuple(children))
    oci.tag(layout, tag, built.descriptor())
    return built


def _add(tar: tarfile.TarFile, name: str, data: bytes | Path) -> None:
    info = oci.header(name, tarfile.REGTYPE, 0o644)
    if isinstance(data, Path):
        info.size = data.stat().st_size
        with data.open("rb") as f:
            tar.addfile(info, f)
    else:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def save_docker_archive(spec: ImageSpec, path: Path, repo_tag: str | None) -> BuiltImage:
    """Write ``spec`` as a ``docker save`` tarball: ``<confighex>.json``, ``<n>/layer.tar``
    (uncompressed, whatever ``Layer.compression`` says), ``manifest.json`` and ``repositories``
    (when ``repo_tag`` is given, e.g. ``"example.com/app:1"``). Returns the image as it would
    be built into a layout with uncompressed layers (``layers`` == ``diff_ids``)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".docker-archive-") as tmpdir:
        tmp = Path(tmpdir)
        plain = replace(spec, layers=[replace(la, compression="none") for la in spec.layers])
        image = build_image(tmp, "x", plain)
        cfg_name = image.config_digest[7:] + ".json"
        layer_names = [f"{i}/layer.tar" for i in range(len(image.layers))]
        manifest = [
            {
                "Config": cfg_name,
                "RepoTags": [repo_tag] if repo_tag else None,
                "Layers": layer_names,
            }
        ]
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, cfg_name, blob_path(tmp, image.config_digest))
            for i, digest in enumerate(image.layers):
                tar.addfile(oci.header(str(i), tarfile.DIRTYPE, 0o755))
                _add(tar, f"{i}/VERSION", b"1.0")
                _add(tar, layer_names[i], blob_path(tmp, digest))
            _add(tar, "manifest.json", json.dumps(manifest).encode())
            if repo_tag and image.diff_ids:
                repo, _, tag = repo_tag.rpartition(":")
                if "/" in tag or not repo:
                    repo, tag = repo_tag, "latest"
                repositories = {repo: {tag: image.diff_ids[-1][7:]}}
                _add(tar, "repositories", json.dumps(repositories).encode())
    return image
