"""A safe tree under a root: parents checked, never followed through a symlink; metadata restore.

:class:`SafeTree` resolves relative paths inside its root component by component with ``lstat``
(a parent that is a symlink or not a directory is refused, IntegrityError exit 4), creates
missing parents and removes entries. :func:`restore_meta` is the one place that restores a
node's owner, mode, xattrs and times, in the order that keeps each (chown clears setuid, so the
mode follows it; times are last). :func:`syncfs` and :func:`rename_noreplace` flush and place a
finished tree.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from bootstrap.errors import IntegrityError
from bootstrap.fsutil import remove_tree
from bootstrap.image.tarstream import HOSTILE_HINT

log = logging.getLogger(__name__)


class SafeTree:
    """Safe path operations inside ``root``: parents are checked component by component with
    lstat and never followed through a symlink. Caches directories known to be real."""

    def __init__(self, root: str, layer: str) -> None:
        self.root = root
        self.layer = layer
        self.dirs: set[str] = {""}
        self.implicit: list[str] = []
        self.implicit_set: set[str] = set()  # the same, for lookups
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
                self.implicit_set.add(cur)
                self.dirs.add(cur)
                continue
            if stat.S_ISDIR(st.st_mode):
                self.dirs.add(cur)
            elif stat.S_ISLNK(st.st_mode):
                raise IntegrityError(
                    f"layer {self.layer}: entry {entry!r}: parent {cur!r} is a symlink "
                    "(refusing to write through it)",
                    HOSTILE_HINT,
                )
            elif not create:
                return False  # nothing can be below a non-directory: nothing to find there
            else:
                raise IntegrityError(
                    f"layer {self.layer}: entry {entry!r}: parent {cur!r} is not a directory",
                    HOSTILE_HINT,
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


def set_xattrs(target: int | str, xattrs: dict[str, bytes], layer: str, name: str) -> None:
    """Set ``xattrs`` on ``target`` (fd, or path not followed); a namespace the file system or
    this process may not write is skipped with a warning naming ``layer`` and ``name``."""
    follow = not isinstance(target, str)
    for key, value in xattrs.items():
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
                log.warning("layer %s: %s: xattr %s not applied: %s", layer, name, key, exc)
            else:
                raise


def copy_xattrs(src: str, dst: int | str) -> None:
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


def syncfs(path: str | Path) -> None:
    """Flush the file system holding ``path`` (one call instead of an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing an (empty) ``dst``."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    noreplace = 1  # RENAME_NOREPLACE
    res = libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace)
    if res != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):  # file system without RENAME_NOREPLACE
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
            os.rename(src, dst)
            return
        raise OSError(err, os.strerror(err), str(dst))


def restore_meta(
    target: int | str,
    *,
    owner: tuple[int, int] | None,
    mode: int | None,
    times_ns: tuple[int, int],
    xattrs: Callable[[int | str], None] | None = None,
) -> None:
    """Give ``target`` (an open fd, or a path whose parents are checked and which is never
    followed) its ``owner`` (uid, gid; None: left as is), permission ``mode`` (None for a
    symlink, whose mode means nothing), extended attributes (``xattrs(target)`` sets them) and
    (atime, mtime) in nanoseconds, in that order: chown clears setuid/setgid, so the mode comes
    after it, and the times come last. OSError propagates."""
    if isinstance(target, int):
        if owner is not None:
            os.fchown(target, *owner)
        if mode is not None:
            os.fchmod(target, mode)
        if xattrs is not None:
            xattrs(target)
        os.utime(target, ns=times_ns)
        return
    if owner is not None:
        os.chown(target, *owner, follow_symlinks=False)
    if mode is not None:
        os.chmod(target, mode)  # the node itself is not a symlink (checked by the caller)
    if xattrs is not None:
        xattrs(target)
    os.utime(target, ns=times_ns, follow_symlinks=False)
