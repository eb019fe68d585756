"""Offline, deterministic OCI image layouts from a declarative description.

Everything is written by this module (``tarfile`` + ``hashlib`` + ``json``), so every byte is
under the test's control: the same :class:`ImageSpec` always gives byte-identical blobs and the
same digests (fixed mtimes, numeric owners with empty user/group names, entries in the order
given, pax format without process ids, gzip header mtime 0 and no file name, single-threaded
zstd).

Contract::

    build_image(layout, tag, spec) -> BuiltImage        # one manifest, tagged in index.json
    build_index(layout, tag, specs) -> BuiltImage       # an OCI image index over several
    busybox_layer(extra=(), compression="gzip") -> Layer
    synthetic_layer(seed, n_small, small_size, n_large, large_size, compression) -> Layer
    synthetic_spec(n_layers=5, ...) -> ImageSpec        # ~250 MB benchmark image
    busybox_spec(cmd=("sleep", "3600"), extra=(), **ImageSpec fields) -> ImageSpec
    random_content(seed, size, compressible=False) -> Stream
    save_oci_archive(layout, path)                      # tar of a layout (oci-archive:)
    save_docker_archive(spec, path, repo_tag)           # `docker save` format tarball

Paths in entries may be written ``"/bin/sh"``, ``"bin/sh"`` or ``"./bin/sh"``; they are stored as
``bin/sh`` (directories as ``bin/``).  :class:`Raw` entries are written verbatim.

File contents may be ``bytes`` or a :class:`Stream` (a size plus a function returning an
iterable of chunks), so large layers are generated and hashed while being written and memory
stays flat: layer blobs are streamed to a temporary file in ``blobs/sha256`` and renamed to
their digest.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from bootstrap.image.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Platform,
)

DEFAULT_MTIME = 1700000000
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CREATED = "2023-11-14T22:13:20Z"  # == DEFAULT_MTIME
BUSYBOX = Path("/bin/busybox")  # from busybox-static
BUSYBOX_APPLETS = (
    "sh", "ash", "sleep", "echo", "cat", "ls", "true", "false", "env", "id", "kill", "ps",
    "mkdir", "rm", "cp", "mv", "ln", "touch", "chmod", "chown", "stat", "test", "[", "printf",
    "grep", "sed", "awk", "head", "tail", "wc", "pwd", "hostname", "uname", "date", "mount",
    "umount", "readlink", "realpath", "sha256sum", "md5sum", "find", "xargs", "tar", "gzip",
    "nc", "wget", "ip", "ifconfig", "ping", "seq", "yes", "timeout", "nohup", "dd", "df", "du",
    "tee", "sort", "uniq", "tr", "cut", "basename", "dirname", "which", "whoami", "sync",
    "mkfifo", "mknod", "getty", "init", "vi", "less", "more", "free", "top", "pidof", "pgrep",
    "pkill", "netstat", "nslookup", "usleep", "watch", "expr", "base64", "od", "hexdump",
)  # fmt: skip
_COMPRESSION_MEDIA = {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER}
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # uncompressed Docker layer
_DOCKER_LAYER_MEDIA = {"gzip": DOCKER_LAYER_GZIP, "none": DOCKER_LAYER}


# ---------------------------------------------------------------------------------------------
# entries


@dataclass(frozen=True)
class Stream:
    """Lazily generated file content: exactly ``size`` bytes yielded by ``chunks()``.
    ``chunks`` must be repeatable (each call starts afresh) so that rebuilding is deterministic.
    """

    size: int
    chunks: Callable[[], Iterable[bytes]]


@dataclass(frozen=True)
class File:
    """A regular file. ``xattrs`` go into pax ``SCHILY.xattr.NAME`` records; values may be
    ``str`` or raw ``bytes`` (e.g. ``security.capability``)."""

    path: str
    content: bytes | Stream = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, str | bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, str | bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Hardlink:
    """A hard link to ``target``: the path of an earlier entry in the same layer."""

    path: str
    target: str


@dataclass(frozen=True)
class Whiteout:
    """Deletes ``path`` from lower layers: written as ``DIR/.wh.NAME``."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides everything below directory ``path`` from lower layers: ``path/.wh..wh..opq``."""

    path: str


@dataclass(frozen=True)
class Fifo:
    path: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Device:
    """A character (``kind="c"``) or block (``kind="b"``) device node."""

    path: str
    kind: str
    major: int
    minor: int
    mode: int = 0o666
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Raw:
    """A verbatim tar entry (hostile names, links out of the tree, ...). ``info`` is copied; for
    a regular file whose ``info.size`` is 0, the size is taken from ``data``."""

    info: tarfile.TarInfo
    data: bytes = b""


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Fifo | Device | Raw


@dataclass(frozen=True)
class Layer:
    """One layer. ``compression``: "gzip" | "zstd" | "none". With ``auto_dirs`` (the default),
    parent directories not listed are added (root-owned, 0755, default mtime) right before the
    first entry below them; entries are otherwise written exactly in the order given.
    ``level``: compression level (gzip default 6, zstd default 3)."""

    entries: Sequence[Entry]
    compression: str = "gzip"
    auto_dirs: bool = True
    level: int | None = None


@dataclass(frozen=True)
class ImageSpec:
    layers: Sequence[Layer]
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = (DEFAULT_PATH_ENV,)
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    os: str = "linux"
    architecture: str = field(default_factory=lambda: Platform.host().architecture)
    variant: str = ""
    stop_signal: str = ""
    exposed_ports: Sequence[str] = ()
    volumes: Sequence[str] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)  # manifest annotations

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


@dataclass(frozen=True)
class BuiltLayer:
    digest: str  # of the blob as stored (compressed)
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str


@dataclass(frozen=True)
class BuiltImage:
    """What :func:`build_image` / :func:`build_index` wrote. For an index, ``manifest_digest``,
    ``manifest_size`` and ``media_type`` describe the index, ``config_digest`` is "" and
    ``children`` holds the per-platform images in order."""

    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]
    diff_ids: tuple[str, ...]
    manifest_size: int
    media_type: str = OCI_MANIFEST
    layer_sizes: tuple[int, ...] = ()
    config_size: int = 0
    platform: Platform | None = None
    children: tuple[BuiltImage, ...] = ()

    @property
    def digest(self) -> str:
        return self.manifest_digest


# ---------------------------------------------------------------------------------------------
# layout helpers


def _canon(path: str) -> str:
    p = path
    while p.startswith("./"):
        p = p[2:]
    p = p.lstrip("/")
    while p.endswith("/"):
        p = p[:-1]
    return p


def init_layout(layout: Path) -> None:
    """Create an empty OCI layout at ``layout`` unless one is there already."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    if not (layout / "oci-layout").exists():
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if not (layout / "index.json").exists():
        _write_index(layout, [])


def _write_index(layout: Path, manifests: list[dict[str, Any]]) -> None:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    tmp = layout / "index.json.tmp"
    tmp.write_bytes(json.dumps(doc, indent=2).encode() + b"\n")
    os.replace(tmp, layout / "index.json")


def _tag(layout: Path, tag: str, descriptor: dict[str, Any]) -> None:
    doc = json.loads((layout / "index.json").read_bytes())
    manifests = [
        m
        for m in doc.get("manifests", [])
        if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) != tag
    ]
    desc = dict(descriptor)
    desc["annotations"] = {REF_NAME_ANNOTATION: tag}
    manifests.append(desc)
    _write_index(layout, manifests)


def canonical_json(doc: Any) -> bytes:
    """The JSON encoding used for configs, manifests and indexes: sorted keys, compact."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    """Store ``data`` as a blob; return (digest, size)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest[7:]
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest, len(data)


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


# ---------------------------------------------------------------------------------------------
# tar writing


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: IO[bytes] | None) -> None:
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.hash.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _StreamReader(io.RawIOBase):
    """File-like reader over a :class:`Stream`, for ``TarFile.addfile``."""

    def __init__(self, stream: Stream) -> None:
        self._it: Iterator[bytes] = iter(stream.chunks())
        self._chunk = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts: list[bytes] = []
        want = size
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


def _xattr_pax(xattrs: Mapping[str, str | bytes]) -> dict[str, str]:
    pax: dict[str, str] = {}
    for name, value in xattrs.items():
        if isinstance(value, bytes):
            # tarfile writes surrogate-escaped strings back as the original bytes (hdrcharset)
            pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        else:
            pax["SCHILY.xattr." + name] = value
    return pax


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.uname = ""
    ti.gname = ""
    ti.mtime = DEFAULT_MTIME
    return ti


def _entry_path(entry: Entry) -> str | None:
    if isinstance(entry, Raw):
        return None
    if isinstance(entry, Whiteout):
        parent, _, base = _canon(entry.path).rpartition("/")
        return f"{parent}/.wh.{base}" if parent else f".wh.{base}"
    if isinstance(entry, Opaque):
        return f"{_canon(entry.path)}/.wh..wh..opq"
    return _canon(entry.path)


def _write_entry(tar: tarfile.TarFile, entry: Entry) -> None:
    if isinstance(entry, Raw):
        ti = copy.copy(entry.info)
        if ti.isreg() and ti.size == 0 and entry.data:
            ti.size = len(entry.data)
        tar.addfile(ti, io.BytesIO(entry.data) if ti.isreg() else None)
        return
    name = _entry_path(entry)
    assert name is not None
    if isinstance(entry, File):
        ti = _info(name, tarfile.REGTYPE, entry.mode, entry.uid, entry.gid)
        ti.mtime = entry.mtime
        if entry.xattrs:
            ti.pax_headers = _xattr_pax(entry.xattrs)
        if isinstance(entry.content, Stream):
            ti.size = entry.content.size
            tar.addfile(ti, _StreamReader(entry.content))
        else:
            ti.size = len(entry.content)
            tar.addfile(ti, io.BytesIO(entry.content))
    elif isinstance(entry, Dir):
        ti = _info(name, tarfile.DIRTYPE, entry.mode, entry.uid, entry.gid)
        ti.mtime = entry.mtime
        if entry.xattrs:
            ti.pax_headers = _xattr_pax(entry.xattrs)
        tar.addfile(ti)
    elif isinstance(entry, Symlink):
        ti = _info(name, tarfile.SYMTYPE, 0o777, entry.uid, entry.gid)
        ti.linkname = entry.target
        tar.addfile(ti)
    elif isinstance(entry, Hardlink):
        ti = _info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = _canon(entry.target)
        tar.addfile(ti)
    elif isinstance(entry, (Whiteout, Opaque)):
        tar.addfile(_info(name, tarfile.REGTYPE, 0o644))
    elif isinstance(entry, Fifo):
        tar.addfile(_info(name, tarfile.FIFOTYPE, entry.mode, entry.uid, entry.gid))
    elif isinstance(entry, Device):
        if entry.kind not in ("c", "b"):
            raise ValueError(f"Device {entry.path}: kind must be 'c' or 'b'")
        kind = tarfile.CHRTYPE if entry.kind == "c" else tarfile.BLKTYPE
        ti = _info(name, kind, entry.mode, entry.uid, entry.gid)
        ti.devmajor = entry.major
        ti.devminor = entry.minor
        tar.addfile(ti)
    else:  # pragma: no cover
        raise TypeError(f"not a layer entry: {entry!r}")


def _with_auto_dirs(entries: Sequence[Entry]) -> list[Entry]:
    seen: set[str] = set()
    out: list[Entry] = []
    for e in entries:
        name = _entry_path(e)
        if name is not None:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                parent = "/".join(parts[:i])
                if parent not in seen:
                    seen.add(parent)
                    out.append(Dir(parent))
            if isinstance(e, Dir):
                seen.add(name)
        out.append(e)
    return out


def write_layer_tar(layer: Layer, out: IO[bytes]) -> None:
    """Write the uncompressed tar of ``layer`` to ``out``."""
    entries = _with_auto_dirs(layer.entries) if layer.auto_dirs else list(layer.entries)
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", bufsize=1 << 16
    ) as tar:
        for e in entries:
            _write_entry(tar, e)


def write_layer(layout: Path, layer: Layer) -> BuiltLayer:
    """Write ``layer`` as a blob of ``layout`` (streamed to a temp file, renamed to its
    digest); return its digests and size."""
    if layer.compression not in _COMPRESSION_MEDIA:
        raise ValueError(f"compression {layer.compression!r}: expected gzip, zstd or none")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, tmpname = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as raw:
            outer = _Hashing(raw)
            if layer.compression == "gzip":
                level = 6 if layer.level is None else layer.level
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=outer, compresslevel=level, mtime=0
                ) as gz:
                    inner = _Hashing(gz)  # type: ignore[arg-type]
                    write_layer_tar(layer, inner)  # type: ignore[arg-type]
            elif layer.compression == "zstd":
                level = 3 if layer.level is None else layer.level
                cctx = zstandard.ZstdCompressor(level=level, threads=0)
                zw = cctx.stream_writer(outer, closefd=False)  # type: ignore[arg-type]
                inner = _Hashing(zw)
                write_layer_tar(layer, inner)  # type: ignore[arg-type]
                zw.flush(zstandard.FLUSH_FRAME)
                zw.close()  # type: ignore[no-untyped-call]
            else:
                inner = outer
                write_layer_tar(layer, inner)  # type: ignore[arg-type]
        digest = outer.digest()
        os.replace(tmpname, blobs / digest[7:])
    except BaseException:
        Path(tmpname).unlink(missing_ok=True)
        raise
    return BuiltLayer(digest, inner.digest(), outer.size, _COMPRESSION_MEDIA[layer.compression])


# ---------------------------------------------------------------------------------------------
# images


def _config_doc(spec: ImageSpec, diff_ids: Sequence[str]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if spec.env:
        cfg["Env"] = list(spec.env)
    if spec.entrypoint:
        cfg["Entrypoint"] = list(spec.entrypoint)
    if spec.cmd:
        cfg["Cmd"] = list(spec.cmd)
    if spec.working_dir:
        cfg["WorkingDir"] = spec.working_dir
    if spec.user:
        cfg["User"] = spec.user
    if spec.labels:
        cfg["Labels"] = dict(spec.labels)
    if spec.stop_signal:
        cfg["StopSignal"] = spec.stop_signal
    if spec.exposed_ports:
        cfg["ExposedPorts"] = {p: {} for p in spec.exposed_ports}
    if spec.volumes:
        cfg["Volumes"] = {v: {} for v in spec.volumes}
    doc: dict[str, Any] = {
        "created": CREATED,
        "architecture": spec.architecture,
        "os": spec.os,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": CREATED, "created_by": f"imagebuilder layer {i}"}
            for i in range(len(diff_ids))
        ],
    }
    if spec.variant:
        doc["variant"] = spec.variant
    return doc


def _build_manifest(
    layout: Path, spec: ImageSpec, docker: bool = False
) -> tuple[BuiltImage, dict[str, Any]]:
    init_layout(layout)
    if docker:
        bad = [la.compression for la in spec.layers if la.compression not in _DOCKER_LAYER_MEDIA]
        if bad:
            raise ValueError(f"Docker v2s2 images have no {bad[0]} layers")
    built = [write_layer(layout, layer) for layer in spec.layers]
    config = canonical_json(_config_doc(spec, [b.diff_id for b in built]))
    config_digest, config_size = put_blob(layout, config)
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    layer_types = [
        _DOCKER_LAYER_MEDIA[la.compression] if docker else b.media_type
        for la, b in zip(spec.layers, built, strict=True)
    ]
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {
            "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {"mediaType": t, "digest": b.digest, "size": b.size}
            for t, b in zip(layer_types, built, strict=True)
        ],
    }
    if spec.annotations and not docker:
        manifest["annotations"] = dict(spec.annotations)
    mdigest, msize = put_blob(layout, canonical_json(manifest))
    image = BuiltImage(
        manifest_digest=mdigest,
        config_digest=config_digest,
        layers=tuple(b.digest for b in built),
        diff_ids=tuple(b.diff_id for b in built),
        manifest_size=msize,
        media_type=manifest_type,
        layer_sizes=tuple(b.size for b in built),
        config_size=config_size,
        platform=spec.platform,
    )
    desc = {"mediaType": manifest_type, "digest": mdigest, "size": msize}
    return image, desc


def build_image(layout: Path, tag: str, spec: ImageSpec, *, docker: bool = False) -> BuiltImage:
    """Write ``spec`` into the OCI layout ``layout`` (created if needed) and tag it ``tag`` in
    ``index.json`` (replacing an older entry of that tag). Deterministic: same spec, same
    digests. With ``docker``, the manifest, config and layers carry Docker v2 schema 2 media
    types instead (gzip or uncompressed layers only; ``ValueError`` otherwise); skopeo pushes
    such a manifest unchanged."""
    image, desc = _build_manifest(layout, spec, docker)
    _tag(layout, tag, desc)
    return image


def build_index(
    layout: Path, tag: str, specs: Sequence[ImageSpec], *, docker: bool = False
) -> BuiltImage:
    """Write every spec as a manifest, then an OCI image index over them (with each spec's
    platform), and tag the index ``tag``. The returned image's ``children`` are the manifests.
    With ``docker``, a Docker manifest list over Docker v2s2 manifests."""
    children: list[BuiltImage] = []
    entries: list[dict[str, Any]] = []
    for spec in specs:
        image, desc = _build_manifest(layout, spec, docker)
        children.append(image)
        plat: dict[str, str] = {"architecture": spec.architecture, "os": spec.os}
        if spec.variant:
            plat["variant"] = spec.variant
        entries.append({**desc, "platform": plat})
    index_type = DOCKER_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": index_type, "manifests": entries}
    digest, size = put_blob(layout, canonical_json(index))
    _tag(layout, tag, {"mediaType": index_type, "digest": digest, "size": size})
    return BuiltImage(
        manifest_digest=digest,
        config_digest="",
        layers=(),
        diff_ids=(),
        manifest_size=size,
        media_type=index_type,
        children=tuple(children),
    )


# ---------------------------------------------------------------------------------------------
# ready-made content


def busybox_layer(extra: Sequence[Entry] = (), compression: str = "gzip") -> Layer:
    """A runnable base layer: static ``/bin/busybox`` with applet symlinks (``sh``, ``sleep``,
    ``echo``, ... see BUSYBOX_APPLETS), ``/etc/passwd`` and ``/etc/group`` (root, nobody),
    ``/etc/hosts``, empty ``/etc/resolv.conf``, and ``/tmp`` (1777), ``/root``, ``/proc``,
    ``/sys``, ``/dev``, ``/run``, ``/var``; then ``extra``."""
    entries: list[Entry] = [
        Dir("bin"),
        File("bin/busybox", BUSYBOX.read_bytes(), mode=0o755),
    ]
    entries += [Symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    entries += [
        Dir("dev"),
        Dir("etc"),
        File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
        File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        File("etc/hosts", b"127.0.0.1 localhost\n"),
        File("etc/resolv.conf", b""),
        Dir("proc", mode=0o555),
        Dir("root", mode=0o700),
        Dir("run"),
        Dir("sys", mode=0o555),
        Dir("tmp", mode=0o1777),
        Dir("var"),
        Dir("var/tmp", mode=0o1777),
    ]  # fmt: skip
    entries += list(extra)
    return Layer(entries, compression=compression)


def busybox_spec(
    cmd: Sequence[str] = ("sleep", "3600"), extra: Sequence[Layer] = (), **kw: Any
) -> ImageSpec:
    """An ImageSpec of :func:`busybox_layer` plus ``extra`` layers, running ``cmd``."""
    return ImageSpec(layers=[busybox_layer(), *extra], cmd=tuple(cmd), **kw)


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
        entries.append(
            File(
                f"s{seed}/large/b{j:03d}",
                random_content(seed * 7919 + j + 1_000_000_000, large_size),
            )
        )
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
    with seeds 1..n. The defaults give about 250 MB of tar, 20k files, ~215 MB gzipped."""
    layers = [busybox_layer(compression=compression)] if base else []
    layers += [
        synthetic_layer(seed, n_small, small_size, n_large, large_size, compression, level)
        for seed in range(1, n_layers + 1)
    ]
    return ImageSpec(layers=layers, cmd=("sleep", "3600"))


# ---------------------------------------------------------------------------------------------
# archives


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = _info(name, tarfile.REGTYPE, 0o644)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    ti = _info(name, tarfile.REGTYPE, 0o644)
    ti.size = path.stat().st_size
    with path.open("rb") as f:
        tar.addfile(ti, f)


def save_oci_archive(layout: Path, path: Path) -> None:
    """Write ``layout`` as an uncompressed tar (the ``oci-archive:`` format): ``oci-layout``,
    ``index.json``, ``blobs/sha256/*`` in sorted order, deterministic headers."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs", "blobs/sha256"):
            tar.addfile(_info(name, tarfile.DIRTYPE, 0o755))
        for blob in sorted((layout / "blobs" / "sha256").iterdir()):
            if blob.name.startswith(".") or blob.name.endswith(".tmp"):
                continue
            _add_file(tar, f"blobs/sha256/{blob.name}", blob)
        _add_file(tar, "index.json", layout / "index.json")
        _add_file(tar, "oci-layout", layout / "oci-layout")


def save_docker_archive(spec: ImageSpec, path: Path, repo_tag: str | None) -> BuiltImage:
    """Write ``spec`` as a ``docker save`` tarball: ``<confighex>.json``, ``<n>/layer.tar``
    (uncompressed, whatever ``Layer.compression`` says), ``manifest.json`` and ``repositories``
    (when ``repo_tag`` is given, e.g. ``"example.com/app:1"``). Returns the image as it would
    be built into a layout with uncompressed layers (``layers`` == ``diff_ids``)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".docker-archive-") as tmpdir:
        tmp = Path(tmpdir)
        plain = ImageSpec(
            **{
                **{f: getattr(spec, f) for f in spec.__dataclass_fields__},
                "layers": [
                    Layer(la.entries, compression="none", auto_dirs=la.auto_dirs)
                    for la in spec.layers
                ],
            }
        )
        image = build_image(tmp, "x", plain)
        config = blob_path(tmp, image.config_digest).read_bytes()
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
            _add_bytes(tar, cfg_name, config)
            for i, digest in enumerate(image.layers):
                tar.addfile(_info(str(i), tarfile.DIRTYPE, 0o755))
                _add_bytes(tar, f"{i}/VERSION", b"1.0")
                _add_file(tar, layer_names[i], blob_path(tmp, digest))
            _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
            if repo_tag and image.diff_ids:
                repo, _, tag = repo_tag.rpartition(":")
                if "/" in tag or not repo:
                    repo, tag = repo_tag, "latest"
                _add_bytes(
                    tar, "repositories", json.dumps({repo: {tag: image.diff_ids[-1][7:]}}).encode()
                )
    return image
