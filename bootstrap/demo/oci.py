"""The one OCI image builder: deterministic image layouts and oci-archives from a declarative spec
(the demo's images at run time; the tests' images are built on top of it).

An :class:`ImageSpec` is :class:`Layer`\\ s (lowest first) of entries plus the config fields a
runtime uses. Entries are :class:`File` (``bytes``, a host file streamed in, or any
:class:`Source`), :class:`Dir`, :class:`Symlink`, :class:`Hardlink`, or any other :class:`Entry`:
an object that names its tar member and adds itself to a tar (the tests add whiteouts, devices
and verbatim headers that way). :func:`build_image` writes a spec into an OCI image layout and
tags it; :func:`write_manifest` writes it untagged; :func:`save_oci_archive` tars a layout as an
``oci-archive``; :func:`tree_entries` turns a host directory into entries.

Reproducible: the same spec gives byte-identical blobs (fixed mtimes, numeric owners with empty
user/group names, entries in the order given with missing parent directories added first, pax
format, gzip header mtime 0 and no file name, single-threaded zstd, canonical JSON). Contents
are streamed, never held whole; a layer blob is written to a temporary file beside the blobs and
renamed to its digest. A bad entry path or a missing host file raises :class:`ImageBuildError`;
the build's other I/O errors propagate.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from bootstrap.errors import BootstrapError
from bootstrap.fsutil import fsync_dir
from bootstrap.image import api as image_api

MTIME = 1700000000
"""mtime of every entry unless given (reproducible layers)."""
CREATED = "2023-11-14T22:13:20Z"
""":data:`MTIME` as the config's ``created``."""
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHUNK = 1 << 20


class ImageBuildError(BootstrapError):
    """An image could not be built (a bad entry path, a missing source file, ...)."""


# ---- entries -----------------------------------------------------------------------------------


class Source(Protocol):
    """File content made on demand: ``size`` bytes, read from a fresh ``open()`` each time."""

    @property
    def size(self) -> int: ...

    def open(self) -> IO[bytes]: ...


class Entry(Protocol):
    """What a layer holds: ``member()`` is the tar name it writes (None: unknown, no parent
    directories are added for it) and ``add_to(tar)`` writes it."""

    def member(self) -> str | None: ...

    def add_to(self, tar: tarfile.TarFile) -> None: ...


def canonical_path(path: str) -> str:
    """``path`` as a tar member name: ``/bin/sh``, ``./bin/sh`` and ``bin/sh/`` are ``bin/sh``.
    Raises :class:`ImageBuildError` for an empty path or one with a ``..`` component."""
    name = path
    while name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    if not name or ".." in name.split("/"):
        raise ImageBuildError(f"bad path in an image spec: {path!r}", "use paths below the root")
    return name


def header(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    """A tar header for ``name`` of type ``kind`` (``tarfile.REGTYPE``, ...): numeric owners with
    empty names, mtime :data:`MTIME`."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    info.uname = info.gname = ""
    info.mtime = MTIME
    return info


@dataclass(frozen=True, kw_only=True)
class Owned:
    """What every entry that is a node of the tree carries (keyword-only, after the entry's own
    fields): owners, mtime, and extended attributes as pax ``SCHILY.xattr.NAME`` records, whose
    values may be ``str`` or raw ``bytes`` (e.g. ``security.capability``)."""

    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    xattrs: Mapping[str, str | bytes] = field(default_factory=dict)

    def node_header(self, path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        """The tar header of this node at ``path``, of type ``kind``, with ``mode``."""
        info = header(canonical_path(path), kind, mode, self.uid, self.gid)
        info.mtime = self.mtime
        if self.xattrs:
            # tarfile writes surrogate-escaped strings back as the original bytes (hdrcharset)
            info.pax_headers = {
                f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                if isinstance(v, bytes)
                else v
                for k, v in self.xattrs.items()
            }
        return info


@dataclass(frozen=True)
class File(Owned):
    """A regular file: ``content`` is ``bytes``, a host file streamed in, or a :class:`Source`."""

    path: str
    content: bytes | Path | Source = b""
    mode: int = 0o644

    def member(self) -> str:
        return canonical_path(self.path)

    def add_to(self, tar: tarfile.TarFile) -> None:
        info = self.node_header(self.path, tarfile.REGTYPE, self.mode)
        content = self.content
        if isinstance(content, bytes):
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        elif isinstance(content, Path):
            try:
                src = open(content, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError as exc:
                raise ImageBuildError(
                    f"{self.path}: no source file {content}", "install what provides it"
                ) from exc
            with src:
                info.size = os.fstat(src.fileno()).st_size
                tar.addfile(info, src)
        else:
            info.size = content.size
            with content.open() as stream:
                tar.addfile(info, stream)


@dataclass(frozen=True)
class Dir(Owned):
    path: str
    mode: int = 0o755

    def member(self) -> str:
        return canonical_path(self.path)

    def add_to(self, tar: tarfile.TarFile) -> None:
        tar.addfile(self.node_header(self.path, tarfile.DIRTYPE, self.mode))


@dataclass(frozen=True)
class Symlink(Owned):
    path: str
    target: str

    def member(self) -> str:
        return canonical_path(self.path)

    def add_to(self, tar: tarfile.TarFile) -> None:
        info = self.node_header(self.path, tarfile.SYMTYPE, 0o777)
        info.linkname = self.target
        tar.addfile(info)


@dataclass(frozen=True)
class Hardlink:
    """A hard link to ``target``: the path of an earlier entry in the same layer."""

    path: str
    target: str

    def member(self) -> str:
        return canonical_path(self.path)

    def add_to(self, tar: tarfile.TarFile) -> None:
        info = header(self.member(), tarfile.LNKTYPE, 0o644)
        info.linkname = canonical_path(self.target)
        tar.addfile(info)


def tree_entries(root: Path, prefix: str = "", skip: Sequence[str] = ()) -> list[Entry]:
    """Entries for everything below the host directory ``root``, sorted: directories, files
    (streamed from disk when the layer is written), symlinks and hard links with their modes,
    owned by root. ``prefix`` is put before every path; paths equal to or below one of ``skip``
    and ``__pycache__`` directories are left out."""

    def skipped(rel: str) -> bool:
        rel = os.path.normpath(rel)
        return any(rel == s or rel.startswith(s + "/") for s in skip)

    entries: list[Entry] = []
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(
            d for d in dirnames if d != "__pycache__" and not skipped(os.path.join(rel_dir, d))
        )
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            if skipped(os.path.join(rel_dir, name)):
                continue
            rel = os.path.normpath(os.path.join(prefix, rel_dir, name))
            st = full.lstat()
            mode = st.st_mode & 0o7777
            if full.is_symlink():
                entries.append(Symlink(rel, os.readlink(full)))
            elif full.is_dir():
                entries.append(Dir(rel, mode=mode))
            elif full.is_file():
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in inodes:
                    entries.append(Hardlink(rel, inodes[key]))
                else:
                    inodes[key] = rel
                    entries.append(File(rel, full, mode=mode))
    return entries


def hash_tree(h: Any, root: Path) -> None:
    """Feed the hashlib object ``h`` every path below ``root`` in sorted order with its type, a
    symlink's target, a file's mode, size and bytes (``__pycache__`` left out): a cache key that
    changes when anything there does."""
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif path.is_dir():
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} {st.st_mode & 0o7777:o} {st.st_size}\n".encode())
            h.update(path.read_bytes())


# ---- layers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer. ``compression``: "gzip" (isa-l, ``level`` 0-3, default 2), "zstd" (``level``
    default 3) or "none". With ``auto_dirs`` (the default), parent directories not listed are
    added (root-owned, 0755) right before the first entry below them; entries are otherwise
    written exactly in the order given."""

    entries: Sequence[Entry]
    compression: str = "gzip"
    auto_dirs: bool = True
    level: int | None = None


@dataclass(frozen=True)
class BuiltLayer:
    digest: str
    """Of the blob as stored (compressed)."""
    diff_id: str
    """Of the uncompressed tar."""
    size: int
    compression: str


def _with_parents(entries: Iterable[Entry]) -> Iterable[Entry]:
    seen: set[str] = set()
    for entry in entries:
        name = entry.member()
        if name is not None:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parent = "/".join(parts[:i])
                if parent not in seen:
                    seen.add(parent)
                    yield Dir(parent)
            if isinstance(entry, Dir):
                seen.add(name)
        yield entry


def write_layer_tar(layer: Layer, out: IO[bytes]) -> None:
    """Write the uncompressed tar of ``layer`` to ``out``."""
    entries = _with_parents(layer.entries) if layer.auto_dirs else layer.entries
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", bufsize=1 << 16
    ) as tar:
        for entry in entries:
            entry.add_to(tar)


def write_layer(layout: Path, layer: Layer) -> BuiltLayer:
    """Write ``layer`` as a blob of ``layout`` (streamed to a temporary file, renamed to its
    digest); return its digests and size."""
    if layer.compression not in ("gzip", "zstd", "none"):
        raise ImageBuildError(f"layer compression {layer.compression!r}", "use gzip, zstd or none")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    try:
        with os.fdopen(fd, "wb", buffering=_CHUNK) as raw:
            outer = image_api.Digesting(raw, algorithm="sha256")
            if layer.compression == "gzip":
                from isal import igzip

                level = 2 if layer.level is None else layer.level
                gz = igzip.IGzipFile(  # type: ignore[no-untyped-call]
                    filename="", mode="wb", fileobj=outer, compresslevel=level, mtime=0
                )
                with cast(IO[bytes], gz):
                    inner = image_api.Digesting(gz, algorithm="sha256")
                    write_layer_tar(layer, cast(IO[bytes], inner))
            elif layer.compression == "zstd":
                import zstandard

                level = 3 if layer.level is None else layer.level
                zw = zstandard.ZstdCompressor(level=level, threads=0).stream_writer(
                    cast(IO[bytes], outer), closefd=False
                )
                inner = image_api.Digesting(zw, algorithm="sha256")
                write_layer_tar(layer, cast(IO[bytes], inner))
                zw.flush(zstandard.FLUSH_FRAME)
                zw.close()  # type: ignore[no-untyped-call]
            else:
                inner = outer
                write_layer_tar(layer, cast(IO[bytes], inner))
            os.fchmod(raw.fileno(), 0o644)
        digest = outer.digest()
        os.replace(tmp, blobs / digest.split(":", 1)[1])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return BuiltLayer(digest, inner.digest(), outer.count, layer.compression)


# ---- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """An image: ``layers`` (lowest first), the config fields a runtime uses, the platform, and
    the manifest's ``annotations``."""

    layers: Sequence[Layer]
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = (DEFAULT_PATH_ENV,)
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    os: str = "linux"
    architecture: str = field(default_factory=lambda: image_api.Platform.host().architecture)
    variant: str = ""
    stop_signal: str = ""
    exposed_ports: Sequence[str] = ()
    volumes: Sequence[str] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def platform(self) -> image_api.Platform:
        return image_api.Platform(self.os, self.architecture, self.variant)

    def config(self, diff_ids: Sequence[str]) -> dict[str, Any]:
        """The image config document for layers whose uncompressed digests are ``diff_ids``."""
        fields: dict[str, Any] = {
            "Env": list(self.env),
            "Entrypoint": list(self.entrypoint),
            "Cmd": list(self.cmd),
            "WorkingDir": self.working_dir,
            "User": self.user,
            "Labels": dict(self.labels),
            "StopSignal": self.stop_signal,
            "ExposedPorts": {p: {} for p in self.exposed_ports},
            "Volumes": {v: {} for v in self.volumes},
        }
        doc: dict[str, Any] = {
            "created": CREATED,
            "architecture": self.architecture,
            "os": self.os,
            "config": {k: v for k, v in fields.items() if v},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [
                {"created": CREATED, "created_by": f"bootstrap image builder: layer {i}"}
                for i in range(len(diff_ids))
            ],
        }
        if self.variant:
            doc["variant"] = self.variant
        return doc


@dataclass(frozen=True)
class MediaTypes:
    """The media types a manifest is written with: its own, its config's, and its layers' by
    :attr:`Layer.compression` (a compression missing here cannot be written)."""

    manifest: str
    config: str
    layers: Mapping[str, str]


OCI_MEDIA = MediaTypes(
    image_api.OCI_MANIFEST,
    image_api.OCI_CONFIG,
    {
        "gzip": image_api.OCI_LAYER_GZIP,
        "zstd": image_api.OCI_LAYER_ZSTD,
        "none": image_api.OCI_LAYER,
    },
)


@dataclass(frozen=True)
class BuiltImage:
    """What was written: the manifest (or index) digest, size and media type, the config, the
    layers (blob digests, uncompressed ``diff_ids``, blob sizes) and the platform."""

    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]
    diff_ids: tuple[str, ...]
    manifest_size: int
    media_type: str = image_api.OCI_MANIFEST
    layer_sizes: tuple[int, ...] = ()
    config_size: int = 0
    platform: image_api.Platform | None = None

    @property
    def digest(self) -> str:
        return self.manifest_digest

    def descriptor(self) -> dict[str, Any]:
        """The OCI descriptor of the manifest (or index)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.manifest_size}


def canonical_json(doc: Any) -> bytes:
    """The JSON encoding of configs, manifests and indexes: sorted keys, compact."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def init_layout(layout: Path) -> None:
    """Create an empty OCI image layout at ``layout`` unless one is there already."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    if not (layout / "index.json").exists():
        _write_index(layout, [])


def _write_index(layout: Path, manifests: list[dict[str, Any]]) -> None:
    doc = {"schemaVersion": 2, "mediaType": image_api.OCI_INDEX, "manifests": manifests}
    tmp = layout / "index.json.tmp"
    tmp.write_bytes(canonical_json(doc))
    os.replace(tmp, layout / "index.json")


def tag(layout: Path, name: str, descriptor: Mapping[str, Any]) -> None:
    """Point ``name`` (``org.opencontainers.image.ref.name``) at ``descriptor`` in the layout's
    ``index.json``, replacing an older entry of that name."""
    doc = json.loads((layout / "index.json").read_bytes())
    manifests = [
        m
        for m in doc.get("manifests", [])
        if (m.get("annotations") or {}).get(image_api.REF_NAME_ANNOTATION) != name
    ]
    manifests.append({**descriptor, "annotations": {image_api.REF_NAME_ANNOTATION: name}})
    _write_index(layout, manifests)


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    """Store ``data`` as a blob of ``layout``; return (digest, size)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest, len(data)


def write_manifest(layout: Path, spec: ImageSpec, media: MediaTypes = OCI_MEDIA) -> BuiltImage:
    """Write ``spec``'s layers, config and manifest into ``layout`` (created if needed) with the
    media types ``media``; nothing is tagged. Raises :class:`ImageBuildError` for a layer
    compression ``media`` has no type for."""
    for layer in spec.layers:
        if layer.compression not in media.layers:
            raise ImageBuildError(
                f"{media.manifest} has no {layer.compression} layers", "compress them otherwise"
            )
    init_layout(layout)
    built = [write_layer(layout, layer) for layer in spec.layers]
    config_digest, config_size = put_blob(
        layout, canonical_json(spec.config([b.diff_id for b in built]))
    )
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media.manifest,
        "config": {"mediaType": media.config, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": media.layers[b.compression], "digest": b.digest, "size": b.size}
            for b in built
        ],
    }
    if spec.annotations:
        manifest["annotations"] = dict(spec.annotations)
    digest, size = put_blob(layout, canonical_json(manifest))
    return BuiltImage(
        manifest_digest=digest,
        config_digest=config_digest,
        layers=tuple(b.digest for b in built),
        diff_ids=tuple(b.diff_id for b in built),
        manifest_size=size,
        media_type=media.manifest,
        layer_sizes=tuple(b.size for b in built),
        config_size=config_size,
        platform=spec.platform,
    )


def build_image(
    layout: Path, name: str, spec: ImageSpec, media: MediaTypes = OCI_MEDIA
) -> BuiltImage:
    """:func:`write_manifest`, then tag the manifest ``name`` in ``index.json`` (replacing an
    older entry of that name). Same spec, same digests."""
    image = write_manifest(layout, spec, media)
    tag(layout, name, image.descriptor())
    return image


def save_oci_archive(layout: Path, dest: Path) -> None:
    """Write ``layout`` as an ``oci-archive`` (a tar of the layout: ``blobs/`` in sorted order,
    ``index.json``, ``oci-layout``; owners 0, fixed mtime) at ``dest``, temp + fsync + rename.
    Files whose names start with a dot are left out."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                names = ["blobs", *_files(layout / "blobs", "blobs"), "index.json", "oci-layout"]
                for name in names:
                    path = layout / name
                    if path.is_dir():
                        tar.addfile(header(name, tarfile.DIRTYPE, 0o755))
                        continue
                    info = header(name, tarfile.REGTYPE, 0o644)
                    with open(path, "rb") as src:
                        info.size = os.fstat(src.fileno()).st_size
                        tar.addfile(info, src)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def _files(root: Path, prefix: str) -> list[str]:
    names: list[str] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        names.append(f"{prefix}/{child.name}")
        if child.is_dir():
            names += _files(child, f"{prefix}/{child.name}")
    return names
