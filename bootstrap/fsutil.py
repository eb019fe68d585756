"""Durable file-system writes: temp file + fsync + rename, and removal of partial results."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PRIVATE_DIR = 0o700
"""The mode of the store's and the state's directories: root's alone, whatever the umask (as
containers/storage keeps its root). Containers reach their files through mounts made by root
(the overlay's lower dirs, runc's pivot into the rootfs), never by walking these paths."""


def make_dirs(path: str | Path, mode: int = PRIVATE_DIR) -> Path:
    """``mkdir -p path`` where every directory created gets exactly ``mode``, whatever the
    umask (``Path.mkdir(parents=True)`` gives parents the umask's mode, 0777 under umask 000).
    Directories that exist are left as they are (see :func:`make_private`). Returns ``path``;
    raises the OSError of a component that cannot be created."""
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not os.path.isdir(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            if os.path.isdir(d):
                continue  # made by a process racing us; it sets the mode
            raise
        os.chmod(d, mode)  # exactly: the umask may have taken bits away
    return path


def make_private(path: str | Path) -> Path:
    """:func:`make_dirs` with :data:`PRIVATE_DIR`, and a directory that exists, is ours and is
    open to others (made by an older version, or by hand) is closed to them (0700 kept for the
    owner). Returns ``path``."""
    path = make_dirs(path)
    st = os.stat(path)
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o7700 | PRIVATE_DIR)
    return path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` atomically when the block exits cleanly.

    The data goes to a temp file in the same directory, is fsynced, chmod'ed to ``mode`` and
    renamed over ``path``; the directory is fsynced. On an exception the temp file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def remove_tree(path: str | Path) -> None:
    """Remove a file, symlink or directory tree if it exists; tolerate read-only dirs inside."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return

    def _onerror(func: object, p: str, exc_info: object) -> None:
        # a read-only directory (e.g. a 0555 dir from an image) blocks removing its entries
        os.chmod(os.path.dirname(p), 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
            shutil.rmtree(p, onerror=_onerror)
        else:
            os.unlink(p)

    shutil.rmtree(path, onerror=_onerror)
