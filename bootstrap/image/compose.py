"""Composition: cached layers composed into a checkout or an image tree; overlayfs support.

:func:`checkout` builds an image's rootfs at a new DEST: every layer cached first
(:func:`~bootstrap.image.layercache.ensure_all`), then composed bottom to top in
``DEST.tmp-*`` beside DEST with files of its own (reflinks where supported, else copies;
hardlinks into the cache only with ``hardlink``) and renamed in. :func:`image_tree` composes an
image once in the store from hardlinks into the cache: the read-only lower dir of deployments'
overlay mounts (:func:`overlay_supported` says whether this process can mount one).
Composition replays each layer's record: whiteouts and opaque directories remove what lower
layers put there, implicit parents never overwrite a lower layer's metadata, and a parent that
is a symlink is refused (IntegrityError, exit 4) unless the layer replaces it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootstrap.errors import BootstrapError, BusyError, IntegrityError, UsageError
from bootstrap.fsutil import make_dirs, remove_tree
from bootstrap.image.apply import OPQ, WH, UnpackOptions
from bootstrap.image.layercache import CachedLayer, ensure_all
from bootstrap.image.model import Descriptor, Image
from bootstrap.image.tarstream import HOSTILE_HINT
from bootstrap.image.tree import SafeTree, copy_xattrs, rename_noreplace, restore_meta, syncfs
from bootstrap.locks import flocked
from bootstrap.progress import counted

if TYPE_CHECKING:
    from bootstrap.image.store import Store

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_FICLONE = 0x40049409  # ioctl: share the extents of another file (btrfs, XFS, ...)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}


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


_FILE_COST = 64 * 1024  # one file's creation and metadata, counted as this many bytes copied


def _by_directory(
    jobs: list[tuple[str, str, os.stat_result]], n: int
) -> list[list[tuple[str, str, os.stat_result]]]:
    """``jobs`` in ``n`` parts of about equal cost, each directory's files in one part (two
    threads creating files in one directory wait on its lock)."""
    groups: dict[str, list[tuple[str, str, os.stat_result]]] = {}
    for job in jobs:
        groups.setdefault(job[1].rpartition("/")[0], []).append(job)
    parts: list[list[tuple[str, str, os.stat_result]]] = [[] for _ in range(n)]
    costs = [0] * n
    cost = {d: sum(_FILE_COST + j[2].st_size for j in g) for d, g in groups.items()}
    for d in sorted(groups, key=cost.__getitem__, reverse=True):
        i = costs.index(min(costs))
        parts[i].extend(groups[d])
        costs[i] += cost[d]
    return parts


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


# file systems whose reflinks (FICLONE) serialize on the file system's own locks: two threads
# reflinking at once were slower than one (bench/reflink.py, 20k files: 3.5 s against 3.0 s)
_SERIAL_REFLINK = {"btrfs"}


def _die_with(parent: int) -> None:
    """Have the kernel kill this (forked) process when its parent dies, so a checkout killed
    mid-copy leaves no copier writing into its temp dir after it; end at once when the parent
    is already gone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _child_copy(
    composer: _Composer, part: list[tuple[str, str, os.stat_result]], wfd: int, parent: int
) -> None:
    """In a forked child: copy ``part``, write ``ok COUNT`` or ``err ERRNO FILE MESSAGE`` to
    ``wfd``, and end the process at once (no exit handlers, no flush of the parent's
    buffers). It dies with ``parent``."""
    code = 0
    try:
        _die_with(parent)
        composer.reflinked = 0
        composer._copy_files(part)
        msg = f"ok {composer.reflinked}"
    except OSError as exc:
        msg = f"err {exc.errno or 0} {exc.filename or ''}\0{exc.strerror or exc}"
        code = 1
    except BaseException as exc:  # anything else: reported as an I/O error of the copy
        msg = f"err {errno.EIO} \0{type(exc).__name__}: {exc}"
        code = 1
    try:
        os.write(wfd, msg.encode(errors="replace"))
    finally:
        os._exit(code)


def _reap(
    children: list[tuple[int, int]], composer: _Composer | None = None
) -> list[OSError | None]:
    """Wait for every child of :meth:`_Composer._copy_forked`; return what each reported (None
    for success, adding its reflinks to ``composer``; an OSError for a failure, or for a
    child that ended without a word)."""
    out: list[OSError | None] = []
    for pid, rfd in children:
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := os.read(rfd, 65536):
                chunks.append(chunk)
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        msg = b"".join(chunks).decode(errors="replace")
        if msg.startswith("ok ") and os.waitstatus_to_exitcode(status) == 0:
            if composer is not None:
                composer.reflinked += int(msg[3:] or 0)
            out.append(None)
        elif msg.startswith("err "):
            head, _, text = msg[4:].partition("\0")
            num, _, filename = head.partition(" ")
            out.append(OSError(int(num or errno.EIO), text, filename or None))
        else:
            code = os.waitstatus_to_exitcode(status)
            out.append(OSError(errno.EIO, f"copy process ended with status {code}"))
    return out


def spare_cores() -> int:
    """How many cores a copy-out may use: this one plus each the 1-minute load average
    leaves idle, at most 4. On a machine whose cores are busy a second copier only adds
    contention (measured: ~15% more CPU, no shorter wall time, with the other core taken)."""
    cores = os.cpu_count() or 1
    idle = cores - os.getloadavg()[0]
    return max(1, min(4, cores, 1 + int(idle)))


def fs_type(path: str) -> str:
    """The type of the file system holding ``path`` ("xfs", "btrfs", "tmpfs", ...), from the
    longest mount point above it in /proc/self/mountinfo; "" when that cannot be read."""
    real = os.path.realpath(path)
    best, kind = -1, ""
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                fields, _, rest = line.partition(" - ")
                parts = fields.split()
                if len(parts) < 5 or not rest:
                    continue
                point = parts[4].replace("\\040", " ").replace("\\011", "\t")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) > best:
                    best, kind = len(point), rest.split()[0]
    except OSError:
        return ""
    return kind


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for a moment, for
    every thread); all bits when /proc does not say (every mode is then set explicitly)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777


class _Composer:
    """Builds a rootfs under ``root`` from cached layers, bottom to top."""

    def __init__(self, root: str, options: UnpackOptions, copy: bool, workers: int = 1) -> None:
        """``copy``: every file a file of its own (reflinked where the file system can, copied
        otherwise); else hardlinks into the cache (shared inodes). ``workers``: threads that
        copy a layer's files once its directories exist (the files are independent then)."""
        self.root = root
        self.options = options
        self.copy = copy
        self.workers = max(1, workers)
        self.fork = True  # parts of a layer's copy may run in forked processes
        self.reflink = True  # until the file system refuses one
        self.copy_range = True  # copy_file_range, until it refuses (across file systems)
        self.reflinked = 0
        self.dir_src: dict[str, str] = {}  # dest dir -> cache dir whose metadata it gets
        self.inodes: dict[tuple[int, int], str] = {}  # copy mode: cache inode -> dest path
        self.pending: list[tuple[str, str, os.stat_result]] = []  # this layer's files to copy
        self.pending_links: list[tuple[str, str]] = []  # (first copy, another name of it)
        self.layer_xattrs = True  # this layer's files may carry xattrs to copy
        self.tree = SafeTree(root, "")
        self.empty = True  # nothing composed yet
        # the owner a new node gets here without a chown (None: not known, always chown)
        self.born_owner: tuple[int, int] | None = None
        if os.lstat(root).st_gid == os.getegid():
            self.born_owner = (os.geteuid(), os.getegid())
        # mode bits a new file does not get from open(): special bits, and what the umask
        # takes (all of them under a default ACL, which replaces the umask)
        self.mode_fixup = 0o7000 | _umask()
        try:
            os.getxattr(root, "system.posix_acl_default")
            self.mode_fixup = 0o7777
        except OSError:
            pass

    def layer(self, layer: CachedLayer, name: str) -> None:
        tree = self.tree
        tree.layer = name
        rec = layer.record
        for victim in rec.whiteouts:
            head, _, base = victim.rpartition("/")
            marker = f"{head}/{WH}{base}" if head else WH + base
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
        self.layer_xattrs = rec.xattrs and self.options.xattrs
        self._walk(src_root, "", implicit, name, self.empty)
        self._flush()
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
        marker = head + "/" + OPQ if head else OPQ
        if head and not self._marker_parent(head, marker, layer):
            return
        st = tree.lstat(head)
        if st is None:
            return
        if stat.S_ISLNK(st.st_mode):
            replaced = layer.rootfs / head
            if (
                head not in layer.record.implicit
                and replaced.is_dir()
                and not replaced.is_symlink()
            ):
                return  # this layer replaces it with a directory
            raise IntegrityError(
                f"layer {name}: entry {marker!r}: opaque marker in {head!r}, which is a symlink",
                HOSTILE_HINT,
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
                            HOSTILE_HINT,
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
            if not self.copy:
                os.link(ent.path, dst, follow_symlinks=False)
                continue
            est = ent.stat(follow_symlinks=False)
            if est.st_nlink > 1:  # another name of a file copied in this layer: linked after it
                key = (est.st_dev, est.st_ino)
                first = self.inodes.get(key)
                if first is not None:
                    self.pending_links.append((first, dst))
                    continue
                self.inodes[key] = dst
            if stat.S_ISREG(est.st_mode):
                self.pending.append((ent.path, dst, est))
            else:
                self._copy_node(ent.path, dst, est)

    def _flush(self) -> None:
        """Copy the files the walk of one layer collected (its directories exist now; no two
        files share a destination) on ``workers`` cores, then link the layer's other names of
        those files. The work is split by directory (:func:`_by_directory`). The parts run in
        forked processes when this process has no other thread (the GIL would otherwise
        serialize the per-file Python work), else on threads."""
        jobs, self.pending = self.pending, []
        if len(jobs) < 64 or self.workers == 1:
            self._copy_files(jobs)
        else:
            parts = _by_directory(jobs, self.workers)
            if self.fork and threading.active_count() == 1:
                self._copy_forked(parts)
            else:
                with ThreadPoolExecutor(self.workers, thread_name_prefix="copy") as pool:
                    for fut in [pool.submit(self._copy_files, part) for part in parts]:
                        fut.result()
        links, self.pending_links = self.pending_links, []
        for first, dst in links:
            os.link(first, dst, follow_symlinks=False)
        self.inodes.clear()  # inodes are per layer (each layer's cache dir is its own tree)

    def _copy_forked(self, parts: list[list[tuple[str, str, os.stat_result]]]) -> None:
        """Copy ``parts[0]`` here and every other part in a child process of its own. A child
        reports its reflink count, or its OSError (errno, message, file), through a pipe and
        ends with ``os._exit``; the first error is raised here as that OSError once every child
        has ended. Should this process fail or be interrupted, the children are killed."""
        children: list[tuple[int, int]] = []  # (pid, read end of its pipe)
        me = os.getpid()
        try:
            for part in parts[1:]:
                rfd, wfd = os.pipe()
                pid = os.fork()
                if pid == 0:  # pragma: no cover - the child (its result reaches the parent)
                    os.close(rfd)
                    _child_copy(self, part, wfd, me)
                os.close(wfd)
                children.append((pid, rfd))
            self._copy_files(parts[0])
        except BaseException:
            for pid, _ in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _reap(children)
            raise
        errors = [err for err in _reap(children, self) if err is not None]
        if errors:
            raise errors[0]

    def _copy_files(self, jobs: list[tuple[str, str, os.stat_result]]) -> None:
        for src, dst, st in jobs:
            self._copy_file(src, dst, st)

    def _copy_file(self, src: str, dst: str, st: os.stat_result) -> None:
        """A regular file of its own at ``dst`` with the content and metadata of the cached
        ``src``: a reflink (FICLONE) while the file system takes them, else copy_file_range
        (in-kernel), else read/write. The file is created with its permission bits (never
        setuid/setgid/sticky), so the mode is set again only when the umask took some away,
        it has special bits, or a chown came first (which clears them)."""
        mode = stat.S_IMODE(st.st_mode)
        fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(dst, _CREATE, mode & 0o777)
            try:
                remaining = st.st_size
                if remaining and self.reflink:
                    try:
                        fcntl.ioctl(fd, _FICLONE, fin)
                        remaining = 0
                        self.reflinked += 1  # under the GIL: one bytecode-level increment
                    except OSError as exc:
                        if exc.errno not in _NO_REFLINK:
                            raise
                        self.reflink = False
                while remaining > 0 and self.copy_range:
                    try:
                        n = os.copy_file_range(fin, fd, remaining)
                    except OSError as exc:  # across file systems (EXDEV) and the like
                        if exc.errno not in _NO_REFLINK:
                            raise
                        self.copy_range = False
                        break
                    if n == 0:
                        break
                    remaining -= n
                while remaining > 0:
                    chunk = os.read(fin, min(remaining, _CHUNK))
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    remaining -= len(chunk)
                chown = self.options.same_owner and (st.st_uid, st.st_gid) != self.born_owner
                if chown:
                    os.fchown(fd, st.st_uid, st.st_gid)
                if chown or mode & self.mode_fixup:
                    os.fchmod(fd, mode)
                if self.layer_xattrs:
                    copy_xattrs(src, fd)
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(fd)
        finally:
            os.close(fin)

    def _copy_node(self, src: str, dst: str, st: os.stat_result) -> None:
        """A symlink, FIFO or device node like the cached ``src`` at ``dst``."""
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(dst, 0o600)
        else:
            os.mknod(dst, (mode & ~0o7777) | 0o600, st.st_rdev)
        self._meta(dst, src, st)

    def _meta(
        self, target: int | str, src: str, st: os.stat_result, xattrs: bool | None = None
    ) -> None:
        """Owner, mode, xattrs and times of the cached node ``src`` (stat ``st``) onto
        ``target``, an fd or a path never followed (a symlink keeps its mode). ``xattrs``:
        whether to copy xattrs (default: when the current layer's record says it has any)."""
        if xattrs is None:
            xattrs = self.layer_xattrs
        owner = (st.st_uid, st.st_gid) if self.options.same_owner else None
        restore_meta(
            target,
            owner=owner,
            mode=None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode),
            times_ns=(st.st_atime_ns, st.st_mtime_ns),
            xattrs=(lambda t: copy_xattrs(src, t)) if xattrs else None,
        )

    def _link(self, rel: str, target: str, name: str) -> None:
        tree = self.tree
        if target.startswith(rel + "/"):
            raise IntegrityError(
                f"layer {name}: entry {rel!r}: hardlink target {target!r} is inside the entry "
                "it replaces",
                HOSTILE_HINT,
            )
        tree.parent(rel, rel, create=True)
        present = tree.parent(target, rel, create=False)
        tst = tree.lstat(target) if present else None
        if tst is None or stat.S_ISDIR(tst.st_mode):
            raise IntegrityError(
                f"layer {name}: entry {rel!r}: hardlink target {target!r} "
                + ("does not exist" if tst is None else "is a directory"),
                HOSTILE_HINT,
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
        mtime = int(dev["mtime_ns"])
        restore_meta(
            full,
            owner=(int(dev["uid"]), int(dev["gid"])) if self.options.same_owner else None,
            mode=int(dev["mode"]) & 0o7777,
            times_ns=(mtime, mtime),
        )

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
                self._meta(fd, src, st, self.options.xattrs)
            finally:
                os.close(fd)


# ---- checkout ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckoutResult:
    """A finished checkout: where, of what, and how it was built. ``seconds``: what the
    caller waited: for ``bootstrap checkout`` the whole command since its process started
    (start-up, pull, extraction and copy), for :func:`checkout` itself the call."""

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
            f"{self.dest}: {self.image} ({counted(self.layers, 'layer')}, {extracted}, {how}) "
            f"in {self.seconds:.2f}s"
        )


def _layers(image: Image) -> tuple[tuple[Descriptor, ...], tuple[str, ...]]:
    """``image``'s layer descriptors and diff_ids, one for one; IntegrityError (exit 4) when
    the manifest and the config disagree on how many layers there are."""
    layers, diff_ids = image.manifest.layers, image.config.diff_ids
    if len(layers) != len(diff_ids):
        raise IntegrityError(
            f"{image.name}: manifest has {len(layers)} layers, config {len(diff_ids)} diff_ids",
            "the image is damaged; remove it and pull it again",
        )
    return layers, diff_ids


def check_dest(dest: Path) -> None:
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
    check_dest(dest)
    options = UnpackOptions(devices=devices)
    layers, diff_ids = _layers(image)
    with store.using():
        cached, extracted = ensure_all(store, layers, diff_ids, options)
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
                    workers = spare_cores()
                    if fs_type(str(tmp)) in _SERIAL_REFLINK:
                        workers = 1
                    composer = _Composer(str(tmp), options, not hardlink, workers)
                    for desc, layer in zip(layers, cached, strict=True):
                        composer.layer(layer, desc.digest)
                    composer.finish()
                    syncfs(tmp)
                    try:
                        rename_noreplace(tmp, dest)
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
    layers, diff_ids = _layers(image)
    options = UnpackOptions()
    cached, extracted = ensure_all(store, layers, diff_ids, options)
    make_dirs(tree.parent)
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
            syncfs(tmp)
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
