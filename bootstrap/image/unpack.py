"""Layers into root filesystems: streaming, hostile-safe extraction, a per-layer cache, checkout.

Three levels:

- :func:`apply_layer` applies one layer (a tar stream, ``gzip``/``zstd``/``none``) onto an existing
  tree in one streaming pass: whiteouts (``.wh.NAME``) and opaque directories (``.wh..wh..opq``)
  remove what lower layers put there; hardlinks, symlinks, FIFOs, owners (when
  ``same_owner``), modes incl. setuid/setgid/sticky (set after the owner: chown clears setuid),
  xattrs (pax ``SCHILY.xattr.*``), mtimes (directories last), device nodes only as root and when
  asked.
- the layer cache (:func:`ensure_layer`): each layer extracted once, keyed by its diff_id, into
  ``store.layer_cache_dir(diff_id)`` (``rootfs/`` plus ``layer.json`` recording whiteouts,
  opaque directories, implicit parent directories, hardlinks to lower layers and device nodes, which
  only mean something when layers are composed). The diff_id (sha256 of the uncompressed tar) is
  verified while extracting; a mismatch caches nothing.
- :func:`checkout`: all layers cached (missing ones extracted in parallel threads), then composed
  into ``DEST.tmp-*`` beside DEST with files of its own (reflinks where supported, else copies;
  hardlinks into the cache only with ``hardlink``) and renamed to DEST.
- :func:`image_tree`: an image composed once in the store from hardlinks into the cache, the
  read-only lower dir of deployments' overlay mounts.

Hostile input: no entry, link target or whiteout may name anything outside the tree; a parent path
component is never followed through a symlink (each is checked with ``lstat`` before use, and the
tree being written is private to this process until it is renamed in). Every refusal is an
:class:`~bootstrap.errors.IntegrityError` (exit 4) naming the layer and the entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from bootstrap.errors import BootstrapError, BusyError, IntegrityError, UsageError
from bootstrap.fsutil import remove_tree, write_atomic
from bootstrap.image.model import LAYER_COMPRESSION, Descriptor, Image
from bootstrap.locks import flocked

if TYPE_CHECKING:
    from bootstrap.image.pull import ImageVerifier
    from bootstrap.image.store import Store
    from bootstrap.settings import Settings

log = logging.getLogger(__name__)

_BLOCK = 512
_CHUNK = 1 << 20
_PATH_MAX = 4095
_NAME_MAX = 255
_MAX_DEPTH = 256  # deeper paths exist in no real image; bounds the recursion of tree walks
_MAX_META = 1 << 20  # pax / GNU long-name records larger than this are refused
_WH = ".wh."
_OPQ = ".wh..wh..opq"
_META_FILE = "layer.json"
_META_VERSION = 2
_FICLONE = 0x40049409  # ioctl: share the extents of another file (btrfs, XFS, ...)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
_HOSTILE_HINT = "the image is damaged or hostile; nothing was written outside the rootfs"


@dataclass(frozen=True)
class UnpackOptions:
    """How entries are materialized.

    ``devices``: create character/block device nodes (only honoured as root; otherwise they are
    skipped with a debug log). ``same_owner``: apply the entries' uid/gid (default: when running
    as root). ``xattrs``: apply extended attributes (unsupported namespaces are skipped with a
    warning).
    """

    devices: bool = False
    same_owner: bool = field(default_factory=lambda: os.geteuid() == 0)
    xattrs: bool = True
    expansion: ExpansionLimit = field(default_factory=lambda: ExpansionLimit.from_env())


MAX_EXPANSION_ENV = "BOOTSTRAP_MAX_LAYER_EXPANSION"
EXPANSION_FLOOR_ENV = "BOOTSTRAP_LAYER_EXPANSION_FLOOR"


@dataclass(frozen=True)
class ExpansionLimit:
    """The decompression-bomb bound: a compressed layer may expand to at most ``ratio`` times the
    compressed bytes read so far, once it has produced more than ``floor`` bytes (small layers of
    zeros legitimately compress far better). Real layers expand 2-10x; gzip's own maximum is
    ~1032x. ``ratio`` 0 disables the bound. Uncompressed layers are not bounded (nothing to
    expand; the store's digest and size checks bound them)."""

    ratio: int = 200
    floor: int = 64 << 20

    @classmethod
    def from_env(cls) -> ExpansionLimit:
        """``$BOOTSTRAP_MAX_LAYER_EXPANSION`` (ratio) and ``$BOOTSTRAP_LAYER_EXPANSION_FLOOR``
        (bytes) override the defaults; a value that is not a non-negative integer is a
        UsageError (exit 2)."""
        default = cls()
        return cls(
            _env_int(MAX_EXPANSION_ENV, default.ratio), _env_int(EXPANSION_FLOOR_ENV, default.floor)
        )


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit():
        raise UsageError(f"${name}={text[:40]!r} is not a non-negative integer", f"unset {name}")
    return int(text)


# ---- decompressed, hashed, buffered source -----------------------------------------------------


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _decompressor(stream: BinaryIO, compression: str, layer_name: str) -> _Reader:
    if compression == "none":
        return stream
    if compression == "gzip":
        try:
            from isal import igzip

            reader: _Reader = igzip.IGzipFile(fileobj=stream, mode="rb")  # type: ignore[no-untyped-call]
            return reader
        except ImportError:  # pragma: no cover - isal is a dependency
            import gzip

            return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "zstd":
        import zstandard

        zreader: _Reader = zstandard.ZstdDecompressor().stream_reader(
            stream, read_across_frames=True
        )
        return zreader
    raise IntegrityError(
        f"layer {layer_name}: unsupported compression {compression!r}",
        "layers must be gzip, zstd or uncompressed tar",
    )


class _Counted:
    """A compressed input stream that counts the bytes the decompressor has taken from it."""

    __slots__ = ("_stream", "count")

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """As ``io.RawIOBase.readinto`` (gzip's buffered reader uses it)."""
        n: int | None = cast(Any, self._stream).readinto(buffer)
        self.count += n or 0
        return n or 0


class _Source:
    """Reads the uncompressed tar stream in big chunks, hashing every byte (the diff_id), and
    refuses a compressed layer that expands beyond its :class:`ExpansionLimit`."""

    __slots__ = (
        "_buf",
        "_compressed",
        "_limit",
        "_mv",
        "_pos",
        "_raw",
        "digest",
        "layer",
        "offset",
        "produced",
    )

    def __init__(
        self, stream: BinaryIO, compression: str, layer: str, limit: ExpansionLimit
    ) -> None:
        """Decompress ``stream`` (``compression``: "gzip", "zstd" or "none"); IntegrityError
        for an unknown compression."""
        self._compressed = _Counted(stream) if compression != "none" and limit.ratio else None
        source: BinaryIO = self._compressed if self._compressed else stream  # type: ignore[assignment]
        self._raw = _decompressor(source, compression, layer)
        self._limit = limit
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._pos = 0
        self.offset = 0
        self.produced = 0
        self.digest = hashlib.sha256()
        self.layer = layer

    def _check_expansion(self) -> None:
        assert self._compressed is not None
        taken = self._compressed.count
        if self.produced > self._limit.floor and self.produced > self._limit.ratio * taken:
            raise IntegrityError(
                f"layer {self.layer}: expands more than {self._limit.ratio}x "
                f"({self.produced} bytes from {taken} compressed): refused as a decompression bomb",
                f"if the image is trusted, raise ${MAX_EXPANSION_ENV} (0 disables the bound)",
            )

    def _more(self) -> bool:
        try:
            chunk = self._raw.read(_CHUNK)
        except (AttributeError, TypeError):
            raise  # programming errors, not damaged data
        except Exception as exc:  # zlib (OSError/EOFError/ValueError), zstandard.ZstdError, isal
            raise IntegrityError(
                f"layer {self.layer}: cannot decompress: {exc}",
                "the layer blob is damaged; remove the image and pull it again",
            ) from exc
        if not chunk:
            return False
        self.produced += len(chunk)
        if self._compressed is not None:
            self._check_expansion()
        self.digest.update(chunk)
        rest = self._buf[self._pos :]
        self._buf = rest + chunk if rest else chunk
        self._mv = memoryview(self._buf)
        self._pos = 0
        return True

    def _truncated(self) -> IntegrityError:
        return IntegrityError(
            f"layer {self.layer}: tar stream truncated at offset {self.offset}",
            "the layer blob is damaged; remove the image and pull it again",
        )

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; b"" at a clean end of stream when n bytes were wanted."""
        while len(self._buf) - self._pos < n:
            if not self._more():
                if len(self._buf) == self._pos:
                    return b""
                raise self._truncated()
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return data

    def copy_to(self, fd: int, n: int, hasher: Any = None) -> None:
        """Write the next ``n`` bytes of the stream to ``fd`` (feeding them to ``hasher``, a
        hashlib object, when given)."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._more():
                    raise self._truncated()
                continue
            m = min(n, avail)
            view = self._mv[self._pos : self._pos + m]
            if hasher is not None:
                hasher.update(view)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._pos += m
            self.offset += m
            n -= m

    def skip(self, n: int) -> None:
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._more():
                    raise self._truncated()
                continue
            m = min(n, avail)
            self._pos += m
            self.offset += m
            n -= m

    def drain(self) -> None:
        """Consume (and hash) the rest of the stream: the padding after the end-of-archive."""
        self._buf = b""
        self._pos = 0
        while self._more():
            self._buf = b""
            self._pos = 0


# ---- tar headers -------------------------------------------------------------------------------


class _Entry:
    """One tar member after pax / GNU long-name records are folded in. ``kind`` is the ustar type
    flag: '0' file, '1' hardlink, '2' symlink, '3' char dev, '4' block dev, '5' dir, '6' fifo."""

    __slots__ = (
        "gid",
        "kind",
        "linkname",
        "major",
        "minor",
        "mode",
        "mtime_ns",
        "name",
        "raw_name",
        "size",
        "uid",
        "xattrs",
    )

    def __init__(self) -> None:
        self.xattrs: dict[str, bytes] = {}
        self.name = ""
        self.raw_name = ""
        self.linkname = ""
        self.kind = "0"
        self.size = 0
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.mtime_ns = 0
        self.major = 0
        self.minor = 0


def _num(field_: bytes) -> int:
    if field_ and field_[0] & 0x80:  # base-256 (GNU) for big values
        value = field_[0] & 0x3F
        negative = field_[0] & 0x40
        for b in field_[1:]:
            value = (value << 8) | b
        return -value if negative else value
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _cstr(field_: bytes) -> str:
    return os.fsdecode(field_.split(b"\0", 1)[0])


def _pax_time(value: str) -> int:
    sec, _, frac = value.partition(".")
    ns = int(sec) * 1_000_000_000
    if frac:
        part = int((frac + "000000000")[:9])
        ns += -part if sec.startswith("-") else part
    return ns


def _parse_pax(data: bytes, layer: str) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise IntegrityError(f"layer {layer}: malformed pax header", _HOSTILE_HINT)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise IntegrityError(f"layer {layer}: malformed pax header", _HOSTILE_HINT) from None
        record = data[sp + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise IntegrityError(f"layer {layer}: malformed pax header record", _HOSTILE_HINT)
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise IntegrityError(f"layer {layer}: malformed pax header record", _HOSTILE_HINT)
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


_KINDS = {"0": "0", "\0": "0", "7": "0", "1": "1", "2": "2", "3": "3", "4": "4", "5": "5", "6": "6"}


def _entries(src: _Source) -> Iterator[_Entry]:
    """Parse tar headers from ``src``. After each yielded entry the consumer may read up to
    ``entry.size`` bytes of data; whatever it leaves is skipped here."""
    layer = src.layer
    pax: dict[str, bytes] = {}
    long_name: str | None = None
    long_link: str | None = None
    while True:
        header = src.read(_BLOCK)
        if not header:
            return  # EOF without end-of-archive blocks: accepted, as GNU tar does
        if len(header) < _BLOCK:
            raise src._truncated()
        if header.count(0) == _BLOCK:
            return  # end of archive (the second zero block and padding are drained by caller)
        stored = _num(header[148:156])
        computed = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != computed:
            raise IntegrityError(
                f"layer {layer}: bad tar header checksum at offset {src.offset - _BLOCK}",
                "the layer is not a valid tar stream",
            )
        flag = chr(header[156])
        size = _num(header[124:136])
        if size < 0:
            raise IntegrityError(f"layer {layer}: negative size in tar header", _HOSTILE_HINT)
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if flag in ("x", "g", "L", "K"):
            if size > _MAX_META:
                raise IntegrityError(
                    f"layer {layer}: {size}-byte tar metadata record", _HOSTILE_HINT
                )
            data = src.read(padded)[:size] if padded else b""
            if len(data) < size:
                raise src._truncated()
            if flag == "x":
                pax.update(_parse_pax(data, layer))
            elif flag == "g":
                log.debug("layer %s: pax global header ignored", layer)
            elif flag == "L":
                long_name = os.fsdecode(data.split(b"\0", 1)[0])
            else:
                long_link = os.fsdecode(data.split(b"\0", 1)[0])
            continue
        e = _Entry()
        name = _cstr(header[0:100])
        magic = header[257:263]
        if magic == b"ustar\x00":  # POSIX ustar: prefix field
            prefix = _cstr(header[345:500])
            if prefix:
                name = prefix + "/" + name
        e.linkname = _cstr(header[157:257])
        if long_name is not None:
            name = long_name
        if long_link is not None:
            e.linkname = long_link
        e.mode = _num(header[100:108]) & 0o7777
        e.uid = _num(header[108:116])
        e.gid = _num(header[116:124])
        e.mtime_ns = _num(header[136:148]) * 1_000_000_000
        e.major = _num(header[329:337])
        e.minor = _num(header[337:345])
        if pax:
            for key, value in pax.items():
                if key == "path":
                    name = os.fsdecode(value)
                elif key == "linkpath":
                    e.linkname = os.fsdecode(value)
                elif key == "size":
                    size = int(value)
                    padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
                elif key == "uid":
                    e.uid = int(value)
                elif key == "gid":
                    e.gid = int(value)
                elif key == "mtime":
                    e.mtime_ns = _pax_time(value.decode())
                elif key.startswith("SCHILY.xattr."):
                    e.xattrs[key[len("SCHILY.xattr.") :]] = value
                elif key.startswith("GNU.sparse."):
                    raise IntegrityError(
                        f"layer {layer}: entry {name!r}: sparse files are not supported",
                        "rebuild the layer without --sparse",
                    )
        pax = {}
        long_name = long_link = None
        e.raw_name = name
        e.size = size
        kind = _KINDS.get(flag)
        if kind is None:
            raise IntegrityError(
                f"layer {layer}: entry {name!r}: unsupported tar entry type {flag!r}",
                _HOSTILE_HINT,
            )
        if kind == "0" and name.endswith("/") and flag == "\0":
            kind = "5"  # old-style directory
        e.kind = kind
        start = src.offset
        yield e
        src.skip(padded - (src.offset - start))


# ---- path checks -------------------------------------------------------------------------------


def _clean(name: str, layer: str, what: str = "entry") -> str:
    """Normalize a member name to a relative path ('' for the root); refuse anything that could
    leave the tree."""
    if "\0" in name:
        raise IntegrityError(f"layer {layer}: {what} {name!r}: NUL in name", _HOSTILE_HINT)
    if name.startswith("/"):
        raise IntegrityError(f"layer {layer}: {what} {name!r}: absolute path", _HOSTILE_HINT)
    parts = [p for p in name.split("/") if p and p != "."]
    for p in parts:
        if p == "..":
            raise IntegrityError(
                f"layer {layer}: {what} {name!r}: '..' leaves the rootfs", _HOSTILE_HINT
            )
        if len(p) > _NAME_MAX // 4 and len(os.fsencode(p)) > _NAME_MAX:
            raise IntegrityError(
                f"layer {layer}: {what} {name[:80]!r}...: path component longer than "
                f"{_NAME_MAX} bytes",
                _HOSTILE_HINT,
            )
    if len(parts) > _MAX_DEPTH:
        raise IntegrityError(
            f"layer {layer}: {what} {name[:80]!r}...: nested deeper than {_MAX_DEPTH} directories",
            _HOSTILE_HINT,
        )
    rel = "/".join(parts)
    if len(rel) > _PATH_MAX // 4 and len(os.fsencode(rel)) > _PATH_MAX:
        raise IntegrityError(
            f"layer {layer}: {what} {name[:80]!r}...: path longer than {_PATH_MAX} bytes",
            _HOSTILE_HINT,
        )
    return rel


class _Tree:
    """Safe path operations inside ``root``: parents are checked component by component with
    lstat and never followed through a symlink. Caches directories known to be real."""

    def __init__(self, root: str, layer: str) -> None:
        self.root = root
        self.layer = layer
        self.dirs: set[str] = {""}
        self.implicit: list[str] = []
        self.on_parent: Callable[[str], None] | None = None

    def full(self, rel: str) -> str:
        return self.root + "/" + rel if rel else self.root

    def forget(self, rel: str) -> None:
        """``rel`` was removed or replaced: it and everything below is no longer known."""
        if rel in self.dirs:
            prefix = rel + "/"
            self.dirs = {d for d in self.dirs if d != rel and not d.startswith(prefix)}

    def parent(self, rel: str, entry: str, *, create: bool) -> bool:
        """Make sure every parent of ``rel`` is a real directory (creating missing ones 0755 when
        ``create``). Returns False when a parent is missing and not created. Raises
        IntegrityError when a parent is a symlink or not a directory."""
        head, _, _ = rel.rpartition("/")
        if head in self.dirs:
            if self.on_parent is not None:
                self.on_parent(head)
            return True
        parts = head.split("/")
        cur = ""
        for part in parts:
            cur = cur + "/" + part if cur else part
            if cur in self.dirs:
                continue
            full = self.root + "/" + cur
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                if not create:
                    return False
                os.mkdir(full, 0o755)
                self.implicit.append(cur)
                self.dirs.add(cur)
                continue
            if stat.S_ISDIR(st.st_mode):
                self.dirs.add(cur)
            elif stat.S_ISLNK(st.st_mode):
                raise IntegrityError(
                    f"layer {self.layer}: entry {entry!r}: parent {cur!r} is a symlink "
                    "(refusing to write through it)",
                    _HOSTILE_HINT,
                )
            elif not create:
                return False  # nothing can be below a non-directory: nothing to find there
            else:
                raise IntegrityError(
                    f"layer {self.layer}: entry {entry!r}: parent {cur!r} is not a directory",
                    _HOSTILE_HINT,
                )
        if self.on_parent is not None:
            self.on_parent(head)
        return True

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.full(rel))
        except FileNotFoundError:
            return None

    def remove(self, rel: str, st: os.stat_result | None = None) -> None:
        """Remove ``rel`` (a tree for a directory) if present; parents must be checked."""
        if st is None:
            st = self.lstat(rel)
            if st is None:
                return
        full = self.full(rel)
        if stat.S_ISDIR(st.st_mode):
            remove_tree(full)
            self.forget(rel)
        else:
            os.unlink(full)


# ---- applying entries --------------------------------------------------------------------------


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], layer: str, name: str) -> None:
    follow = not isinstance(target, str)
    for key, value in xattrs.items():
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                log.warning("layer %s: %s: xattr %s not applied: %s", layer, name, key, exc)
            else:
                raise


def _copy_xattrs(src: str, dst: int | str) -> None:
    """Copy all xattrs of path ``src`` (not followed) onto ``dst`` (fd, or path not followed)."""
    try:
        keys = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    follow = not isinstance(dst, str)
    for key in keys:
        try:
            value = os.getxattr(src, key, follow_symlinks=False)
            os.setxattr(dst, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                log.warning("%s: xattr %s not copied: %s", src, key, exc)
            else:
                raise


#: Entry types in a layer record's ``entries``: regular file, directory, symlink, FIFO.
_REC_TYPES = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p"}


@dataclass
class _LayerRecord:
    """What a cached layer holds and what it needs beyond its tree to be composed over lower
    layers. ``entries``: one row per path of the extracted tree (sorted), ``[path, type, mode,
    uid, gid, size, mtime_ns, data]``, ``type`` one of :data:`_REC_TYPES`' values, ``mode`` the
    permission bits, ``data`` the sha256 hex of a regular file's content or a symlink's target
    ('' otherwise); ``uid``/``gid`` are -1 when the layer was extracted without owners."""

    whiteouts: list[str] = field(default_factory=list)
    opaques: list[str] = field(default_factory=list)
    implicit: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    root: bool = False
    entries: list[list[Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": _META_VERSION,
            "whiteouts": self.whiteouts,
            "opaques": self.opaques,
            "implicit": self.implicit,
            "links": [list(x) for x in self.links],
            "devices": self.devices,
            "root": self.root,
            "entries": self.entries,
        }

    @classmethod
    def from_json(cls, doc: Any) -> _LayerRecord:
        if not isinstance(doc, dict) or doc.get("version") != _META_VERSION:
            raise ValueError("unsupported layer cache record")
        entries = doc["entries"]
        if not isinstance(entries, list):
            raise ValueError("entries is not a list")
        return cls(
            whiteouts=[str(x) for x in doc["whiteouts"]],
            opaques=[str(x) for x in doc["opaques"]],
            implicit=[str(x) for x in doc["implicit"]],
            links=[(str(a), str(b)) for a, b in doc["links"]],
            devices=list(doc["devices"]),
            root=bool(doc["root"]),
            entries=entries,
        )


def _file_digest(path: str) -> str:
    """sha256 hex of the regular file at ``path`` (opened without following a symlink)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _record_row(rel: str, st: os.stat_result, owners: bool, data: str) -> list[Any]:
    kind = _REC_TYPES.get(stat.S_IFMT(st.st_mode), "?")
    size = st.st_size if kind in ("f", "l") else 0
    uid, gid = (st.st_uid, st.st_gid) if owners else (-1, -1)
    return [rel, kind, stat.S_IMODE(st.st_mode), uid, gid, size, st.st_mtime_ns, data]


def _record_tree(root: str, owners: bool, digests: dict[str, str]) -> list[list[Any]]:
    """The ``entries`` of the tree under ``root`` (sorted by path): ``digests`` gives the content
    digests computed while extracting; a regular file not in it is hashed now."""
    rows: list[list[Any]] = []

    def walk(full_dir: str, rel_dir: str, depth: int) -> None:
        with os.scandir(full_dir) as it:
            ents = sorted(it, key=lambda e: e.name)
        for ent in ents:
            rel = rel_dir + "/" + ent.name if rel_dir else ent.name
            st = ent.stat(follow_symlinks=False)
            data = ""
            if stat.S_ISREG(st.st_mode):
                data = digests.get(rel) or _file_digest(ent.path)
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(ent.path)
            rows.append(_record_row(rel, st, owners, data))
            if stat.S_ISDIR(st.st_mode) and depth < _MAX_DEPTH:
                walk(ent.path, rel, depth + 1)

    walk(root, "", 0)
    return rows


class _Applier:
    """Applies entries of one layer under ``root``.

    ``record`` (layer-cache mode): whiteouts, opaque dirs and device nodes are recorded, not
    applied, and hardlinks whose target is not in this layer are recorded for composition.
    Otherwise whiteouts remove what is under ``root`` from lower layers.
    """

    def __init__(self, root: str, options: UnpackOptions, layer: str, *, record: bool) -> None:
        self.options = options
        self.layer = layer
        self.record = record
        self.tree = _Tree(root, layer)
        self.created: set[str] = set()  # paths this layer put in place (apply mode)
        self.dir_meta: dict[str, _Entry] = {}
        self.parent_times: dict[str, tuple[int, int]] = {}
        self.rec = _LayerRecord()
        self.digests: dict[str, str] = {}  # record mode: sha256 hex of each regular file
        self.root_entry = False
        self.symlink_opaques: list[tuple[str, _Entry]] = []
        if not record:
            self.tree.on_parent = self._touch_parent
        self.chown = options.same_owner

    def _touch_parent(self, head: str) -> None:
        # a directory this layer does not describe keeps its mtime although entries change in it
        if head in self.dir_meta or head in self.parent_times:
            return
        st = os.lstat(self.tree.full(head))
        self.parent_times[head] = (st.st_atime_ns, st.st_mtime_ns)

    def _err(self, e: _Entry, problem: str) -> IntegrityError:
        return IntegrityError(f"layer {self.layer}: entry {e.raw_name!r}: {problem}", _HOSTILE_HINT)

    def apply(self, e: _Entry, src: _Source) -> None:
        rel = _clean(e.raw_name, self.layer)
        e.name = rel
        base = rel.rpartition("/")[2]
        if base.startswith(_WH):
            self._whiteout(e, rel, base)
            return
        if not rel:
            if e.kind != "5":
                raise self._err(e, "the rootfs itself must be a directory")
            self.dir_meta[""] = e
            self.root_entry = True
            return
        tree = self.tree
        tree.parent(rel, e.raw_name, create=True)
        # in a fresh cache dir only what this layer made can be there: skip the lstat otherwise
        maybe = not self.record or rel in self.created or rel in tree.dirs
        st = tree.lstat(rel) if maybe else None
        kind = e.kind
        if kind == "5":
            if st is not None and not stat.S_ISDIR(st.st_mode):
                tree.remove(rel, st)
                st = None
            if st is None:
                os.mkdir(tree.full(rel), 0o700)
            tree.dirs.add(rel)
            self.dir_meta[rel] = e
            self.created.add(rel)
            return
        if kind == "1":
            self._hardlink(e, rel, st)
            return
        if st is not None:
            tree.remove(rel, st)
        full = tree.full(rel)
        if kind == "0":
            fd = os.open(
                full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                if self.record:
                    h = hashlib.sha256()
                    if e.size:
                        src.copy_to(fd, e.size, h)
                    self.digests[rel] = h.hexdigest()
                elif e.size:
                    src.copy_to(fd, e.size)
                if self.chown:
                    os.fchown(fd, e.uid, e.gid)
                os.fchmod(fd, e.mode)
                if e.xattrs and self.options.xattrs:
                    _set_xattrs(fd, e.xattrs, self.layer, rel)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            finally:
                os.close(fd)
        elif kind == "2":
            if "\0" in e.linkname or len(os.fsencode(e.linkname)) > _PATH_MAX:
                raise self._err(e, "invalid symlink target")
            os.symlink(e.linkname, full)
            if self.chown:
                os.chown(full, e.uid, e.gid, follow_symlinks=False)
            if e.xattrs and self.options.xattrs:
                _set_xattrs(full, e.xattrs, self.layer, rel)
            os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        elif kind == "6":
            os.mkfifo(full, 0o600)
            self._meta_path(full, e)
        else:  # devices
            if self.record:
                self.rec.devices.append(
                    {
                        "path": rel,
                        "kind": kind,
                        "major": e.major,
                        "minor": e.minor,
                        "mode": e.mode,
                        "uid": e.uid,
                        "gid": e.gid,
                        "mtime_ns": e.mtime_ns,
                    }
                )
            elif self.options.devices and os.geteuid() == 0:
                kbit = stat.S_IFCHR if kind == "3" else stat.S_IFBLK
                os.mknod(full, kbit | 0o600, os.makedev(e.major, e.minor))
                self._meta_path(full, e)
            else:
                log.debug("layer %s: device node %s skipped", self.layer, rel)
                return
        self.created.add(rel)

    def _meta_path(self, full: str, e: _Entry) -> None:
        """Owner, mode, xattrs, mtime of a non-regular, non-symlink node, through an O_PATH-free
        route: these nodes cannot be opened safely (a FIFO blocks), so the checked path is used."""
        if self.chown:
            os.chown(full, e.uid, e.gid, follow_symlinks=False)
        os.chmod(full, e.mode)  # parents checked; the node itself is not a symlink (just made)
        if e.xattrs and self.options.xattrs:
            _set_xattrs(full, e.xattrs, self.layer, e.name)
        os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def _hardlink(self, e: _Entry, rel: str, st: os.stat_result | None) -> None:
        target = _clean(e.linkname, self.layer, f"hardlink {e.raw_name!r} ->")
        if not target:
            raise self._err(e, "hardlink to the rootfs directory")
        tree = self.tree
        if target == rel:
            if st is not None and not stat.S_ISDIR(st.st_mode):
                return  # a link to itself: the file is already there
            raise self._err(e, "hardlink to itself")
        if target.startswith(rel + "/"):
            raise self._err(e, f"hardlink target {e.linkname!r} is inside the entry it replaces")
        present = tree.parent(target, e.raw_name, create=False)
        tst = tree.lstat(target) if present else None
        if tst is None:
            if self.record:
                if st is not None:
                    tree.remove(rel, st)
                self.rec.links.append((rel, target))
                return
            raise self._err(e, f"hardlink target {e.linkname!r} does not exist")
        if stat.S_ISDIR(tst.st_mode):
            raise self._err(e, f"hardlink target {e.linkname!r} is a directory")
        if st is not None:
            if os.path.samestat(st, tst):
                return
            tree.remove(rel, st)
        os.link(tree.full(target), tree.full(rel), follow_symlinks=False)
        if target in self.digests:
            self.digests[rel] = self.digests[target]
        self.created.add(rel)

    def _whiteout(self, e: _Entry, rel: str, base: str) -> None:
        head = rel.rpartition("/")[0]
        if base == _OPQ:
            if self.record:
                self.rec.opaques.append(head)
                return
            if head and not self.tree.parent(head, e.raw_name, create=False):
                return
            st = self.tree.lstat(head)
            if st is not None and stat.S_ISDIR(st.st_mode):
                self._opaque(head)
            elif st is not None and stat.S_ISLNK(st.st_mode):
                # fine only if this layer replaces the symlink by a directory (checked at the end)
                self.symlink_opaques.append((head, e))
            return
        if base.startswith(_WH + _WH[:3]):  # .wh..wh.* other aufs metadata: ignore
            log.debug("layer %s: aufs metadata %s ignored", self.layer, rel)
            return
        victim_name = base[len(_WH) :]
        victim = _clean(
            (head + "/" if head else "") + victim_name, self.layer, f"whiteout {e.raw_name!r} of"
        )
        if not victim or victim_name in (".", "..") or "/" in victim_name:
            raise self._err(e, "whiteout names something outside its directory")
        if self.record:
            self.rec.whiteouts.append(victim)
            return
        if victim in self.created:
            return  # whiteouts only hide lower layers
        if not self.tree.parent(victim, e.raw_name, create=False):
            return
        self.tree.remove(victim)

    def _opaque(self, head: str) -> None:
        """Remove everything under ``head`` that lower layers put there."""
        full = self.tree.full(head)
        with os.scandir(full) as it:
            children = list(it)
        for child in children:
            rel = head + "/" + child.name if head else child.name
            if rel in self.created:
                if child.is_dir(follow_symlinks=False):
                    self._opaque(rel)
                continue
            self.tree.remove(rel)

    def finish(self) -> None:
        """Directory metadata last (their mtimes, then modes that may forbid writes), restore
        the mtimes of parents this layer changed without describing."""
        for head, e in self.symlink_opaques:
            if head not in self.dir_meta or head not in self.tree.dirs:
                raise self._err(e, f"opaque marker in {head!r}, which is a symlink")
        for rel, e in self.dir_meta.items():
            self._dir_meta(rel, e)
        for rel, (atime, mtime) in self.parent_times.items():
            if rel in self.tree.dirs:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.tree.full(rel), ns=(atime, mtime), follow_symlinks=False)
        self.rec.implicit = [d for d in self.tree.implicit if d not in self.dir_meta]
        self.rec.root = self.root_entry
        if self.record:
            self.rec.entries = _record_tree(self.tree.root, self.chown, self.digests)

    def _dir_meta(self, rel: str, e: _Entry) -> None:
        if rel and rel not in self.tree.dirs:
            return  # removed or replaced later in the layer
        fd = os.open(
            self.tree.full(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        try:
            if self.chown:
                os.fchown(fd, e.uid, e.gid)
            os.fchmod(fd, e.mode)
            if e.xattrs and self.options.xattrs:
                _set_xattrs(fd, e.xattrs, self.layer, rel)
            os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
        finally:
            os.close(fd)


def _run_layer(
    stream: BinaryIO,
    compression: str,
    root: str,
    options: UnpackOptions,
    layer: str,
    *,
    record: bool,
) -> tuple[str, _LayerRecord]:
    src = _Source(stream, compression, layer, options.expansion)
    applier = _Applier(root, options, layer, record=record)
    entry = ""
    try:
        for e in _entries(src):
            entry = e.raw_name
            applier.apply(e, src)
        src.drain()
        applier.finish()
    except BootstrapError:
        raise
    except OSError as exc:
        raise BootstrapError(
            f"layer {layer}: entry {entry!r}: {exc.strerror or exc}",
            "check free space and permissions where the rootfs is written",
        ) from exc
    except (ValueError, UnicodeError) as exc:
        raise IntegrityError(
            f"layer {layer}: entry {entry!r}: malformed tar data: {exc}", _HOSTILE_HINT
        ) from exc
    return "sha256:" + src.digest.hexdigest(), applier.rec


def apply_layer(
    stream: BinaryIO,
    compression: str,
    dest: Path,
    *,
    options: UnpackOptions,
    layer_name: str = "",
    diff_id: str | None = None,
) -> str:
    """Apply one layer (a tar stream compressed with ``compression``: "gzip", "zstd" or "none")
    onto the existing directory ``dest``, whose content is the lower layers.

    Whiteouts and opaque directories remove what lower layers put there. Returns the diff_id
    (``sha256:`` of the uncompressed tar). When ``diff_id`` is given and differs, raises
    IntegrityError after extraction (the caller owns ``dest`` and removes it). Raises
    IntegrityError (exit 4) naming ``layer_name`` and the entry for a hostile or malformed
    layer; BootstrapError for file-system failures. Nothing outside ``dest`` is touched.
    """
    digest, _ = _run_layer(  # an unknown compression: IntegrityError before anything is written
        stream, compression, str(Path(dest).absolute()), options, layer_name, record=False
    )
    if diff_id is not None and digest != diff_id:
        raise _diff_id_error(layer_name, diff_id, digest)
    return digest


def _diff_id_error(layer: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"layer {layer}: uncompressed content is {actual}, the image config says {expected}",
        "the layer blob does not match the image config; remove the image and pull it again",
    )


@dataclass(frozen=True)
class TarMember:
    """A member seen by :func:`scan_tar`: normalized relative ``name`` ('' for the root), ustar
    type ``kind`` ('0' file, '1' hardlink, '2' symlink, '3'/'4' devices, '5' dir, '6' fifo),
    ``offset`` of its data in the uncompressed stream, ``size``, ``linkname``."""

    name: str
    raw_name: str
    kind: str
    offset: int
    size: int
    linkname: str


def scan_tar(
    stream: BinaryIO, compression: str, label: str, on_member: Callable[[TarMember], None]
) -> str:
    """Read a whole tar stream once without writing anything: call ``on_member`` for each
    member and return the sha256 digest of the uncompressed stream. Member names are checked
    as in :func:`apply_layer` (no '..', no absolute names, length limits, known types):
    IntegrityError (exit 4) naming ``label`` and the member otherwise."""
    src = _Source(stream, compression, label, ExpansionLimit.from_env())
    try:
        for e in _entries(src):
            name = _clean(e.raw_name, label, "member")
            on_member(TarMember(name, e.raw_name, e.kind, src.offset, e.size, e.linkname))
        src.drain()
    except (ValueError, UnicodeError) as exc:
        raise IntegrityError(f"{label}: malformed tar data: {exc}", _HOSTILE_HINT) from exc
    return "sha256:" + src.digest.hexdigest()


# ---- the per-layer cache -----------------------------------------------------------------------


def _syncfs(path: str | Path) -> None:
    """Flush the file system holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing an (empty) ``dst``."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    rename_noreplace = 1
    res = libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace)
    if res != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):  # file system without RENAME_NOREPLACE
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
            os.rename(src, dst)
            return
        raise OSError(err, os.strerror(err), str(dst))


@dataclass(frozen=True)
class CachedLayer:
    """A layer extracted in the cache: ``rootfs`` is its tree, ``record`` what composition
    needs beyond it."""

    diff_id: str
    path: Path
    record: _LayerRecord

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


def _load_cached(path: Path, diff_id: str, options: UnpackOptions) -> CachedLayer | None:
    try:
        doc = json.loads((path / _META_FILE).read_text())
        if isinstance(doc, dict) and doc.get("version") != _META_VERSION:
            return None  # written by an older bootstrap: extracted again, silently
        record = _LayerRecord.from_json(doc)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("layer cache %s unreadable (%s): extracting again", path, exc)
        return None
    if options.same_owner and not doc.get("owners"):
        return None  # filled without owners (not as root): not good enough
    return CachedLayer(diff_id, path, record)


#: Opens a layer's compressed bytes: a context manager yielding a readable binary stream.
LayerSource = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


def cached_layer(store: Store, diff_id: str, options: UnpackOptions) -> CachedLayer | None:
    """The layer cache entry of ``diff_id`` when one usable with ``options`` exists, else None
    (no lock taken: an entry is only ever renamed in whole)."""
    return _load_cached(Path(store.layer_cache_dir(diff_id)), diff_id, options)


def ensure_layer(
    store: Store,
    desc: Descriptor,
    diff_id: str,
    options: UnpackOptions,
    *,
    source: LayerSource | None = None,
    replace: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> tuple[CachedLayer, bool]:
    """The cached extraction of layer ``desc`` (whose uncompressed digest must be ``diff_id``),
    extracting it first when missing. Returns (layer, extracted_now).

    This is the one way a layer enters the cache. ``source`` opens the compressed bytes (default:
    the stored blob ``desc.digest``); a caller streaming from elsewhere (a registry response)
    passes its own and owns verifying ``desc.digest`` over those bytes. ``replace`` extracts
    again even when an entry exists (repair). ``before_commit`` (when given) is called once the
    extraction is complete and its diff_id matched, just before the rename; whatever it raises
    propagates and nothing is cached (a streaming caller verifies ``desc.digest`` there).
    The fill is atomic: a temp dir beside the cache
    entry, its record (``layer.json``: every path with type, mode, owner, size, mtime and
    content digest) written, ``syncfs``, renamed in; ``store.layer_lock(diff_id)`` makes
    concurrent callers extract once. The caller holds ``store.using()``. Raises IntegrityError
    for a hostile layer or a diff_id mismatch (nothing is cached then)."""
    compression = LAYER_COMPRESSION.get(desc.media_type)
    if compression is None:
        raise IntegrityError(
            f"layer {desc.digest}: unsupported media type {desc.media_type!r}",
            "bootstrap unpacks tar, tar+gzip and tar+zstd layers",
        )
    path = Path(store.layer_cache_dir(diff_id))
    if not replace:
        cached = _load_cached(path, diff_id, options)
        if cached is not None:
            return cached, False
    path.parent.mkdir(parents=True, exist_ok=True)
    with store.layer_lock(diff_id):
        if not replace:
            cached = _load_cached(path, diff_id, options)
            if cached is not None:
                return cached, False
        opener: LayerSource = source or (lambda: store.open_blob(desc.digest))
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            rootfs = tmp / "rootfs"
            rootfs.mkdir()
            with opener() as fh:
                digest, record = _run_layer(
                    fh, compression, str(rootfs), options, desc.digest, record=True
                )
            if digest != diff_id:
                raise _diff_id_error(desc.digest, diff_id, digest)
            doc = record.to_json()
            doc["owners"] = options.same_owner
            doc["diff_id"] = diff_id
            doc["blob"] = desc.digest
            doc["media_type"] = desc.media_type
            write_atomic(tmp / _META_FILE, json.dumps(doc, separators=(",", ":")))
            _syncfs(tmp)
            if before_commit is not None:
                before_commit()
            if os.path.lexists(path):
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
                os.rename(path, old / "entry")  # stale, insufficient or damaged entry
                os.rename(tmp, path)
                remove_tree(old)
            else:
                os.rename(tmp, path)
        except BaseException:
            remove_tree(tmp)
            raise
    return CachedLayer(diff_id, path, record), True


@dataclass(frozen=True)
class LayerCheck:
    """What :func:`verify_layer` found in one cache entry: ``changed`` paths (relative to the
    layer's rootfs) whose type, mode, owner, size, mtime or content differ from the record,
    ``missing`` recorded paths that are gone, ``extra`` paths the record does not list;
    ``problem`` a record that cannot be read (then nothing else was checked); ``stale`` an entry
    without a current record (no ``layer.json`` or an older format): not damage, the next
    checkout needing it extracts it again."""

    diff_id: str
    blob: str
    media_type: str
    files: int = 0
    bytes: int = 0
    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    problem: str = ""
    stale: bool = False

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.problem)

    def findings(self) -> list[str]:
        """One human line per finding."""
        name = f"cached layer {self.diff_id}"
        if self.problem:
            return [f"{name}: {self.problem}"]
        return (
            [f"{name}: changed {p}" for p in self.changed]
            + [f"{name}: missing {p}" for p in self.missing]
            + [f"{name}: unexpected {p}" for p in self.extra]
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "diff_id": self.diff_id,
            "blob": self.blob,
            "ok": self.ok,
            "files": self.files,
            "changed": list(self.changed),
            "missing": list(self.missing),
            "extra": list(self.extra),
            "problem": self.problem,
            "stale": self.stale,
        }


def verify_layer(path: Path, diff_id: str) -> LayerCheck:
    """Check the cache entry at ``path`` against its ``layer.json``: every recorded path present
    with the recorded type, mode, owner (when recorded), size, mtime and content (regular files
    re-hashed, symlink targets read), nothing unrecorded. Reads only; never raises for damage
    (it is reported in the result); OSError other than a vanished file propagates."""
    try:
        doc = json.loads((path / _META_FILE).read_text())
        if not isinstance(doc, dict) or doc.get("version") != _META_VERSION:
            return LayerCheck(diff_id, "", "", stale=True)
        record = _LayerRecord.from_json(doc)
        blob, media_type = str(doc["blob"]), str(doc["media_type"])
        owners = bool(doc.get("owners"))
    except FileNotFoundError:
        return LayerCheck(diff_id, "", "", stale=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return LayerCheck(diff_id, "", "", problem=f"record unreadable ({exc})")
    root = str(path / "rootfs")
    changed: list[str] = []
    missing: list[str] = []
    seen: set[str] = set()
    files = nbytes = 0
    for row in record.entries:
        rel = str(row[0])
        seen.add(rel)
        full = root + "/" + rel
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            missing.append(rel)
            continue
        data = ""
        try:
            if stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
                data = _file_digest(full) if st.st_size == row[5] else "?"
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full)
        except FileNotFoundError:
            missing.append(rel)
            continue
        if _record_row(rel, st, owners, data) != row:
            changed.append(rel)
    extra: list[str] = []

    def walk(full_dir: str, rel_dir: str, depth: int) -> None:
        with os.scandir(full_dir) as it:
            ents = list(it)
        for ent in ents:
            rel = rel_dir + "/" + ent.name if rel_dir else ent.name
            if rel not in seen:
                extra.append(rel)
            elif ent.is_dir(follow_symlinks=False) and depth < _MAX_DEPTH:
                walk(ent.path, rel, depth + 1)

    try:
        walk(root, "", 0)
    except FileNotFoundError:
        return LayerCheck(diff_id, blob, media_type, problem="rootfs/ is missing")
    return LayerCheck(
        diff_id,
        blob,
        media_type,
        files,
        nbytes,
        tuple(changed),
        tuple(missing),
        tuple(sorted(extra)),
    )


def repair_layer(store: Store, check: LayerCheck) -> None:
    """Extract the layer of a damaged cache entry again from its stored blob (atomically
    replacing the entry) with the owners policy of this process. The caller holds
    ``store.using()``. Raises UsageError when the blob is not stored (the entry is removed
    then: the next checkout needing it pulls and extracts), IntegrityError when the blob does not
    give the diff_id."""
    path = store.layer_cache_dir(check.diff_id)
    if not check.blob or not store.has_blob(check.blob):
        with store.layer_lock(check.diff_id):
            remove_tree(path)
        raise UsageError(
            f"cached layer {check.diff_id}: its blob is not stored; the damaged entry was removed",
            "pull the images using it again",
        )
    desc = Descriptor(check.media_type, check.blob, store.blob_path(check.blob).stat().st_size)
    ensure_layer(store, desc, check.diff_id, UnpackOptions(), replace=True)


# ---- composition -------------------------------------------------------------------------------


def _first_below(path: str, rel: str) -> str:
    """``rel`` plus the first entry found below ``path`` (for naming an entry in errors)."""
    while True:
        with os.scandir(path) as it:
            first = next(it, None)
        if first is None:
            return rel + "/"
        rel, path = rel + "/" + first.name, first.path
        if not first.is_dir(follow_symlinks=False):
            return rel


class _Composer:
    """Builds a rootfs under ``root`` from cached layers, bottom to top."""

    def __init__(self, root: str, options: UnpackOptions, copy: bool) -> None:
        """``copy``: every file a file of its own (reflinked where the file system can, copied
        otherwise); else hardlinks into the cache (shared inodes)."""
        self.root = root
        self.options = options
        self.copy = copy
        self.reflink = True  # until the file system refuses one
        self.copy_range = True  # copy_file_range, until it refuses (across file systems)
        self.reflinked = 0
        self.dir_src: dict[str, str] = {}  # dest dir -> cache dir whose metadata it gets
        self.inodes: dict[tuple[int, int], str] = {}  # copy mode: cache inode -> dest path
        self.tree = _Tree(root, "")
        self.empty = True  # nothing composed yet

    def layer(self, layer: CachedLayer, name: str) -> None:
        tree = self.tree
        tree.layer = name
        rec = layer.record
        for victim in rec.whiteouts:
            head, _, base = victim.rpartition("/")
            marker = f"{head}/{_WH}{base}" if head else _WH + base
            if self._marker_parent(victim, marker, layer):
                st = tree.lstat(victim)
                if st is not None:
                    tree.remove(victim, st)
                    self.dir_src.pop(victim, None)
        for head in rec.opaques:
            self._opaque(head, name, layer)
        implicit = set(rec.implicit)
        src_root = str(layer.rootfs)
        if rec.root:
            self.dir_src[""] = src_root
        self._walk(src_root, "", implicit, name, self.empty)
        self.empty = False
        for rel, target in rec.links:
            self._link(rel, target, name)
        if rec.devices and self.options.devices:
            if os.geteuid() != 0:
                log.debug("layer %s: device nodes skipped (not root)", name)
            else:
                for dev in rec.devices:
                    self._device(dev, name)
        elif rec.devices:
            log.debug("layer %s: %d device nodes skipped", name, len(rec.devices))

    def _marker_parent(self, rel: str, marker: str, layer: CachedLayer) -> bool:
        """Parents of ``rel`` (named by a whiteout or opaque ``marker``) are real directories:
        True; one is missing or a file: False (nothing to remove). One that is a symlink is
        refused (IntegrityError) unless this layer replaces it by a directory, in which case
        nothing of the lower layers can be below it: False."""
        try:
            return self.tree.parent(rel, marker, create=False)
        except IntegrityError:
            parts = rel.split("/")[:-1]
            implicit = set(layer.record.implicit)
            for i in range(1, len(parts) + 1):
                comp = "/".join(parts[:i])
                if os.path.islink(self.tree.full(comp)):
                    replaced = layer.rootfs / comp
                    if comp not in implicit and replaced.is_dir() and not replaced.is_symlink():
                        return False
                    break
            raise

    def _opaque(self, head: str, name: str, layer: CachedLayer) -> None:
        tree = self.tree
        marker = head + "/" + _OPQ if head else _OPQ
        if head and not self._marker_parent(head, marker, layer):
            return
        st = tree.lstat(head)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            if head not in layer.record.implicit and (layer.rootfs / head).is_dir():
                return  # this layer replaces it with a directory
            raise IntegrityError(
                f"layer {name}: entry {marker!r}: opaque marker in {head!r}, which is a symlink",
                _HOSTILE_HINT,
            )
        if not stat.S_ISDIR(st.st_mode):
            return  # nothing is below a file
        with os.scandir(tree.full(head)) as it:
            children = [c.name for c in it]
        for child in children:
            rel = head + "/" + child if head else child
            tree.remove(rel)
            self.dir_src.pop(rel, None)

    def _walk(self, src_dir: str, rel_dir: str, implicit: set[str], name: str, fresh: bool) -> None:
        """Compose the cache dir ``src_dir`` into ``rel_dir``; ``fresh``: that directory was
        just created, so nothing can be in the way (no lstat needed)."""
        tree = self.tree
        with os.scandir(src_dir) as it:
            entries = list(it)
        for ent in entries:
            rel = rel_dir + "/" + ent.name if rel_dir else ent.name
            dst = self.root + "/" + rel
            st = None if fresh else tree.lstat(rel)
            if ent.is_dir(follow_symlinks=False):
                made = False
                if rel in implicit:
                    if st is None:
                        os.mkdir(dst, 0o755)
                        self.dir_src[rel] = ent.path
                        made = True
                    elif not stat.S_ISDIR(st.st_mode):
                        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                        raise IntegrityError(
                            f"layer {name}: entry {_first_below(ent.path, rel)!r}: parent {rel!r} "
                            f"is {what} (refusing to write through it)",
                            _HOSTILE_HINT,
                        )
                else:
                    if st is not None and not stat.S_ISDIR(st.st_mode):
                        os.unlink(dst)
                        st = None
                    if st is None:
                        os.mkdir(dst, 0o700)
                        made = True
                    self.dir_src[rel] = ent.path
                tree.dirs.add(rel)
                self._walk(ent.path, rel, implicit, name, made)
                continue
            if st is not None:
                tree.remove(rel, st)
                self.dir_src.pop(rel, None)
            if self.copy:
                self._copy(ent.path, dst, ent.stat(follow_symlinks=False))
            else:
                os.link(ent.path, dst, follow_symlinks=False)

    def _copy(self, src: str, dst: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1:
            first = self.inodes.get(key)
            if first is not None and os.path.lexists(first):
                os.link(first, dst, follow_symlinks=False)
                return
            self.inodes[key] = dst
        mode = st.st_mode
        if stat.S_ISREG(mode):
            with open(src, "rb") as fin:
                fd = os.open(
                    dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
                try:
                    remaining = st.st_size
                    if remaining and self.reflink:
                        try:
                            fcntl.ioctl(fd, _FICLONE, fin.fileno())
                            remaining = 0
                            self.reflinked += 1
                        except OSError as exc:
                            if exc.errno not in _NO_REFLINK:
                                raise
                            self.reflink = False
                    while remaining > 0 and self.copy_range:
                        try:
                            n = os.copy_file_range(fin.fileno(), fd, remaining)
                        except OSError as exc:  # across file systems (EXDEV) and the like
                            if exc.errno not in _NO_REFLINK:
                                raise
                            self.copy_range = False
                            break
                        if n == 0:
                            break
                        remaining -= n
                    while remaining > 0:
                        chunk = fin.read(min(remaining, _CHUNK))
                        if not chunk:
                            break
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                        remaining -= len(chunk)
                    if self.options.same_owner:
                        os.fchown(fd, st.st_uid, st.st_gid)
                    os.fchmod(fd, stat.S_IMODE(mode))
                    if self.options.xattrs:
                        _copy_xattrs(src, fd)
                    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(fd)
            return
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            os.mknod(dst, (mode & ~0o7777) | 0o600, st.st_rdev)
        if self.options.same_owner:
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(dst, stat.S_IMODE(mode))
        if self.options.xattrs:
            _copy_xattrs(src, dst)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    def _link(self, rel: str, target: str, name: str) -> None:
        tree = self.tree
        if target.startswith(rel + "/"):
            raise IntegrityError(
                f"layer {name}: entry {rel!r}: hardlink target {target!r} is inside the entry "
                "it replaces",
                _HOSTILE_HINT,
            )
        tree.parent(rel, rel, create=True)
        present = tree.parent(target, rel, create=False)
        tst = tree.lstat(target) if present else None
        if tst is None or stat.S_ISDIR(tst.st_mode):
            raise IntegrityError(
                f"layer {name}: entry {rel!r}: hardlink target {target!r} "
                + ("does not exist" if tst is None else "is a directory"),
                _HOSTILE_HINT,
            )
        st = tree.lstat(rel)
        if st is not None:
            if os.path.samestat(st, tst):
                return
            tree.remove(rel, st)
        os.link(tree.full(target), tree.full(rel), follow_symlinks=False)

    def _device(self, dev: dict[str, Any], name: str) -> None:
        rel = str(dev["path"])
        tree = self.tree
        tree.parent(rel, rel, create=True)
        st = tree.lstat(rel)
        if st is not None:
            tree.remove(rel, st)
        full = tree.full(rel)
        kbit = stat.S_IFCHR if dev["kind"] == "3" else stat.S_IFBLK
        os.mknod(full, kbit | 0o600, os.makedev(int(dev["major"]), int(dev["minor"])))
        if self.options.same_owner:
            os.chown(full, int(dev["uid"]), int(dev["gid"]), follow_symlinks=False)
        os.chmod(full, int(dev["mode"]) & 0o7777)
        mtime = int(dev["mtime_ns"])
        os.utime(full, ns=(mtime, mtime), follow_symlinks=False)

    def finish(self) -> None:
        """Directory metadata from the topmost layer that described each directory."""
        for rel, src in self.dir_src.items():
            if rel and rel not in self.tree.dirs:
                continue
            st = os.lstat(src)
            fd = os.open(
                self.tree.full(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            try:
                if self.options.same_owner:
                    os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                if self.options.xattrs:
                    _copy_xattrs(src, fd)
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)


# ---- checkout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckoutResult:
    """A finished checkout: where, of what, and how it was built."""

    dest: Path
    image: str
    manifest_digest: str
    layers: int
    extracted: int
    copy: bool
    seconds: float
    reflinked: int = 0
    pulled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "dest": str(self.dest),
            "image": self.image,
            "manifest": self.manifest_digest,
            "pulled": self.pulled,
            "layers": self.layers,
            "layers_extracted": self.extracted,
            "layers_cached": self.layers - self.extracted,
            "copy": self.copy,
            "mode": self.mode,
            "files_reflinked": self.reflinked,
            "seconds": round(self.seconds, 3),
        }

    @property
    def mode(self) -> str:
        """How the files were made: "reflink", "copy" or "hardlink" (inodes shared with the
        layer cache)."""
        if not self.copy:
            return "hardlink"
        return "reflink" if self.reflinked else "copy"

    def to_text(self) -> str:
        how = {
            "reflink": "reflinked copies",
            "copy": "copied",
            "hardlink": "hardlinked from the layer cache: shares inodes, use read-only",
        }[self.mode]
        extracted = (
            "pulled and extracted in one pass" if self.pulled else f"{self.extracted} extracted now"
        )
        return (
            f"{self.dest}: {self.image} ({self.layers} layers, {extracted}, {how}) "
            f"in {self.seconds:.2f}s"
        )


def _check_dest(dest: Path) -> None:
    if os.path.lexists(dest):
        raise UsageError(f"{dest} already exists", "checkout needs a new destination path")
    if not dest.parent.exists():
        raise UsageError(
            f"{dest}: the parent directory {dest.parent} does not exist",
            f"create it first (mkdir -p {dest.parent}) or choose another DEST",
        )
    if not dest.parent.is_dir():
        raise UsageError(
            f"{dest}: {dest.parent} is not a directory", "choose a DEST inside a directory"
        )


def _remove_stale_temps(dest: Path) -> None:
    """Remove ``DEST.tmp-*`` dirs left by checkouts that were killed: each is paired with a
    ``.lock`` file its builder holds (flock) while it works; one nobody holds is stale."""
    prefix = f"{dest.name}.tmp-"
    try:
        with os.scandir(dest.parent) as it:
            locks = [e.name for e in it if e.name.startswith(prefix) and e.name.endswith(".lock")]
    except OSError:
        return
    for name in locks:
        lock = dest.parent / name
        try:
            with flocked(lock, timeout=0, what=str(lock)):
                stale = lock.with_name(name[: -len(".lock")])
                if os.path.lexists(stale):
                    log.info("removing %s, left by a checkout that was interrupted", stale)
                    remove_tree(stale)
                lock.unlink(missing_ok=True)
        except BusyError:
            continue  # another checkout is building it right now


def checkout(
    store: Store, image: Image, dest: Path, *, hardlink: bool = False, devices: bool = False
) -> CheckoutResult:
    """Build ``image``'s rootfs at ``dest``, which must not exist (UsageError, exit 2).

    Missing layers are extracted into the layer cache first (in parallel threads), then composed
    in ``DEST.tmp-*`` beside ``dest`` and renamed in. Every file is the checkout's own: a reflink
    of the cached file where the file system supports it (extents shared copy-on-write), a copy
    otherwise, so nothing written in ``dest`` reaches the cache. ``hardlink`` instead links the
    cache's inodes (fast, but a write through the checkout changes the cache: read-only use
    only). ``devices`` creates device nodes (root only). On any failure nothing is
    left at ``dest`` and no temp dir remains. Raises IntegrityError (exit 4) for hostile layers
    and diff_id mismatches, BusyError when the store is locked.
    """
    started = time.monotonic()
    dest = Path(os.path.abspath(dest))
    _check_dest(dest)
    options = UnpackOptions(devices=devices)
    layers = image.manifest.layers
    diff_ids = image.config.diff_ids
    if len(layers) != len(diff_ids):
        raise IntegrityError(
            f"{image.name}: manifest has {len(layers)} layers, config {len(diff_ids)} diff_ids",
            "the image is damaged; remove it and pull it again",
        )
    with store.using():
        cached, extracted = _ensure_all(store, layers, diff_ids, options)
        _remove_stale_temps(dest)
        fd, lockname = tempfile.mkstemp(dir=dest.parent, prefix=f"{dest.name}.tmp-", suffix=".lock")
        os.close(fd)
        lock = Path(lockname)
        tmp = lock.with_name(lock.name[: -len(".lock")])
        record = store.record_checkout_temp(tmp)  # so gc removes it if this process is killed
        try:
            with flocked(lock, what=str(tmp)):
                try:
                    os.mkdir(tmp, 0o755)
                    os.chmod(tmp, 0o755)
                    composer = _Composer(str(tmp), options, not hardlink)
                    for desc, layer in zip(layers, cached, strict=True):
                        composer.layer(layer, desc.digest)
                    composer.finish()
                    _syncfs(tmp)
                    try:
                        _rename_noreplace(tmp, dest)
                    except FileExistsError:
                        raise UsageError(
                            f"{dest} already exists", "checkout needs a new destination path"
                        ) from None
                except OSError as exc:
                    remove_tree(tmp)
                    raise BootstrapError(
                        f"checkout into {dest}: {exc.strerror or exc}",
                        "check free space and permissions of the destination",
                    ) from exc
                except BaseException:
                    remove_tree(tmp)
                    raise
                finally:
                    lock.unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
            record.unlink(missing_ok=True)
    return CheckoutResult(
        dest,
        image.name,
        image.manifest.digest,
        len(layers),
        extracted,
        not hardlink,
        time.monotonic() - started,
        composer.reflinked,
    )


def _ensure_all(
    store: Store,
    layers: tuple[Descriptor, ...],
    diff_ids: tuple[str, ...],
    options: UnpackOptions,
) -> tuple[list[CachedLayer], int]:
    unique: dict[str, Descriptor] = {}
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        unique.setdefault(diff_id, desc)
    done: dict[str, CachedLayer] = {}
    extracted = 0
    workers = max(1, min(len(unique), os.cpu_count() or 1, 4))
    if workers == 1:
        for diff_id, desc in unique.items():
            done[diff_id], now = ensure_layer(store, desc, diff_id, options)
            extracted += now
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unpack") as pool:
            futures = {
                diff_id: pool.submit(ensure_layer, store, desc, diff_id, options)
                for diff_id, desc in unique.items()
            }
            try:
                for diff_id, fut in futures.items():
                    done[diff_id], now = fut.result()
                    extracted += now
            except BaseException:
                for fut in futures.values():
                    fut.cancel()
                raise
    return [done[d] for d in diff_ids], extracted


def checkout_command(
    settings: Settings,
    ref: str,
    dest: str,
    *,
    hardlink: bool,
    devices: bool,
    pull: str = "never",
    verifier: Callable[[], ImageVerifier] | None = None,
) -> CheckoutResult:
    """CLI entry: ``bootstrap checkout REF DEST [--copy | --hardlink] [--devices]
    [--pull missing|always|never]``. ``ref`` is looked up as ``pull`` of the same text stored
    it (registries.conf aliases, search registries). ``pull``: "missing" pulls ``ref`` when it
    is not stored, "always" pulls it first (the tag moves if the registry's did), "never" only
    uses the store; a pull streams each layer into the layer cache as it downloads (one pass
    over the bytes, :func:`~bootstrap.image.pull.pull_image` with ``extract``) and checks it
    against ``verifier()`` (built only when a pull happens). DEST and the store are checked
    before anything is downloaded. Raises as :func:`checkout` and
    :func:`~bootstrap.image.api.pull`; a ``ref`` not stored with ``pull="never"`` is a
    UsageError whose hint is the pull command."""
    from bootstrap.image.api import stored_name
    from bootstrap.image.store import Store

    if pull not in ("missing", "always", "never"):
        raise UsageError(f"--pull {pull!r}: expected missing, always or never", "e.g. --pull never")
    store = Store(settings.store)
    # a DEST inside the store's own dirs would be taken for a blob (fsck: damage) or removed
    # by gc as an unused cache entry
    real = Path(os.path.realpath(dest))
    for own in (store.oci, store.tmp, store.locks, store.layers):
        own_real = Path(os.path.realpath(own))
        if real == own_real or own_real in real.parents:
            raise UsageError(
                f"{dest} is inside the store's {own.name}/ directory",
                "check out somewhere outside the store",
            )
    _check_dest(Path(os.path.abspath(dest)))  # before a pull, not only after it
    store.init()
    name = stored_name(store, ref)
    image: Image | None = None
    if pull != "never":
        stored = True
        try:
            store.resolve(name)
        except UsageError:
            stored = False
        if pull == "always" or not stored:
            from bootstrap.image import api

            result = api.pull(
                settings,
                ref,
                verifier=verifier() if verifier is not None else None,
                extract=UnpackOptions(devices=devices),
            )
            image = result.image
    pulled = image is not None
    if image is None:
        image = store.image(name)
    done = checkout(store, image, Path(dest), hardlink=hardlink, devices=devices)
    return replace(done, pulled=True) if pulled else done


# ---- overlay lower trees -----------------------------------------------------------------------


def image_tree(store: Store, image: Image) -> tuple[Path, int]:
    """The composed rootfs of ``image`` in the store (``store.tree_dir(manifest digest)``),
    built once from the layer cache and reused: the lower dir of overlay mounts. Its files are
    hardlinks into the layer cache; it is never written (overlay writes go to the mount's upper
    dir), so the shared inodes are never exposed to a writer. Returns (tree, layers extracted
    now). The caller holds ``store.using()`` (and keeps a :meth:`Store.hold` for as long as it
    uses the tree). Raises as :func:`checkout`."""
    tree = store.tree_dir(image.manifest.digest)
    if os.path.isdir(tree):
        return tree, 0
    layers = image.manifest.layers
    diff_ids = image.config.diff_ids
    if len(layers) != len(diff_ids):
        raise IntegrityError(
            f"{image.name}: manifest has {len(layers)} layers, config {len(diff_ids)} diff_ids",
            "the image is damaged; remove it and pull it again",
        )
    options = UnpackOptions()
    cached, extracted = _ensure_all(store, layers, diff_ids, options)
    tree.parent.mkdir(parents=True, exist_ok=True)
    with store.tree_lock(image.manifest.digest):
        if os.path.isdir(tree):
            return tree, extracted
        tmp = Path(tempfile.mkdtemp(dir=tree.parent, prefix=f".{tree.name}.tmp-"))
        try:
            os.chmod(tmp, 0o755)
            composer = _Composer(str(tmp), options, False)
            for desc, layer in zip(layers, cached, strict=True):
                composer.layer(layer, desc.digest)
            composer.finish()
            _syncfs(tmp)
            os.rename(tmp, tree)
        except OSError as exc:
            remove_tree(tmp)
            raise BootstrapError(
                f"composing {image.name} in {tree}: {exc.strerror or exc}",
                "check free space in the store",
            ) from exc
        except BaseException:
            remove_tree(tmp)
            raise
    return tree, extracted


def overlay_supported() -> bool:
    """True when this process can mount overlayfs: root, and the kernel knows ``overlay``.
    ``$BOOTSTRAP_NO_OVERLAY=1`` forces False (deployments then get copied rootfs trees)."""
    if os.environ.get("BOOTSTRAP_NO_OVERLAY", "") not in ("", "0") or os.geteuid() != 0:
        return False
    try:
        with open("/proc/filesystems") as fh:
            return any(line.split()[-1:] == ["overlay"] for line in fh)
    except OSError:
        return False
