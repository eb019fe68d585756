"""Layer apply: one layer's tar stream written onto a tree, whiteouts and metadata included.

:func:`apply_layer` applies one layer (``gzip``/``zstd``/``none``) onto an existing tree in one
streaming pass: whiteouts (``.wh.NAME``) and opaque directories (``.wh..wh..opq``) remove what
lower layers put there; hardlinks, symlinks, FIFOs, owners (when ``same_owner``), modes incl.
setuid/setgid/sticky, xattrs (pax ``SCHILY.xattr.*``), mtimes (directories last), device nodes
only as root and when asked. :func:`run_layer` with ``record`` fills a fresh layer-cache
directory instead: whiteouts, opaque directories, links to lower layers and device nodes are
recorded in a :class:`LayerRecord` (with every path's type, mode, owner, size, mtime and content
digest) for composition and verification. Hostile entries are refused with IntegrityError
(exit 4) naming the layer and the entry; nothing outside the tree is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bootstrap.errors import BootstrapError, IntegrityError
from bootstrap.image.tarstream import (
    HOSTILE_HINT,
    MAX_DEPTH,
    PATH_MAX,
    ExpansionLimit,
    TarEntry,
    TarSource,
    clean_name,
    read_entries,
)
from bootstrap.image.tree import SafeTree, restore_meta, set_xattrs

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
WH = ".wh."
OPQ = ".wh..wh..opq"
RECORD_VERSION = 2


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


#: Entry types in a layer record's ``entries``: regular file, directory, symlink, FIFO.
REC_TYPES = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p"}


@dataclass
class LayerRecord:
    """What a cached layer holds and what it needs beyond its tree to be composed over lower
    layers. ``entries``: one row per path of the extracted tree (sorted), ``[path, type, mode,
    uid, gid, size, mtime_ns, data]``, ``type`` one of :data:`REC_TYPES`' values, ``mode`` the
    permission bits, ``data`` the sha256 hex of a regular file's content or a symlink's target
    ('' otherwise); ``uid``/``gid`` are -1 when the layer was extracted without owners.
    ``xattrs``: some entry of the layer carried extended attributes (False lets composition
    skip looking for them file by file; records without the key say True)."""

    whiteouts: list[str] = field(default_factory=list)
    opaques: list[str] = field(default_factory=list)
    implicit: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    root: bool = False
    entries: list[list[Any]] = field(default_factory=list)
    xattrs: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "whiteouts": self.whiteouts,
            "opaques": self.opaques,
            "implicit": self.implicit,
            "links": [list(x) for x in self.links],
            "devices": self.devices,
            "root": self.root,
            "entries": self.entries,
            "xattrs": self.xattrs,
        }

    @classmethod
    def from_json(cls, doc: Any) -> LayerRecord:
        if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
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
            xattrs=bool(doc.get("xattrs", True)),
        )


def file_digest(path: str) -> str:
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


def record_row(rel: str, st: os.stat_result, owners: bool, data: str) -> list[Any]:
    kind = REC_TYPES.get(stat.S_IFMT(st.st_mode), "?")
    size = st.st_size if kind in ("f", "l") else 0
    uid, gid = (st.st_uid, st.st_gid) if owners else (-1, -1)
    return [rel, kind, stat.S_IMODE(st.st_mode), uid, gid, size, st.st_mtime_ns, data]


def record_tree(root: str, owners: bool, digests: dict[str, str]) -> list[list[Any]]:
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
                data = digests.get(rel) or file_digest(ent.path)
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(ent.path)
            rows.append(record_row(rel, st, owners, data))
            if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
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
        self.tree = SafeTree(root, layer)
        self.created: set[str] = set()  # paths this layer put in place (apply mode)
        self.dir_meta: dict[str, TarEntry] = {}
        self.parent_times: dict[str, tuple[int, int]] = {}
        self.rec = LayerRecord(xattrs=False)
        self.digests: dict[str, str] = {}  # record mode: sha256 hex of each regular file
        self.root_entry = False
        self.symlink_opaques: list[tuple[str, TarEntry]] = []
        #: whiteouts whose parent is a symlink: fine if the layer makes it a directory
        self.symlink_whiteouts: list[tuple[str, TarEntry, IntegrityError]] = []
        #: record mode: paths a non-directory entry of this layer replaced
        self.replaced: set[str] = set()
        #: hardlinks to a file of a lower layer (apply mode): refused if this layer replaces it
        self.lower_links: list[tuple[str, str]] = []
        if not record:
            self.tree.on_parent = self._touch_parent
        self.chown = options.same_owner

    def _touch_parent(self, head: str) -> None:
        # a directory this layer does not describe keeps its mtime although entries change in it
        if head in self.dir_meta or head in self.parent_times:
            return
        st = os.lstat(self.tree.full(head))
        self.parent_times[head] = (st.st_atime_ns, st.st_mtime_ns)

    def _err(self, e: TarEntry, problem: str) -> IntegrityError:
        return IntegrityError(f"layer {self.layer}: entry {e.raw_name!r}: {problem}", HOSTILE_HINT)

    def apply(self, e: TarEntry, src: TarSource) -> None:
        rel = clean_name(e.raw_name, self.layer)
        e.name = rel
        base = rel.rpartition("/")[2]
        if base.startswith(WH):
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
        if self.record and self.rec.links and e.kind != "1":
            # a later entry of the same path wins over a hardlink recorded for composition
            self.rec.links = [(r, t) for r, t in self.rec.links if r != rel]
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
        if self.record:
            # whatever lower layers have at ``rel`` is replaced: should this layer make it a
            # directory again, none of their content below it may show (see finish)
            self.replaced.add(rel)
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
                self._meta(fd, e)
            finally:
                os.close(fd)
        elif kind == "2":
            if "\0" in e.linkname or len(os.fsencode(e.linkname)) > PATH_MAX:
                raise self._err(e, "invalid symlink target")
            os.symlink(e.linkname, full)
            self._meta(full, e, symlink=True)
        elif kind == "6":
            os.mkfifo(full, 0o600)
            self._meta(full, e)
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
                self._meta(full, e)
            else:
                log.debug("layer %s: device node %s skipped", self.layer, rel)
                return
        self.created.add(rel)

    def _meta(self, target: int | str, e: TarEntry, *, symlink: bool = False) -> None:
        """Owner, mode, xattrs and mtime of entry ``e`` onto ``target``: an fd of the node, or
        its checked path (FIFOs and devices cannot be opened safely: a FIFO blocks); a symlink
        keeps its mode."""
        xattrs = e.xattrs if self.options.xattrs else None
        if e.xattrs:
            self.rec.xattrs = True
        restore_meta(
            target,
            owner=(e.uid, e.gid) if self.chown else None,
            mode=None if symlink else e.mode,
            times_ns=(e.mtime_ns, e.mtime_ns),
            xattrs=(lambda t: set_xattrs(t, xattrs, self.layer, e.name)) if xattrs else None,
        )

    def _hardlink(self, e: TarEntry, rel: str, st: os.stat_result | None) -> None:
        target = clean_name(e.linkname, self.layer, f"hardlink {e.raw_name!r} ->")
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
                self.rec.links = [(r, t) for r, t in self.rec.links if r != rel]
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
        if target not in self.created:
            self.lower_links.append((rel, target))  # checked in finish
        if target in self.digests:
            self.digests[rel] = self.digests[target]
        self.created.add(rel)

    def _whiteout(self, e: TarEntry, rel: str, base: str) -> None:
        head = rel.rpartition("/")[0]
        if base == OPQ:
            if self.record:
                self.rec.opaques.append(head)
                return
            if head and not self.tree.parent(head, e.raw_name, create=False):
                return
            st = self.tree.lstat(head)
            if st is not None and stat.S_ISDIR(st.st_mode):
                self._opaque(head)
            elif st is not None and stat.S_ISLNK(st.st_mode) and head not in self.created:
                # a lower layer's symlink: fine only if this layer replaces it by a directory
                # (checked at the end). One this layer made replaced the lower layers' entry
                # whole: the marker, which only applies to lower layers, has nothing left to do.
                self.symlink_opaques.append((head, e))
            return
        if base.startswith(WH + WH[:3]):  # .wh..wh.* other aufs metadata: ignore
            log.debug("layer %s: aufs metadata %s ignored", self.layer, rel)
            return
        victim_name = base[len(WH) :]
        victim = clean_name(
            (head + "/" if head else "") + victim_name, self.layer, f"whiteout {e.raw_name!r} of"
        )
        if not victim or victim_name in (".", "..") or "/" in victim_name:
            raise self._err(e, "whiteout names something outside its directory")
        if self.record:
            self.rec.whiteouts.append(victim)
            return
        if victim in self.created or victim in self.tree.implicit_set:
            return  # whiteouts only hide lower layers (an implicit parent is this layer's)
        try:
            if not self.tree.parent(victim, e.raw_name, create=False):
                return
        except IntegrityError as exc:
            link = self._symlink_parent(victim)
            if link is None:
                raise
            if link in self.created:
                return  # this layer replaced it whole: nothing of the lower layers is below
            # fine only if this layer replaces the symlink by a directory (checked at the
            # end): then nothing of the lower layers is below it and there is nothing to hide
            self.symlink_whiteouts.append((link, e, exc))
            return
        self.tree.remove(victim)

    def _symlink_parent(self, rel: str) -> str | None:
        """The first parent of ``rel`` that is a symlink in the tree, or None."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            comp = "/".join(parts[:i])
            st = self.tree.lstat(comp)
            if st is not None and stat.S_ISLNK(st.st_mode):
                return comp
        return None

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
        for head, _, exc in self.symlink_whiteouts:
            if head not in self.dir_meta or head not in self.tree.dirs:
                raise exc
        for rel, target in self.lower_links:
            if target in self.created:
                raise IntegrityError(
                    f"layer {self.layer}: entry {rel!r}: hardlink target {target!r} is "
                    "replaced later in the same layer (which file it names depends on order)",
                    HOSTILE_HINT,
                )
        if self.record:
            for rel in sorted(self.replaced):
                st = self.tree.lstat(rel) if rel in self.tree.dirs else None
                if st is not None and stat.S_ISDIR(st.st_mode) and rel not in self.rec.opaques:
                    self.rec.opaques.append(rel)  # replaced by a non-directory, then a directory
            for rel, target in self.rec.links:
                if target in self.created:  # made or replaced later in this layer
                    raise IntegrityError(
                        f"layer {self.layer}: entry {rel!r}: hardlink target {target!r} is "
                        "made or replaced later in the same layer (which file it names depends "
                        "on order)",
                        HOSTILE_HINT,
                    )
        for rel, e in self.dir_meta.items():
            self._dir_meta(rel, e)
        for rel, (atime, mtime) in self.parent_times.items():
            if rel in self.tree.dirs:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.tree.full(rel), ns=(atime, mtime), follow_symlinks=False)
        self.rec.implicit = [d for d in self.tree.implicit if d not in self.dir_meta]
        self.rec.root = self.root_entry
        if self.record:
            self.rec.entries = record_tree(self.tree.root, self.chown, self.digests)

    def _dir_meta(self, rel: str, e: TarEntry) -> None:
        if rel and rel not in self.tree.dirs:
            return  # removed or replaced later in the layer
        fd = os.open(
            self.tree.full(rel), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        try:
            self._meta(fd, e)
        finally:
            os.close(fd)


def run_layer(
    stream: BinaryIO,
    compression: str,
    root: str,
    options: UnpackOptions,
    layer: str,
    *,
    record: bool,
) -> tuple[str, LayerRecord]:
    src = TarSource(stream, compression, layer, options.expansion)
    applier = _Applier(root, options, layer, record=record)
    entry = ""
    try:
        for e in read_entries(src):
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
            f"layer {layer}: entry {entry!r}: malformed tar data: {exc}", HOSTILE_HINT
        ) from exc
    return src.digest(), applier.rec


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
    digest, _ = run_layer(  # an unknown compression: IntegrityError before anything is written
        stream, compression, str(Path(dest).absolute()), options, layer_name, record=False
    )
    if diff_id is not None and digest != diff_id:
        raise diff_id_error(layer_name, diff_id, digest)
    return digest


def diff_id_error(layer: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"layer {layer}: uncompressed content is {actual}, the image config says {expected}",
        "the layer blob does not match the image config: 'bootstrap fsck --repair' sets a "
        "damaged stored one aside, then pull the image again",
    )
