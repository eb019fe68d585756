"""The OCI runtime ``config.json`` of a system container.

:func:`prepare` builds a config from the image config (``args`` = Entrypoint + Cmd, ``env``,
``cwd``, the user) and merges the definition's template over it; :func:`finalize` resolves the
image's user against the checked-out rootfs (its ``/etc/passwd`` and ``/etc/group``, never the
host's) once the rootfs exists.

Defaults of the generated config: read-only rootfs (``rootfs/``, the deployment's overlay mount or
its own checkout), the host network (no network namespace; system containers are host
daemons) with the host's ``/etc/resolv.conf`` and ``/etc/hosts`` bound read-only, its own pid,
ipc, uts and mount namespaces, tmpfs on ``/run`` and ``/tmp``, Docker's default capabilities,
``noNewPrivileges``, no ``rlimits`` (limits come from the unit) and no ``cgroupsPath`` (runc's
cgroupfs driver puts the container below the unit's delegated cgroup).

The template merge is JSON Merge Patch (RFC 7386: objects merge recursively, ``null`` removes a
key, anything else replaces), except that ``process.env`` merges by variable name and
``mounts`` by destination. A template mount that binds a host directory over a generated mount's
parent (``/dev``, ``/sys``, ``/etc``: a host daemon that sees the node's tree) drops the
generated mounts below it that the template does not name itself (``/dev/pts``, ``/dev/mqueue``,
``/etc/resolv.conf``...), as Podman does for a user's ``-v /dev:/dev``: the host's are already
there, and mounting over them fails (``mqueue``: busy) or hides the host's. Capability lists
are then cut to the bounding set of this process (runc fails on a capability the bounding set
lacks); the dropped ones are logged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.errors import UsageError
from bootstrap.image.api import ImageConfig

log = logging.getLogger(__name__)

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_DB_SIZE = 4 << 20

#: Capability numbers as in linux/capability.h.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

#: Docker's default capability set.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

DEFAULT_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    },
    {
        "destination": "/dev/mqueue",
        "type": "mqueue",
        "source": "mqueue",
        "options": ["nosuid", "noexec", "nodev"],
    },
    {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    },
    {
        "destination": "/sys/fs/cgroup",
        "type": "cgroup",
        "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
    },
    {
        "destination": "/run",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=755"],
    },
    {
        "destination": "/tmp",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=1777"],
    },
]
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts")
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


@dataclass(frozen=True)
class PreparedConfig:
    """A merged config before the rootfs exists. ``image_user`` is the image's ``User`` still
    to resolve in the rootfs (None when the template set ``process.user`` itself)."""

    document: Mapping[str, Any]
    image_user: str | None

    @property
    def host_network(self) -> bool:
        """True when the container shares the host's network namespace."""
        return not _has_namespace(self.document, "network")

    @property
    def host_pid(self) -> bool:
        """True when the container shares the host's pid namespace."""
        return not _has_namespace(self.document, "pid")

    @property
    def readonly(self) -> bool:
        """True when the rootfs is mounted read-only."""
        return bool(self.document.get("root", {}).get("readonly", False))


def prepare(
    image: ImageConfig,
    *,
    hostname: str,
    template: Mapping[str, Any] | None = None,
    where: str = "config.json.template",
    bounding: Sequence[str] | None = None,
) -> PreparedConfig:
    """The image's config with ``template`` (a parsed config.json.template, or None) merged over.

    Raises :class:`UsageError` (naming ``where``) when the result is not a usable config: no
    process args (the image has no Entrypoint/Cmd and the template gives none), or a field of
    the wrong type."""
    base = base_config(image, hostname=hostname)
    doc = merge(base, template) if template is not None else base
    if template is not None:
        doc["mounts"] = _drop_shadowed(base.get("mounts", []), doc.get("mounts"), template)
    image_user: str | None = image.user
    process = template.get("process") if template is not None else None
    if isinstance(process, dict) and "user" in process:
        image_user = None
    _validate(doc, where)
    asked: set[str] = set()  # what the definition's template names itself
    caps = process.get("capabilities") if isinstance(process, dict) else None
    if isinstance(caps, dict):
        asked = {n for names in caps.values() if isinstance(names, list) for n in names}
    _cut_capabilities(
        doc, bounding if bounding is not None else bounding_capabilities(), hostname, asked
    )
    return PreparedConfig(doc, image_user)


def finalize(prepared: PreparedConfig, rootfs: str | Path) -> dict[str, Any]:
    """The config.json document: ``prepared`` with the image user resolved in ``rootfs``.

    Raises :class:`UsageError` when the image names a user or group its rootfs does not know."""
    doc = copy.deepcopy(dict(prepared.document))
    if prepared.image_user:
        uid, gid, extra = resolve_user(Path(rootfs), prepared.image_user)
        user: dict[str, Any] = {"uid": uid, "gid": gid}
        if extra:
            user["additionalGids"] = extra
        doc["process"]["user"] = user
    return doc


def dumps(doc: Mapping[str, Any]) -> bytes:
    """The config as written to disk (stable key order, trailing newline)."""
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def base_config(image: ImageConfig, *, hostname: str) -> dict[str, Any]:
    """The generated config for ``image`` (see the module docstring); user 0:0 until
    :func:`finalize` resolves the image's user."""
    env = list(image.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    caps = list(DEFAULT_CAPABILITIES)
    mounts = copy.deepcopy(DEFAULT_MOUNTS)
    for path in HOST_FILES:
        if os.path.isfile(path):
            mounts.append(
                {
                    "destination": path,
                    "type": "bind",
                    "source": path,
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
                }
            )
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(image.entrypoint) + list(image.cmd),
            "env": env,
            "cwd": image.working_dir or "/",
            "capabilities": {
                "bounding": list(caps),
                "effective": list(caps),
                "permitted": list(caps),
            },
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def _drop_shadowed(base: list[Any], merged: Any, template: Mapping[str, Any]) -> Any:
    """``merged`` without the generated (``base``) mounts that lie strictly below a
    destination the template binds from the host (see the module docstring)."""
    given = template.get("mounts")
    if not isinstance(merged, list) or not isinstance(given, list):
        return merged
    named = {m.get("destination") for m in given if isinstance(m, dict)}
    binds = [
        str(m["destination"]).rstrip("/")
        for m in given
        if isinstance(m, dict) and m.get("type") == "bind" and isinstance(m.get("destination"), str)
    ]
    generated = {m["destination"] for m in base}

    def shadowed(m: Any) -> bool:
        if not isinstance(m, dict):
            return False
        dest = m.get("destination")
        if dest in named or dest not in generated or not isinstance(dest, str):
            return False
        return any(dest.startswith(b + "/") for b in binds)

    return [m for m in merged if not shadowed(m)]


def merge(base: Any, patch: Any) -> Any:
    """``patch`` merged over ``base`` (see the module docstring); neither is modified."""
    return _merge(base, patch, ())


def _merge(base: Any, patch: Any, path: tuple[str, ...]) -> Any:
    if path == ("process", "env") and isinstance(base, list) and isinstance(patch, list):
        return _merge_keyed(base, patch, lambda e: str(e).partition("=")[0])
    if path == ("mounts",) and isinstance(base, list) and isinstance(patch, list):
        return _merge_keyed(
            base, patch, lambda m: m.get("destination") if isinstance(m, dict) else id(m)
        )
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value, (*path, key))
    return result


def _merge_keyed(base: list[Any], patch: list[Any], key: Any) -> list[Any]:
    out = [copy.deepcopy(x) for x in base]
    index = {key(x): i for i, x in enumerate(out)}
    for item in patch:
        k = key(item)
        if k in index:
            out[index[k]] = copy.deepcopy(item)
        else:
            index[k] = len(out)
            out.append(copy.deepcopy(item))
    return out


def _validate(doc: Mapping[str, Any], where: str) -> None:
    def bad(what: str, hint: str) -> UsageError:
        return UsageError(f"{where}: {what}", hint)

    process = doc.get("process")
    if not isinstance(process, dict):
        raise bad("process must be an object", "see the OCI runtime spec, config.md")
    args = process.get("args")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise bad("process.args must be a list of strings", 'e.g. "args": ["/bin/daemon"]')
    if not args:
        raise UsageError(
            "the image has no Entrypoint or Cmd and the definition gives no process.args",
            "give a definition whose config.json.template sets process.args",
        )
    env = process.get("env", [])
    if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
        raise bad("process.env must be a list of KEY=VALUE strings", 'e.g. ["LANG=C"]')
    if not isinstance(doc.get("mounts", []), list):
        raise bad("mounts must be a list", "see the OCI runtime spec, config.md")
    linux = doc.get("linux", {})
    if not isinstance(linux, dict) or not isinstance(linux.get("namespaces", []), list):
        raise bad("linux.namespaces must be a list", 'e.g. [{"type": "pid"}]')
    root = doc.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str):
        raise bad("root.path must be a string", '"root": {"path": "rootfs", "readonly": true}')
    if root["path"] != "rootfs":
        # the deployment's rootfs (an overlay mount or a checkout) is always its rootfs/
        raise bad(
            f"root.path {root['path']!r} is not the deployment's rootfs",
            'leave root.path out of the template (it is "rootfs"); set only root.readonly',
        )


def _has_namespace(doc: Mapping[str, Any], kind: str) -> bool:
    namespaces = doc.get("linux", {}).get("namespaces", [])
    return any(
        isinstance(n, dict) and n.get("type") == kind and not n.get("path") for n in namespaces
    )


def bounding_capabilities() -> list[str]:
    """Names of the capabilities in this process's bounding set (``CapBnd`` of
    ``/proc/self/status``); all known ones when that cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapBnd:"):
                    mask = int(line.split()[1], 16)
                    return [c for i, c in enumerate(CAPABILITIES) if mask >> i & 1]
    except (OSError, ValueError):
        pass
    return list(CAPABILITIES)


def _cut_capabilities(
    doc: dict[str, Any], bounding: Sequence[str], name: str = "", asked: Iterable[str] = ()
) -> None:
    """Leave out of ``doc``'s capability lists what ``bounding`` (this process's bounding
    set) lacks: runc would fail on it, and no process here can hold it anyway. Said once per
    process (install renders to compare, too), at INFO when the definition's template asked
    for one of them itself (``asked``: its container runs without something it named),
    else at DEBUG (bootstrap's own defaults: nothing a definition relies on)."""
    caps = doc.get("process", {}).get("capabilities")
    if not isinstance(caps, dict):
        return
    allowed = set(bounding)
    dropped: set[str] = set()
    for kind, names in caps.items():
        if isinstance(names, list):
            dropped.update(n for n in names if n not in allowed)
            caps[kind] = [n for n in names if n in allowed]
    if not dropped or (name, frozenset(dropped)) in _REPORTED_CUTS:
        return
    _REPORTED_CUTS.add((name, frozenset(dropped)))
    wanted = sorted(dropped & set(asked))
    them = "it" if len(dropped) == 1 else "them"
    log.log(
        logging.INFO if wanted else logging.DEBUG,
        "%s: runs without %s%s: not in this host's capability bounding set (no process here "
        "can hold %s; runc would not start the container with %s)",
        name or "container",
        " ".join(sorted(dropped)),
        ", which its definition asks for" if wanted else "",
        them,
        them,
    )


_REPORTED_CUTS: set[tuple[str, frozenset[str]]] = set()


# ---- users and groups from the rootfs ----------------------------------------------------------


def resolve_user(rootfs: Path, spec: str) -> tuple[int, int, list[int]]:
    """Resolve an image ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``...) to
    (uid, gid, additional gids) using only ``rootfs``'s ``/etc/passwd`` and ``/etc/group``
    (read without following symlinks out of ``rootfs``).

    A numeric uid absent from passwd gets gid 0, like Docker. Raises :class:`UsageError` for a
    name the rootfs does not know."""
    user, _, group = spec.partition(":")
    passwd = _parse_db(_read_in_root(rootfs, "etc/passwd"), 7)
    groups = _parse_db(_read_in_root(rootfs, "etc/group"), 4)
    uid: int | None = None
    gid = 0
    username: str | None = None
    if user.isdigit():
        uid = int(user)
        for entry in passwd:
            if entry[2] == user:
                username, gid = entry[0], _int(entry[3])
                break
    else:
        for entry in passwd:
            if entry[0] == user:
                username, uid, gid = user, _int(entry[2]), _int(entry[3])
                break
        if uid is None:
            raise UsageError(
                f"image user {user!r} is not in the image's /etc/passwd",
                "fix the image's User, or set process.user in config.json.template",
            )
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [g for g in groups if g[0] == group]
            if not match:
                raise UsageError(
                    f"image group {group!r} is not in the image's /etc/group",
                    "fix the image's User, or set process.user in config.json.template",
                )
            gid = _int(match[0][2])
    extra: list[int] = []
    if username is not None:
        for g in groups:
            members = [m for m in g[3].split(",") if m]
            gg = _int(g[2])
            if username in members and gg != gid and gg not in extra:
                extra.append(gg)
    return uid, gid, extra


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _parse_db(data: bytes | None, fields: int) -> list[list[str]]:
    if data is None:
        return []
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) < fields:
            parts += [""] * (fields - len(parts))
        rows.append(parts)
    return rows


def _read_in_root(root: Path, rel: str, max_links: int = 40) -> bytes | None:
    """Read ``rel`` inside ``root`` as if ``root`` were ``/`` (symlinks resolved within it);
    None when missing, not a regular file, or a symlink loop."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > max_links:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    final = root.joinpath(*resolved)
    try:
        fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(MAX_DB_SIZE)
    finally:
        os.close(fd)
