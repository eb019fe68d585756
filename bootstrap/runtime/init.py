"""An init for system containers: a small pid 1 in front of the entrypoint.

The kernel delivers no signal to a pid namespace's pid 1 that has no handler for it, so an
entrypoint that runs as pid 1 without a SIGTERM handler (a shell script, ``sleep``, many daemons)
ignores the stop's SIGTERM and is only killed by the SIGKILL after ``stopTimeout``. Its orphaned
children also stay zombies, since nothing reaps them. With an init as pid 1 the entrypoint runs
as pid 2: SIGTERM reaches it with its default action, and the init reaps every orphan.

The init is the host's ``catatonit`` (Podman's ``--init``), else ``tini-static`` (Docker's),
or the file ``$BOOTSTRAP_INIT`` names. It must be statically linked (it runs inside the image,
whose libraries are unknown) and is bind-mounted read-only onto a tmpfs of the container
(``/run``, ``/dev`` or ``/tmp``), so nothing is written into the rootfs or the host.

Modes: ``always``, ``never``, and ``auto`` (the default): an init unless the entrypoint already
is one (:data:`KNOWN_INITS` or a name the definition adds) or the container shares the host's pid
namespace (its processes are then not a namespace's pid 1 and orphans go to the host's init).
"""

from __future__ import annotations

import copy
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from bootstrap.errors import SystemdError, UsageError

#: Executable base names that are an init already.
KNOWN_INITS = frozenset(
    {
        "systemd",
        "init",
        "catatonit",
        "tini",
        "tini-static",
        "dumb-init",
        "docker-init",
        "podman-init",
        "s6-svscan",
    }
)
#: Looked up in this order on ``$PATH`` and these directories.
CANDIDATES = ("catatonit", "tini-static")
EXTRA_DIRS = ("/usr/libexec/podman", "/usr/local/bin", "/usr/bin", "/usr/sbin")
#: Base name of the bind mount inside the container.
MOUNT_NAME = ".bootstrap-init"
#: Container directories (tmpfs mounts of the config, in this order) it may be mounted in.
TMPFS_DIRS = ("/run", "/dev", "/tmp")

_PT_INTERP = 3


@dataclass(frozen=True)
class InitBinary:
    """The init to run: host ``path`` and the options it takes before the entrypoint."""

    path: str

    @property
    def options(self) -> tuple[str, ...]:
        """Arguments between the init and the entrypoint (``--`` ends the init's options)."""
        return ("--",)


def find_init(environ: Mapping[str, str] | None = None) -> InitBinary:
    """The init binary: ``$BOOTSTRAP_INIT``, else the first of :data:`CANDIDATES` found.

    Raises :class:`SystemdError` (exit 5) when there is none or it is not a statically linked
    executable (a dynamically linked one cannot run inside an arbitrary image)."""
    env = os.environ if environ is None else environ
    named = env.get("BOOTSTRAP_INIT", "")
    if named:
        path = os.path.abspath(named)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SystemdError(
                f"init {path} ($BOOTSTRAP_INIT) is not an executable file",
                "point $BOOTSTRAP_INIT at catatonit or tini-static, or unset it",
            )
        _check_static(path)
        return InitBinary(path)
    search = os.pathsep.join([env.get("PATH", os.defpath), *EXTRA_DIRS])
    for name in CANDIDATES:
        found = shutil.which(name, path=search)
        if found:
            path = os.path.abspath(found)
            _check_static(path)
            return InitBinary(path)
    raise SystemdError(
        "no init for the container found (catatonit or tini-static)",
        "install one (Debian: apt-get install catatonit), or run without: init never "
        "(manifest.json) or --init never",
    )


def _check_static(path: str) -> None:
    """Raise :class:`SystemdError` unless ``path`` is an ELF executable without an interpreter."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF":
                raise SystemdError(
                    f"init {path} is not an ELF executable",
                    "use catatonit or tini-static (statically linked)",
                )
            is64 = head[4] == 2
            end = "<" if head[5] == 1 else ">"
            if is64:
                (phoff,) = struct.unpack_from(end + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            else:
                (phoff,) = struct.unpack_from(end + "I", head, 28)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError as exc:
        raise SystemdError(f"init {path}: {exc.strerror or exc}", "check the file") from exc
    for i in range(phnum):
        entry = table[i * phentsize : i * phentsize + 4]
        if len(entry) == 4 and struct.unpack(end + "I", entry)[0] == _PT_INTERP:
            raise SystemdError(
                f"init {path} is dynamically linked: it cannot run inside the container",
                "use a statically linked init: catatonit or tini-static",
            )


def entrypoint_is_init(args: Iterable[str], extra: Iterable[str] = ()) -> bool:
    """True when the executable of ``args`` (its base name) is a known init or in ``extra``."""
    argv = list(args)
    if not argv:
        return False
    return os.path.basename(argv[0]) in KNOWN_INITS | set(extra)


def wanted(mode: str, args: Iterable[str], *, host_pid: bool, extra: Iterable[str] = ()) -> bool:
    """Whether an init goes in front of ``args`` under ``mode`` (see the module docstring)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return not host_pid and not entrypoint_is_init(args, extra)


def apply(document: Mapping[str, Any], binary: InitBinary) -> dict[str, Any]:
    """A copy of the config ``document`` running ``binary`` as pid 1 in front of its args.

    The binary is bound read-only at ``DIR/.bootstrap-init`` on the first of :data:`TMPFS_DIRS`
    that is a tmpfs mount of the config. Raises :class:`UsageError` when there is none (the
    template replaced them all)."""
    doc = copy.deepcopy(dict(document))
    mounts = doc.setdefault("mounts", [])
    tmpfs = {
        m.get("destination") for m in mounts if isinstance(m, dict) and m.get("type") == "tmpfs"
    }
    where = next((d for d in TMPFS_DIRS if d in tmpfs), None)
    if where is None:
        raise UsageError(
            "the container has no tmpfs on /run, /dev or /tmp to put its init on",
            "keep one of those tmpfs mounts in config.json.template, or set init never",
        )
    dest = f"{where}/{MOUNT_NAME}"
    mounts.append(
        {
            "destination": dest,
            "type": "bind",
            "source": binary.path,
            "options": ["bind", "ro", "nosuid", "nodev"],
        }
    )
    process = doc["process"]
    process["args"] = [dest, *binary.options, *process["args"]]
    return doc
