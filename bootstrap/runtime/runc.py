"""Helpers around the ``runc`` binary: where it is, a container's state, forced removal."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.errors import SystemdError
from bootstrap.process import run

DEFAULT_RUNC = "/usr/sbin/runc"


def runtime_path() -> str:
    """Absolute path of ``runc`` (``$PATH``, then /usr/sbin/runc, /usr/bin/runc).

    Raises :class:`SystemdError` when there is none."""
    for candidate in (shutil.which("runc"), DEFAULT_RUNC, "/usr/bin/runc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise SystemdError("runc not found", "install runc (Debian: apt-get install runc)")


@dataclass(frozen=True)
class ContainerState:
    """What ``runc state`` says about a container: status (``running``, ``stopped``, ...),
    pid of its init, bundle."""

    id: str
    status: str
    pid: int
    bundle: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "pid": self.pid, "bundle": self.bundle}


def state(name: str, runtime: str | None = None) -> ContainerState | None:
    """The container's runc state, or None when runc knows no container ``name``."""
    proc = run([runtime or runtime_path(), "state", name], check=False, timeout=30)
    if proc.returncode != 0:
        return None
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        return None
    return ContainerState(
        id=str(doc.get("id", name)),
        status=str(doc.get("status", "")),
        pid=int(doc.get("pid") or 0),
        bundle=str(doc.get("bundle", "")),
    )


def runs_from(name: str, rootfs: str | Path, runtime: str | None = None) -> bool | None:
    """Whether container ``name``'s pid 1 runs with ``rootfs`` as its root: the same file system
    object (device and inode) as ``/proc/PID/root`` — the overlay mounted for that deployment,
    or the checkout bound as the root. False when runc knows no running container ``name`` or
    another root is seen; None when it cannot be told (``/proc/PID/root`` or ``rootfs`` cannot
    be read, e.g. without privileges)."""
    st = state(name, runtime)
    if st is None or st.status != "running" or st.pid <= 0:
        return False
    try:
        root = os.stat(f"/proc/{st.pid}/root")
        want = os.stat(rootfs)
    except OSError:
        return None
    return (root.st_dev, root.st_ino) == (want.st_dev, want.st_ino)


def delete(name: str, runtime: str | None = None) -> None:
    """``runc delete --force NAME`` when runc knows the container; raises :class:`SystemdError`
    when it cannot remove it."""
    exe = runtime or runtime_path()
    if state(name, exe) is None:
        return
    run(
        [exe, "delete", "--force", name],
        error=SystemdError,
        hint=f"inspect with '{exe} state {name}'",
        timeout=60,
    )
