"""File locks: context managers over ``fcntl.flock`` (never ``lockf``: flock locks belong to the
open file description, so threads and forked children behave predictably)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bootstrap.errors import BusyError
from bootstrap.fsutil import make_dirs


@contextlib.contextmanager
def flocked(
    path: str | Path,
    *,
    shared: bool = False,
    timeout: float | None = None,
    what: str = "",
) -> Iterator[int]:
    """Hold an flock on ``path`` (created 0644 if missing, its missing parent directories
    0700) for the duration of the block.

    ``shared`` takes a shared (reader) lock, otherwise exclusive. ``timeout`` None waits forever,
    0 fails at once, otherwise polls until the deadline. Raises :class:`BusyError` (exit 6) naming
    ``what`` (or the path) when the lock cannot be had in time. Yields the open descriptor.
    A lock file that exists but cannot be opened for writing (a read-only filesystem) is
    locked through a read-only descriptor. Other failures to open it raise the OSError.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if timeout is None:
            fcntl.flock(fd, mode)
        else:
            deadline = time.monotonic() + timeout
            delay = 0.01
            while True:
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise BusyError(
                            f"{what or path} is locked by another process",
                            "wait for the other bootstrap command to finish, or retry later",
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
        yield fd
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
