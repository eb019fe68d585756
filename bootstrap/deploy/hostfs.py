"""Files a system container puts on the host: its image's ``/exports/hostfs/`` tree (the Atomic
convention), installed at install, replaced at update, restored by rollback, removed at
uninstall, and tracked so that nothing is left behind or overwritten unasked.

The host root is ``/`` (``$BOOTSTRAP_HOSTFS_ROOT`` overrides it). ``/exports/hostfs/etc/x``
of the image becomes ``/etc/x`` there.

What an image ships (:func:`scan`): regular files, symlinks and directories only; anything else
(devices, FIFOs, sockets), a name with a control character, or ``/exports/hostfs`` that is not a
plain directory is a :class:`UsageError` before anything is written. A hardlink is installed as a
copy of its content. Files are installed with the image's permission bits (``mode & 07777``),
owned by bootstrap's user.

What a container owns on the host is recorded per deployment in ``SLOT/hostfs.json``::

    {"version": 1, "files": [
      {"path": "/opt/cni", "type": "directory", "mode": "0755"},
      {"path": "/opt/cni/bin/bridge", "type": "file", "mode": "0755", "size": 4096,
       "sha256": "<hex>", "adopted": false},
      {"path": "/opt/cni/bin/alias", "type": "symlink", "target": "bridge", "adopted": false}]}

``directory`` entries are directories bootstrap created (one that existed before is not
recorded and never removed). ``adopted`` marks a file or symlink that existed on the host with
exactly the content, mode (or link target) the image ships: it is counted as the container's
while it stays so, but bootstrap never writes or removes it (it is left as found).

A change from what a container owns to what a deployment ships is a :class:`Transition`:
:func:`prepare` looks at the host and plans (raising on conflicts when ``strict``),
:meth:`Transition.begin` writes ``SLOT/hostfs.pending`` (what may be on the host: the owned and
the intended entries) before the caller makes the slot live, :meth:`Transition.finish` carries
it out and writes the slot's record. Per path, with "ours" meaning: the host holds exactly what
a non-adopted owned entry says:

- shipped and missing on the host: installed;
- shipped and the host holds exactly that (type, content or target, mode): kept (adopted when
  it was not ours);
- shipped and ours with other content: replaced (temp file + fsync + rename);
- shipped, the host holds something else that was once ours (changed since: content, mode,
  type): kept, one warning line, no longer recorded;
- shipped, the host holds something that is not ours (or adopted): a conflict when ``strict``
  (:class:`UsageError` naming the first path, nothing written), else kept with a warning;
- not shipped and ours: removed; directories we created are removed once empty; modified
  ones are kept with a warning, adopted ones are left.

Nothing is written through a symlink on the host: every path is opened component by component
from the root with ``O_NOFOLLOW``; a symlink (or a file) where a parent directory should be is
a conflict (``/lib -> usr/lib`` on a merged-/usr host: ship ``/usr/lib/...``). New paths are
created with ``link()`` (never replacing what appeared meanwhile); a replacement or removal
checks again, just before it, that the host still holds what we installed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bootstrap.errors import BootstrapError, IntegrityError, UsageError
from bootstrap.fsutil import write_atomic

log = logging.getLogger(__name__)

#: Where the host files are in an image (relative to its rootfs).
EXPORTS_HOSTFS = ("exports", "hostfs")
RECORD = "hostfs.json"
PENDING = "hostfs.pending"
VERSION = 1

FILE = "file"
SYMLINK = "symlink"
DIRECTORY = "directory"
TYPES = (FILE, SYMLINK, DIRECTORY)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


def host_root() -> Path:
    """The host's root directory (``$BOOTSTRAP_HOSTFS_ROOT``, default ``/``)."""
    return Path(os.environ.get("BOOTSTRAP_HOSTFS_ROOT") or "/")


def show(root: Path, path: str) -> str:
    """``path`` (absolute, relative to the host root) as the user finds it on this machine."""
    return path if str(root) == "/" else f"{str(root).rstrip('/')}{path}"


# ---- entries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One host path: ``path`` is absolute below the host root (``/opt/cni/bin/bridge``);
    ``type`` one of :data:`TYPES`; ``mode`` the permission bits (files, directories);
    ``sha256``/``size`` a file's content, ``target`` a symlink's; ``adopted`` see the module."""

    path: str
    type: str
    mode: int = 0
    sha256: str = ""
    size: int = 0
    target: str = ""
    adopted: bool = False

    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:])

    def same(self, other: Entry) -> bool:
        """Same type and content (mode, sha256 or target); ``adopted`` is not compared."""
        return (self.type, self.mode, self.sha256, self.target) == (
            other.type,
            other.mode,
            other.sha256,
            other.target,
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"path": self.path, "type": self.type}
        if self.type != SYMLINK:
            doc["mode"] = f"{self.mode:04o}"
        if self.type == FILE:
            doc["size"] = self.size
            doc["sha256"] = self.sha256
        if self.type == SYMLINK:
            doc["target"] = self.target
        if self.type != DIRECTORY:
            doc["adopted"] = self.adopted
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Entry:
        """An entry from its JSON form; ValueError for anything malformed."""
        if not isinstance(doc, dict):
            raise ValueError("an entry is not an object")
        path, kind = doc.get("path"), doc.get("type")
        if not isinstance(path, str) or not _valid_path(path):
            raise ValueError(f"bad path {path!r}")
        if kind not in TYPES:
            raise ValueError(f"{path}: bad type {kind!r}")
        mode = 0
        if kind != SYMLINK:
            raw = doc.get("mode")
            if not isinstance(raw, str) or not re.fullmatch(r"[0-7]{1,5}", raw):
                raise ValueError(f"{path}: bad mode {raw!r}")
            mode = int(raw, 8) & 0o7777
        sha: Any = doc.get("sha256", "") if kind == FILE else ""
        size: Any = doc.get("size", 0) if kind == FILE else 0
        target: Any = doc.get("target", "") if kind == SYMLINK else ""
        if kind == FILE and (not isinstance(sha, str) or not _SHA256.match(sha)):
            raise ValueError(f"{path}: bad sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{path}: bad size")
        if kind == SYMLINK and (not isinstance(target, str) or not target or "\0" in target):
            raise ValueError(f"{path}: bad target")
        adopted = doc.get("adopted", False)
        if not isinstance(adopted, bool):
            raise ValueError(f"{path}: bad adopted")
        return cls(path, str(kind), mode, sha, size, target, adopted and kind != DIRECTORY)


def _valid_path(path: str) -> bool:
    if not path.startswith("/") or path == "/" or _CONTROL.search(path):
        return False
    return all(p not in ("", ".", "..") for p in path.split("/")[1:])


def _key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")[1:])


def _under(path: str, prefixes: set[str]) -> bool:
    """True when ``path`` is strictly below one of ``prefixes``."""
    parts = _key(path)
    return any("/" + "/".join(parts[:i]) in prefixes for i in range(1, len(parts)))


# ---- what an image ships -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shipped:
    """What an image's ``/exports/hostfs`` holds: ``source`` the directory (None when the
    image has none) and its entries, parents before children."""

    source: Path | None
    entries: tuple[Entry, ...] = ()


NOTHING = Shipped(None, ())


def _sha256_fd(fd: int) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def scan(tree: Path, where: str) -> Shipped:
    """The host files image tree ``tree`` ships in ``exports/hostfs`` (``where`` names the
    image in errors, e.g. ``REF:/exports/hostfs``). An ``exports`` that is not a directory
    means none. Raises :class:`UsageError` for an ``exports/hostfs`` that is not a directory,
    a name holding a control character, a symlink with an unusable target, and anything but
    regular files, symlinks and directories (naming the path)."""
    exports = tree / EXPORTS_HOSTFS[0]
    if not tree.is_dir():
        raise BootstrapError(
            f"{where}: the image tree {tree} is missing",
            "the deployment is damaged; uninstall and install the container again",
        )
    try:
        if not stat.S_ISDIR(os.lstat(exports).st_mode):
            return NOTHING
        st = os.lstat(exports / EXPORTS_HOSTFS[1])
    except FileNotFoundError:
        return NOTHING
    except OSError as exc:
        raise BootstrapError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"{where}: {_kind(st.st_mode)}, not a directory",
            "/exports/hostfs must be a directory of the files to put on the host",
        )
    source = exports / EXPORTS_HOSTFS[1]
    entries: list[Entry] = []
    _walk(source, "", where, entries)
    return Shipped(source, tuple(entries))


def _walk(directory: Path, prefix: str, where: str, out: list[Entry]) -> None:
    try:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise BootstrapError(f"{where}{prefix}: cannot read: {exc.strerror or exc}") from exc
    for child in children:
        path = f"{prefix}/{child.name}"
        if _CONTROL.search(child.name):
            raise UsageError(
                f"{where}: a name holds a control character: {path!r}",
                "host file names must be printable",
            )
        st = child.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            out.append(Entry(path, DIRECTORY, stat.S_IMODE(mode)))
            _walk(Path(child.path), path, where, out)
        elif stat.S_ISREG(mode):
            fd = os.open(child.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                sha, size = _sha256_fd(fd)
            finally:
                os.close(fd)
            out.append(Entry(path, FILE, stat.S_IMODE(mode), sha, size))
        elif stat.S_ISLNK(mode):
            target = os.readlink(child.path)
            if not target or _CONTROL.search(target):
                raise UsageError(
                    f"{where}{path}: symlink target {target!r} holds a control character",
                    "host symlink targets must be printable",
                )
            out.append(Entry(path, SYMLINK, target=target))
        else:
            raise UsageError(
                f"{where}{path}: {_kind(mode)}",
                "/exports/hostfs may hold regular files, symlinks and directories only",
            )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "an unknown file type"


# ---- records -----------------------------------------------------------------------------------


def _read_doc(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} document")
    return doc


def _entries(doc: dict[str, Any], key: str) -> list[Entry]:
    raw = doc.get(key, [])
    if not isinstance(raw, list):
        raise ValueError(f"{key} is not a list")
    return [Entry.from_json(e) for e in raw]


def load(slot: Path) -> tuple[Entry, ...]:
    """The host files deployment ``slot`` records as its own (``()`` when it has no record).
    A damaged record is a :class:`BootstrapError`."""
    try:
        doc = _read_doc(slot / RECORD)
        return tuple(_entries(doc, "files")) if doc else ()
    except (OSError, ValueError) as exc:
        raise _damaged(slot / RECORD, exc) from exc


def pending(slot: Path) -> bool:
    """Whether a host-file transition into ``slot`` was begun and not finished."""
    return os.path.lexists(slot / PENDING)


def claims(slot: Path) -> list[Entry]:
    """Every host-file state ``slot`` may have left on the host: its record, and the entries
    before and after an unfinished transition into it. ``[]`` for a missing slot."""
    out = list(load(slot)) if os.path.isdir(slot) else []
    try:
        doc = _read_doc(slot / PENDING)
        if doc:
            out += _entries(doc, "from") + _entries(doc, "to")
    except (OSError, ValueError) as exc:
        raise _damaged(slot / PENDING, exc) from exc
    return out


def commit(slot: Path, files: Sequence[Entry]) -> None:
    """Write ``slot``'s record (none when ``files`` is empty) and drop its pending mark."""
    if files:
        doc = {"version": VERSION, "files": [e.to_json() for e in files]}
        write_atomic(slot / RECORD, json.dumps(doc, indent=2) + "\n")
    else:
        (slot / RECORD).unlink(missing_ok=True)
    (slot / PENDING).unlink(missing_ok=True)


def clear_pending(slot: Path) -> None:
    (slot / PENDING).unlink(missing_ok=True)


def _damaged(path: Path, exc: BaseException) -> BootstrapError:
    return BootstrapError(
        f"{path}: cannot read the host-file record: {exc}",
        "the deployment is damaged; uninstall and install the container again",
    )


# ---- the host ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What the host holds at a path: ``kind`` is one of :data:`TYPES`, ``missing``,
    ``other`` (a device, FIFO, socket) or ``blocked`` (a parent is a symlink or not a
    directory: ``blocker`` names it, ``why`` says which)."""

    kind: str
    mode: int = 0
    sha256: str = ""
    target: str = ""
    blocker: str = ""
    why: str = ""

    def holds(self, entry: Entry) -> bool:
        """True when the host holds exactly ``entry`` (type, content or target, mode)."""
        if self.kind != entry.type:
            return False
        if entry.type == FILE:
            return self.sha256 == entry.sha256 and self.mode == entry.mode
        if entry.type == SYMLINK:
            return self.target == entry.target
        return True


MISSING = Seen("missing")


class _Host:
    """The host root, walked component by component without following symlinks."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def parent(self, parts: tuple[str, ...]) -> Iterator[int | Seen]:
        """The directory fd of ``parts``' parent, or a :class:`Seen` (missing, blocked)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, name in enumerate(parts[:-1]):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    yield MISSING
                    return
                where = "/" + "/".join(parts[: i + 1])
                if stat.S_ISLNK(st.st_mode):
                    yield Seen("blocked", blocker=where, why="a symlink")
                    return
                if not stat.S_ISDIR(st.st_mode):
                    yield Seen("blocked", blocker=where, why="not a directory")
                    return
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        yield Seen("blocked", blocker=where, why="changed while looked at")
                        return
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def seen(self, path: str) -> Seen:
        parts = _key(path)
        with self.parent(parts) as pfd:
            if isinstance(pfd, Seen):
                return pfd
            return _seen_at(pfd, parts[-1])


def _seen_at(pfd: int, name: str) -> Seen:
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return MISSING
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return Seen(SYMLINK, target=os.readlink(name, dir_fd=pfd))
    if stat.S_ISDIR(mode):
        return Seen(DIRECTORY, stat.S_IMODE(mode))
    if not stat.S_ISREG(mode):
        return Seen("other", stat.S_IMODE(mode))
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Seen("other", stat.S_IMODE(st.st_mode))
        sha, _ = _sha256_fd(fd)
        return Seen(FILE, stat.S_IMODE(st.st_mode), sha)
    finally:
        os.close(fd)


# ---- transitions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    kind: str  # unlink | rmdir-first | mkdir | write | rmdir
    entry: Entry  # unlink/rmdir*: what the host holds (ours); mkdir/write: what to put there
    expect: Entry | None = None  # write: what it replaces (None: the path must be free)


@dataclass
class Transition:
    """A planned change of the host files of container ``name`` (see the module). The files
    are copied from ``source`` (the scanned ``exports/hostfs``) when it is carried out: it must
    still be there then."""

    name: str
    root: Path
    source: Path | None
    owned: tuple[Entry, ...]
    #: the record after a transition that goes as planned
    intended: tuple[Entry, ...]
    ops: list[_Op] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.ops)

    def begin(self, slot: Path) -> None:
        """Write ``slot/hostfs.pending`` (the owned and the intended entries): from here on,
        an interrupted command leaves a mark the next one settles (see :func:`claims`). Call
        it before the slot is made live. Nothing is written when both are empty."""
        if not self.owned and not self.intended:
            return
        doc = {
            "version": VERSION,
            "from": [e.to_json() for e in self.owned],
            "to": [e.to_json() for e in self.intended],
        }
        write_atomic(slot / PENDING, json.dumps(doc, indent=2) + "\n")

    def finish(self, slot: Path | None) -> tuple[Entry, ...]:
        """Carry the transition out and, with ``slot``, write its record (:func:`commit`).
        Returns the entries now owned. Logs one warning line per host path kept against the
        plan. Raises :class:`BootstrapError` naming the path when the host refuses a write."""
        result = self.apply()
        if slot is not None:
            commit(slot, result)
        return result

    def apply(self) -> tuple[Entry, ...]:
        """Carry the transition out (no record written); the entries now owned."""
        for line in self.warnings:
            log.warning("%s", line)
        result = {e.path: e for e in self.intended}
        host = _Host(self.root)
        order = {"unlink": 0, "rmdir-first": 1, "mkdir": 2, "write": 3, "rmdir": 4}
        deepest_first = {"rmdir-first", "rmdir"}

        def _order(op: _Op) -> tuple[int, Any]:
            k = _key(op.entry.path)
            return order[op.kind], (-len(k), k) if op.kind in deepest_first else k

        cancelled: set[str] = set()
        for op in sorted(self.ops, key=_order):
            path = op.entry.path
            if path in cancelled or _under(path, cancelled):
                continue
            try:
                kept = self._do(host, op)
            except OSError as exc:
                raise BootstrapError(
                    f"{self.name}: host file {show(self.root, path)}: {exc.strerror or exc}",
                    "check the path and free space, then run the command again",
                ) from exc
            if kept is not None:
                log.warning("%s", kept)
                result.pop(path, None)
                cancelled.add(path)  # nor what was to follow there (a type change)
        return tuple(result[p] for p in sorted(result, key=_key))

    def _do(self, host: _Host, op: _Op) -> str | None:
        """One operation; a warning line when the host no longer holds what was planned (the
        path is then kept as it is and not counted as ours)."""
        e = op.entry
        where = show(self.root, e.path)
        parts = e.parts()
        with host.parent(parts) as pfd:
            if isinstance(pfd, Seen):
                if op.kind in ("unlink", "rmdir", "rmdir-first"):
                    return None  # gone with its parent
                raise BootstrapError(
                    f"{self.name}: cannot install {where}: its parent changed while installing",
                    "run the command again",
                )
            name = parts[-1]
            if op.kind == "unlink":
                if not _seen_at(pfd, name).holds(e):
                    return self._kept(e.path)
                os.unlink(name, dir_fd=pfd)
                os.fsync(pfd)
                return None
            if op.kind in ("rmdir", "rmdir-first"):
                try:
                    os.rmdir(name, dir_fd=pfd)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        if op.kind == "rmdir":
                            log.info("%s: left directory %s: not empty", self.name, where)
                            return None
                        return (
                            f"{self.name}: kept directory {where} (it holds files not "
                            f"installed by {self.name}); the file shipped there is not installed"
                        )
                    raise
                return None
            if op.kind == "mkdir":
                os.mkdir(name, 0o700, dir_fd=pfd)
                dfd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                try:
                    os.fchmod(dfd, e.mode)
                finally:
                    os.close(dfd)
                os.fsync(pfd)
                return None
            return self._write(pfd, name, op)

    def _kept(self, path: str) -> str:
        return (
            f"{self.name}: kept {show(self.root, path)}: changed since {self.name} installed it "
            "(not replaced or removed; no longer managed by bootstrap)"
        )

    def _write(self, pfd: int, name: str, op: _Op) -> str | None:
        e = op.entry
        tmp = f".bootstrap-{secrets.token_hex(8)}.tmp"
        try:
            if e.type == FILE:
                self._copy(pfd, tmp, e)
            else:
                os.symlink(e.target, tmp, dir_fd=pfd)
            if op.expect is None:
                try:
                    os.link(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd, follow_symlinks=False)
                except FileExistsError:
                    return (
                        f"{self.name}: kept {show(self.root, e.path)}: it appeared while "
                        "installing (not replaced)"
                    )
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                        raise
                    if _seen_at(pfd, name).kind != "missing":  # no hardlinks here: check, rename
                        return f"{self.name}: kept {show(self.root, e.path)}: it appeared meanwhile"
                    os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            else:
                if not _seen_at(pfd, name).holds(op.expect):
                    return self._kept(e.path)
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            os.fsync(pfd)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=pfd)

    def _copy(self, pfd: int, tmp: str, e: Entry) -> None:
        assert self.source is not None
        src = os.open(self.source / e.path.lstrip("/"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            out = os.open(tmp, flags, 0o600, dir_fd=pfd)
            try:
                h = hashlib.sha256()
                while chunk := os.read(src, _CHUNK):
                    h.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view) :]
                if h.hexdigest() != e.sha256:
                    raise IntegrityError(
                        f"{self.name}: {self.source}{e.path} changed while installing it",
                        "the image tree is damaged: run 'bootstrap fsck'",
                    )
                os.fchmod(out, e.mode)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(src)


def prepare(
    name: str,
    owned: Iterable[Entry],
    shipped: Shipped,
    *,
    strict: bool,
    known: Collection[str] = (),
    root: Path | None = None,
) -> Transition:
    """Plan the change of container ``name``'s host files from ``owned`` (every state the
    container may have left: a path matching any of them is ours) to ``shipped``. Nothing
    is written.

    With ``strict`` (install, update) a shipped path the host holds and that is not ours is
    a :class:`UsageError` (exit 2) naming the first such path, as is a shipped path below a
    symlink or a non-directory on the host — unless it is one of the paths in ``known`` (what
    the running deployment ships: an update keeps what the operator took over). Without
    (rollback, the restore after a failed update, recovery, uninstall) such paths are kept,
    with a warning line each."""
    root = root or host_root()
    owned = tuple(owned)
    claimed: dict[str, list[Entry]] = {}
    for e in owned:
        claimed.setdefault(e.path, []).append(e)
    desired = {e.path: e for e in shipped.entries}
    host = _Host(root)
    ops: list[_Op] = []
    intended: dict[str, Entry] = {}
    warnings: list[str] = []
    conflicts: list[str] = []
    fresh: set[str] = set()  # directories this transition creates: nothing below exists yet
    skipped: set[str] = set()  # shipped directories not installed: nothing below is
    hint = ""

    def refuse(path: str, seen: Seen, want: Entry | None = None) -> None:
        nonlocal hint
        where = show(root, path)
        dir_on_link = want is not None and want.type == DIRECTORY and seen.kind == SYMLINK
        if seen.kind == "blocked" or dir_on_link:
            what = "it is a symlink" if dir_on_link else f"{show(root, seen.blocker)} is {seen.why}"
            line = f"{name}: cannot install {'directory ' if dir_on_link else ''}{where}: "
            line += f"{what} on the host"
            fix = (
                "bootstrap writes nothing through symlinks: ship the file under the directory "
                "the symlink points to, or replace it by a directory"
            )
        else:
            kind = {FILE: "file", SYMLINK: "symlink", DIRECTORY: "directory"}.get(
                seen.kind, "special file"
            )
            line = f"{name}: {where} exists ({kind}) and was not installed by {name}"
            fix = (
                f"remove or move away {where} and run the command again (bootstrap "
                f"overwrites no host file it did not install; the image ships it in "
                f"/exports/hostfs{path})"
            )
        if strict and path not in known:
            conflicts.append(line)
            hint = hint or fix
        else:
            warnings.append(f"{line}; kept, not replaced")

    for path in sorted(set(claimed) | set(desired), key=_key):
        if _under(path, skipped):
            continue
        want = desired.get(path)
        cl = claimed.get(path, [])
        seen = MISSING if _under(path, fresh) else host.seen(path)
        mine = next((c for c in cl if seen.holds(c)), None)
        ours = mine is not None and not mine.adopted
        if want is None:
            if mine is None:
                if cl and seen.kind not in ("missing", "blocked"):
                    warnings.append(
                        f"{name}: kept {show(root, path)}: changed since {name} installed it "
                        "(not removed; no longer managed by bootstrap)"
                    )
            elif ours:
                kind = "rmdir" if mine.type == DIRECTORY else "unlink"
                ops.append(_Op(kind, mine))
            continue
        if seen.kind == "blocked":
            if cl:
                warnings.append(
                    f"{name}: {show(root, path)} not installed: "
                    f"{show(root, seen.blocker)} is {seen.why} on the host"
                )
            else:
                refuse(path, seen)
            skipped.add(path)
            continue
        if want.type == DIRECTORY:
            if seen.kind == DIRECTORY:
                if ours:
                    intended[path] = want
                continue
            if seen.kind == "missing":
                ops.append(_Op("mkdir", want))
            elif ours and mine is not None:
                ops += [_Op("unlink", mine), _Op("mkdir", want)]
            else:
                if mine is None and cl:
                    warnings.append(f"{_changed(name, root, path)}; no directory made there")
                else:
                    refuse(path, seen, want)
                skipped.add(path)
                continue
            fresh.add(path)
            intended[path] = want
            continue
        if seen.holds(want):
            intended[path] = replace(want, adopted=not ours)
            continue
        if seen.kind == "missing":
            ops.append(_Op("write", want))
        elif ours and mine is not None:
            if mine.type == DIRECTORY:
                ops += [_Op("rmdir-first", mine), _Op("write", want)]
            else:
                ops.append(_Op("write", want, expect=mine))
        else:
            if mine is None and cl:
                warnings.append(_changed(name, root, path) + "; not replaced")
            else:
                refuse(path, seen)
            continue
        intended[path] = want
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise UsageError(conflicts[0] + more, hint)
    return Transition(
        name,
        root,
        shipped.source,
        owned,
        tuple(intended[p] for p in sorted(intended, key=_key)),
        ops,
        warnings,
    )


def _changed(name: str, root: Path, path: str) -> str:
    return (
        f"{name}: kept {show(root, path)}: changed since {name} installed it (no longer "
        "managed by bootstrap)"
    )
