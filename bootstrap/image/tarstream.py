"""The tar stream: decompression, the expansion bound, tar/pax parsing, member name checks.

:class:`TarSource` decompresses a stream (``gzip``, ``zstd`` or ``none``) in big chunks, hashes
every uncompressed byte (the diff_id) and refuses a compressed stream that expands beyond its
:class:`ExpansionLimit`. :func:`read_entries` parses ustar/pax/GNU headers from it, folding pax
and GNU long-name records into one :class:`TarEntry` per member. :func:`clean_name` turns a
member name into a relative path or refuses it (absolute, ``..``, NUL, too long, too deep).
:func:`scan_tar` reads a whole stream without writing anything (archive import). Every refusal
is an :class:`~bootstrap.errors.IntegrityError` (exit 4) naming the layer and the entry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.image.stream import Digesting

log = logging.getLogger(__name__)

_BLOCK = 512
_CHUNK = 1 << 20
PATH_MAX = 4095
NAME_MAX = 255
MAX_DEPTH = 256  # deeper paths exist in no real image; bounds the recursion of tree walks
_MAX_META = 1 << 20  # pax / GNU long-name records larger than this are refused
HOSTILE_HINT = "the image is damaged or hostile; nothing was written outside the rootfs"
DAMAGED_HINT = (
    "the layer blob is damaged: 'bootstrap fsck --repair' sets a stored one aside, then pull "
    "the image again"
)


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


def _decompressor(stream: Any, compression: str, layer_name: str) -> _Reader:
    if compression == "none":
        plain: _Reader = stream
        return plain
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


class TarSource:
    """Reads the uncompressed tar stream in big chunks, hashing every byte (the diff_id), and
    refuses a compressed layer that expands beyond its :class:`ExpansionLimit`."""

    __slots__ = ("_buf", "_compressed", "_limit", "_mv", "_pos", "_raw", "layer", "offset")

    def __init__(
        self, stream: BinaryIO | Digesting, compression: str, layer: str, limit: ExpansionLimit
    ) -> None:
        """Decompress ``stream`` (``compression``: "gzip", "zstd" or "none"); IntegrityError
        for an unknown compression."""
        # the compressed bytes the decompressor took (counted for the expansion bound), and the
        # uncompressed bytes it produced (counted and hashed: the diff_id)
        self._compressed = Digesting(stream) if compression != "none" and limit.ratio else None
        source: Any = self._compressed if self._compressed else stream
        self._raw = Digesting(_decompressor(source, compression, layer), algorithm="sha256")
        self._limit = limit
        self._buf = b""
        self._mv = memoryview(self._buf)
        self._pos = 0
        self.offset = 0
        self.layer = layer

    @property
    def produced(self) -> int:
        """Uncompressed bytes read so far."""
        return self._raw.count

    def digest(self) -> str:
        """``sha256:HEX`` of the uncompressed bytes read so far (after :meth:`drain`: the
        diff_id)."""
        return self._raw.digest()

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
                DAMAGED_HINT,
            ) from exc
        if not chunk:
            return False
        if self._compressed is not None:
            self._check_expansion()
        rest = self._buf[self._pos :]
        self._buf = rest + chunk if rest else chunk
        self._mv = memoryview(self._buf)
        self._pos = 0
        return True

    def _truncated(self) -> IntegrityError:
        return IntegrityError(
            f"layer {self.layer}: tar stream truncated at offset {self.offset}",
            DAMAGED_HINT,
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


class TarEntry:
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
    try:
        return int(text, 8) if text else 0
    except ValueError:  # the bytes themselves are not shown: they may be anything
        raise ValueError("a numeric field of a tar header is not an octal number") from None


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
            raise IntegrityError(f"layer {layer}: malformed pax header", HOSTILE_HINT)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise IntegrityError(f"layer {layer}: malformed pax header", HOSTILE_HINT) from None
        record = data[sp + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise IntegrityError(f"layer {layer}: malformed pax header record", HOSTILE_HINT)
        key, eq, value = record[:-1].partition(b"=")
        if not eq:
            raise IntegrityError(f"layer {layer}: malformed pax header record", HOSTILE_HINT)
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


_KINDS = {"0": "0", "\0": "0", "7": "0", "1": "1", "2": "2", "3": "3", "4": "4", "5": "5", "6": "6"}


def read_entries(src: TarSource) -> Iterator[TarEntry]:
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
        try:
            stored = _num(header[148:156])
        except ValueError:
            stored = -1  # not even a number: not a tar header (reported as a bad checksum)
        computed = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != computed:
            raise IntegrityError(
                f"layer {layer}: bad tar header checksum at offset {src.offset - _BLOCK}",
                "the layer is not a valid tar stream",
            )
        flag = chr(header[156])
        size = _num(header[124:136])
        if size < 0:
            raise IntegrityError(f"layer {layer}: negative size in tar header", HOSTILE_HINT)
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if flag in ("x", "g", "L", "K"):
            if size > _MAX_META:
                raise IntegrityError(
                    f"layer {layer}: {size}-byte tar metadata record", HOSTILE_HINT
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
        e = TarEntry()
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
                HOSTILE_HINT,
            )
        if kind == "0" and name.endswith("/") and flag == "\0":
            kind = "5"  # old-style directory
        e.kind = kind
        start = src.offset
        yield e
        src.skip(padded - (src.offset - start))


# ---- path checks -------------------------------------------------------------------------------


def clean_name(name: str, layer: str, what: str = "entry") -> str:
    """Normalize a member name to a relative path ('' for the root); refuse anything that could
    leave the tree."""
    if "\0" in name:
        raise IntegrityError(f"layer {layer}: {what} {name!r}: NUL in name", HOSTILE_HINT)
    if name.startswith("/"):
        raise IntegrityError(f"layer {layer}: {what} {name!r}: absolute path", HOSTILE_HINT)
    parts = [p for p in name.split("/") if p and p != "."]
    for p in parts:
        if p == "..":
            raise IntegrityError(
                f"layer {layer}: {what} {name!r}: '..' leaves the rootfs", HOSTILE_HINT
            )
        if len(p) > NAME_MAX // 4 and len(os.fsencode(p)) > NAME_MAX:
            raise IntegrityError(
                f"layer {layer}: {what} {name[:80]!r}...: path component longer than "
                f"{NAME_MAX} bytes",
                HOSTILE_HINT,
            )
    if len(parts) > MAX_DEPTH:
        raise IntegrityError(
            f"layer {layer}: {what} {name[:80]!r}...: nested deeper than {MAX_DEPTH} directories",
            HOSTILE_HINT,
        )
    rel = "/".join(parts)
    if len(rel) > PATH_MAX // 4 and len(os.fsencode(rel)) > PATH_MAX:
        raise IntegrityError(
            f"layer {layer}: {what} {name[:80]!r}...: path longer than {PATH_MAX} bytes",
            HOSTILE_HINT,
        )
    return rel


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
    stream: BinaryIO | Digesting,
    compression: str,
    label: str,
    on_member: Callable[[TarMember], None],
) -> str:
    """Read a whole tar stream once without writing anything: call ``on_member`` for each
    member and return the sha256 digest of the uncompressed stream. Member names are checked
    as in :func:`apply_layer` (no '..', no absolute names, length limits, known types):
    IntegrityError (exit 4) naming ``label`` and the member otherwise."""
    src = TarSource(stream, compression, label, ExpansionLimit.from_env())
    try:
        for e in read_entries(src):
            name = clean_name(e.raw_name, label, "member")
            on_member(TarMember(name, e.raw_name, e.kind, src.offset, e.size, e.linkname))
        src.drain()
    except (ValueError, UnicodeError) as exc:
        raise IntegrityError(f"{label}: malformed tar data: {exc}", HOSTILE_HINT) from exc
    return src.digest()
