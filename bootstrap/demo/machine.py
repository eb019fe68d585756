"""A throwaway systemd machine: Debian bookworm's systemd 252 booted with ``systemd-nspawn``.

Root filesystem: ``debootstrap`` once per cache key (suite, variant, mirror, package list), kept
as ``base-KEY.tar.zst`` in a cache directory, then customised by
``images/demo/machine/customize.sh`` (units that cannot work in a container masked, a oneshot
that remounts the cgroup hierarchies read-write for runc, short stop timeouts, a volatile
journal) and kept as ``rootfs-KEY.tar`` (the key also covers every file under
``images/demo/machine/``). Both are built under an exclusive flock on ``CACHE/.lock``;
concurrent builders wait and reuse the result. :func:`rootfs_tarball`.

A :class:`Machine` lives in ``RUNTIME_DIR/NAME-XXXXXXXX/`` (``rootfs/`` and ``console.log``).
:meth:`Machine.boot` starts ``systemd-nspawn --boot`` **detached** (its own session, output to
the console log) so the machine outlives the process that booted it, sharing the host's network
(or, with ``private_network``, in a network namespace of its own: :mod:`bootstrap.demo.netns`),
with the given bind mounts, and waits until ``systemctl is-system-running`` inside says
``running`` or ``degraded``.

Cgroups: for every cgroup hierarchy the booting process is in (v1 controllers, the named
``systemd`` one, the unified v2 one) the machine gets a directory ``<that cgroup>/NAME``, and
nspawn is started inside those before it execs, so it never touches cgroups it does not own
(otherwise it moves the host's PID 1 into ``init.scope``). Commands run inside with
:meth:`Machine.run` first join an *exec* cgroup inside the machine's own tree, so a ``runc`` they
start derives its cgroups inside the machine. Teardown (:meth:`Machine.destroy`) kills only
processes found in the machine's cgroup directories and removes only those directories.

:meth:`Machine.record` / :meth:`Machine.from_record` turn a booted machine into a JSON document
and back, so another process can find, enter and tear down a machine booted earlier.

Every failure is a :class:`MachineError` (exit 5): a one-line message and hint, and ``details``
(the console tail, failed units, journal) for whoever wants to show more.
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
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap import process
from bootstrap.demo.netns import NETNS_DIR, PrivateNetwork
from bootstrap.demo.netns import remove_stale as remove_stale_netns
from bootstrap.demo.oci import hash_tree
from bootstrap.errors import SystemdError
from bootstrap.fsutil import fsync_dir, remove_tree
from bootstrap.locks import flocked

log = logging.getLogger(__name__)

NODEROOT = Path(__file__).resolve().parents[2] / "images" / "demo" / "machine"
"""The machine's customisation: ``customize.sh`` and the ``overlay/`` tree it copies in
(``images/demo/machine/`` in the source checkout the demo runs from)."""
CUSTOMIZE = NODEROOT / "customize.sh"
OVERLAY = NODEROOT / "overlay"

SUITE = "bookworm"
VARIANT = "minbase"
MIRROR = "http://deb.debian.org/debian"
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "runc",
    "catatonit",
    "iproute2",
    "procps",
    "python3",
    "python3-venv",
    "libgirepository-1.0-1",
    "gir1.2-glib-2.0",
    "libcairo2",
)
"""What the machine needs: systemd and D-Bus, runc and catatonit (the system containers' init),
and Python 3.11 plus the GObject libraries so a venv made from the host's ``/usr/bin/python3``
(with PyGObject + pydbus) runs inside."""

MACHINE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_FS = Path("/sys/fs/cgroup")
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")
NSPAWN_LOCKS = Path("/run/systemd/nspawn/locks")
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
BUILD_LOCK_TIMEOUT = 1800.0
DEBOOTSTRAP_TIMEOUT = 1800.0
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
RECORD_VERSION = 1

# Write this shell's pid into each cgroup.procs file named before "--", then exec the rest: the
# process that execs nsenter is already in the right cgroups (a failure shows on stderr).
_JOIN_AND_EXEC = (
    'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
)
# The same, but start the rest detached: a session of its own (setsid execs in place, as the
# background child is no process-group leader), stdio on the log file; print its pid.
_JOIN_AND_SPAWN = (
    'log=$1; shift; while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; '
    'setsid "$@" </dev/null >>"$log" 2>&1 & echo $!'
)


class MachineError(SystemdError):
    """The machine could not be built, booted, reached or stopped (exit 5). ``details`` holds
    multi-line context (console tail, failed units, journal); it may be empty."""

    def __init__(self, message: str, hint: str = "", details: str = "") -> None:
        super().__init__(message, hint)
        self.details = details


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


def _check(argv: Sequence[str | Path], what: str, timeout: float = 900) -> None:
    proc = process.run(argv, check=False, timeout=timeout, error=MachineError)
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        last = " | ".join(out.strip().splitlines()[-3:]) or "no output"
        raise MachineError(
            f"{what} failed (exit {proc.returncode}): {last}",
            f"command: {shlex.join(str(a) for a in argv)}",
            details=tail(out, 40),
        )


# ---- the cached root filesystem ----------------------------------------------------------------


def base_key() -> str:
    """Cache key of the plain debootstrap result: suite, variant, mirror and package list."""
    spec = {"suite": SUITE, "variant": VARIANT, "mirror": MIRROR, "packages": sorted(PACKAGES)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_key() -> str:
    """Cache key of the customised rootfs: :func:`base_key` and every file under
    :data:`NODEROOT`."""
    h = hashlib.sha256(base_key().encode())
    hash_tree(h, NODEROOT)
    return h.hexdigest()[:16]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tar_into(root: Path, dest: Path, *, zstd: bool) -> None:
    """Write ``root``'s tree as a tarball at ``dest`` (temp + fsync + rename)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        argv = ["tar", "--numeric-owner", "--one-file-system", "-C", str(root), "-cf", str(tmp)]
        if zstd:
            argv.insert(1, "--zstd")
        _check([*argv, "."], f"packing {root}")
        _fsync_file(tmp)
        os.rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dest.parent)


def untar(tarball: Path, dest: Path) -> None:
    """Unpack ``tarball`` (``.zst`` by name) into the existing directory ``dest``."""
    argv = ["tar", "--numeric-owner", "-C", str(dest), "-xf", str(tarball)]
    if tarball.name.endswith(".zst"):
        argv.insert(1, "--zstd")
    _check(argv, f"unpacking {tarball}")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return found


def remove_mounted_tree(path: Path) -> None:
    """Remove ``path`` recursively, first detaching anything mounted below it (debootstrap mounts
    /proc etc. in its target) so removal never reaches through a mount. Raises
    :class:`MachineError` when something stays mounted."""
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        process.run(["umount", "-l", point], check=False, error=MachineError)
    left = _mounts_under(path)
    if left:
        raise MachineError(
            f"cannot remove {path}: still mounted below it: {left}", f"umount {left[0]}"
        )
    remove_tree(path)


def _build_base(dest: Path, work_dir: Path, scratch_prefix: str) -> None:
    work = Path(
        tempfile.mkdtemp(prefix=f"{scratch_prefix}-debootstrap-{os.getpid()}-", dir=work_dir)
    )
    argv = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE]
    try:
        root = work / "rootfs"
        for attempt in (1, 2):  # one retry: a mirror hiccup should not fail the build
            try:
                _check([*argv, str(root), MIRROR], "debootstrap", timeout=DEBOOTSTRAP_TIMEOUT)
                break
            except MachineError:
                remove_mounted_tree(root)
                if attempt == 2:
                    raise
                log.info("machine: debootstrap failed; retrying once")
        # The downloaded .debs are half the size and never needed again.
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        _tar_into(root, dest, zstd=True)
    finally:
        remove_mounted_tree(work)


def rootfs_tarball(
    cache_dir: Path,
    *,
    work_dir: Path,
    lock_timeout: float | None = BUILD_LOCK_TIMEOUT,
    scratch_prefix: str = "bsbuild",
) -> Path:
    """Return the cached, customised machine rootfs tarball in ``cache_dir``, building it first
    when missing (in scratch directories ``work_dir/SCRATCH_PREFIX-{build,debootstrap}-PID-*``).

    Built under an exclusive flock on ``cache_dir/.lock`` (concurrent callers wait, then reuse
    it): ``debootstrap`` (cached as ``base-KEY.tar.zst``, keyed by the package list; needs the
    Debian mirror, about a minute) then ``customize.sh ROOTFS overlay`` of :data:`NODEROOT`. Older
    cache files are removed. Raises :class:`MachineError` when a step fails and
    :class:`~bootstrap.errors.BusyError` when the lock is not had within ``lock_timeout``."""
    key = rootfs_key()
    final = cache_dir / f"rootfs-{key}.tar"
    if final.exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    with flocked(cache_dir / ".lock", timeout=lock_timeout, what="the machine rootfs cache"):
        if final.exists():
            return final
        base = cache_dir / f"base-{base_key()}.tar.zst"
        if not base.exists():
            log.info("machine: building the base rootfs with debootstrap (about a minute)")
            started = time.monotonic()
            _build_base(base, work_dir, scratch_prefix)
            log.info("machine: base rootfs built in %.0fs", time.monotonic() - started)
        log.info("machine: customising the rootfs (%s)", CUSTOMIZE)
        work = Path(tempfile.mkdtemp(prefix=f"{scratch_prefix}-build-{os.getpid()}-", dir=work_dir))
        try:
            root = work / "rootfs"
            root.mkdir()
            untar(base, root)
            _check(["sh", str(CUSTOMIZE), str(root), str(OVERLAY)], str(CUSTOMIZE))
            _tar_into(root, final, zstd=False)
        finally:
            remove_mounted_tree(work)
        for old in cache_dir.iterdir():
            if old not in (final, base) and old.name.startswith(("rootfs-", "base-")):
                old.unlink(missing_ok=True)
    return final


# ---- cgroups -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and this process's cgroup in it."""

    controllers: str  # as in /proc/self/cgroup: "cpuset", "name=systemd", "" for v2
    mountpoint: Path
    own: str  # this process's cgroup path, e.g. "/" or "/process_api/abc"

    @property
    def is_cpuset(self) -> bool:
        return "cpuset" in self.controllers.split(",")

    def dir(self, cgroup: str) -> Path:
        return self.mountpoint / cgroup.lstrip("/")


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted at or under /sys/fs/cgroup that this process belongs to
    (hybrid: the v1 controllers, ``name=systemd`` and ``unified``; pure v2: the one at
    /sys/fs/cgroup, a layout not tried on a machine yet). Raises :class:`MachineError` for a
    v1/hybrid layout without a ``name=systemd`` hierarchy (nspawn needs one)."""
    mounts: list[tuple[set[str], str, Path]] = []  # (super options, fs type, mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, superopts = fields[sep + 1], fields[sep + 3]
            point = Path(fields[4])
            if fstype in ("cgroup", "cgroup2") and CGROUP_FS in (point, point.parent):
                if fields[3] != "/":
                    raise MachineError(
                        f"cgroup hierarchy {point} is a bind mount of {fields[3]}",
                        "run on a host whose /sys/fs/cgroup hierarchies are mounted whole",
                    )
                mounts.append((set(superopts.split(",")), fstype, point))
    found = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for opts, fstype, point in mounts:
                if (not ctrls and fstype == "cgroup2") or (
                    ctrls and fstype == "cgroup" and set(ctrls.split(",")) <= opts
                ):
                    found.append(Hierarchy(ctrls, point, path))
                    break
    pure_v2 = len(found) == 1 and found[0].controllers == "" and found[0].mountpoint == CGROUP_FS
    if not pure_v2 and not any(h.controllers == "name=systemd" for h in found):
        raise MachineError(
            "no name=systemd cgroup hierarchy under /sys/fs/cgroup",
            "mount one: mkdir /sys/fs/cgroup/systemd && "
            "mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd",
        )
    return found


def cgroup_of(pid: int) -> dict[str, str]:
    """``/proc/PID/cgroup`` as {controllers: path}."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            out[ctrls] = path
    return out


def make_cgroup(path: Path, *, cpuset: bool) -> None:
    """Create the cgroup ``path`` (fine if it exists); a v1 cpuset cgroup gets its parent's
    ``cpuset.cpus``/``cpuset.mems`` (it takes no task before it has them)."""
    path.mkdir(exist_ok=True)
    if cpuset:
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if not (path / knob).read_text().strip():
                (path / knob).write_text((path.parent / knob).read_text())


def procs(path: Path) -> list[int]:
    """The pids in cgroup ``path`` (empty when it does not exist)."""
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def _subtree(path: Path) -> list[Path]:
    """``path`` and every cgroup below it, deepest first."""
    if not path.is_dir():
        return []
    dirs = [Path(d) for d, _, _ in os.walk(path)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def kill_cgroup_trees(roots: Sequence[Path], timeout: float = 10) -> None:
    """SIGKILL every process in the cgroups below ``roots`` until none is left (zombies leave
    cgroup.procs when they exit, so an empty cgroup.procs means gone). Raises
    :class:`MachineError` when some survive ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {pid for root in roots for d in _subtree(root) for pid in procs(d)}
        pids.discard(os.getpid())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise MachineError(
                f"processes {sorted(pids)} survive SIGKILL in {[str(r) for r in roots]}",
                "look for processes stuck in the kernel (state D)",
            )
        time.sleep(0.05)


def remove_cgroup_tree(root: Path, *, keep_root: bool = False, timeout: float = 10) -> None:
    """rmdir ``root`` and every cgroup below it, deepest first (``keep_root``: only those
    below). Raises :class:`MachineError` when one stays busy for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for d in _subtree(root):
        if keep_root and d == root:
            continue
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise MachineError(
                        f"cannot remove cgroup {d}: {exc}; procs {procs(d)}",
                        "kill the processes left in it, then remove it with rmdir",
                    ) from exc
                time.sleep(0.05)


# ---- processes ---------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (``kill -0`` calls a zombie alive)."""
    if pid <= 0:
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return not any(line.startswith("State:\tZ") for line in status.splitlines())


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                kids += [
                    int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return kids


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before their children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def _ns_pids(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(p) for p in line.split()[1:]]
    return []


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def remove_nspawn_leftovers(name: str, rootfs: Path | None) -> None:
    """Remove what systemd-nspawn leaves in the host's /run for machine ``name`` booted from
    ``rootfs``: its propagation directory (nspawn does not delete it when /run is no tmpfs) and
    its image lock file (left when nspawn was killed)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(NSPAWN_PROPAGATE / name)
    if rootfs is not None:
        with contextlib.suppress(FileNotFoundError):
            st = rootfs.stat()
            (NSPAWN_LOCKS / f"inode-{st.st_dev}:{st.st_ino}").unlink()


# ---- the machine -------------------------------------------------------------------------------

Bind = tuple[str, str]
"""A bind mount: (host path, path in the machine)."""


class Machine:
    """A systemd machine in ``workdir/rootfs``, booted (or bootable) with systemd-nspawn.

    Construct with :meth:`create` (a fresh work directory) or :meth:`from_record`; then
    :meth:`extract` a rootfs tarball and :meth:`boot`. ``binds``/``ro_binds`` are extra
    ``--bind``/``--bind-ro`` mounts. ``exec_cgroup`` names the cgroup inside the machine's tree
    that :meth:`run` joins. ``cgroups`` are the machine's own cgroup directories, one per
    hierarchy (``controllers`` in the same order).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        binds: Sequence[Bind] = (),
        ro_binds: Sequence[Bind] = (),
        exec_cgroup: str = "exec",
        private_network: bool = False,
    ) -> None:
        if not NAME_RE.fullmatch(name):
            raise MachineError(
                f"invalid machine name {name!r}", "use letters, digits and '-' (at most 63)"
            )
        self.name = name
        self.workdir = workdir
        self.binds: list[Bind] = list(binds)
        self.ro_binds: list[Bind] = list(ro_binds)
        self.exec_cgroup = exec_cgroup
        own = hierarchies()
        self.controllers = [h.controllers for h in own]
        self.mountpoints = [h.mountpoint for h in own]
        self.cgroups = [h.dir(h.own) / name for h in own]
        self.nspawn_pid = 0
        self.pid = 0  # the machine's init (systemd), as seen from the host
        self.exec_cgroups: list[Path] = []
        self.boot_seconds: list[float] = []  # wall time of each boot() until "running"
        self.extract_seconds = 0.0
        #: with a private network: the network namespace (named as the machine) it boots in
        self.network: PrivateNetwork | None = PrivateNetwork(name) if private_network else None

    @classmethod
    def create(
        cls,
        name: str,
        *,
        runtime_dir: Path,
        binds: Sequence[Bind] = (),
        ro_binds: Sequence[Bind] = (),
        exec_cgroup: str = "exec",
        private_network: bool = False,
    ) -> Machine:
        """A machine named ``name`` in a fresh ``runtime_dir/NAME-XXXXXXXX`` directory; with
        ``private_network``, booted in a network namespace of its own (see
        :mod:`bootstrap.demo.netns`) instead of sharing the host's."""
        runtime_dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=runtime_dir))
        return cls(
            name,
            workdir,
            binds=binds,
            ro_binds=ro_binds,
            exec_cgroup=exec_cgroup,
            private_network=private_network,
        )

    @property
    def rootfs(self) -> Path:
        return self.workdir / "rootfs"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def __repr__(self) -> str:
        return f"<Machine {self.name} pid={self.pid} running={self.running}>"

    # -- record --------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """A JSON-able description of this machine for :meth:`from_record`."""
        return {
            "version": RECORD_VERSION,
            "name": self.name,
            "workdir": str(self.workdir),
            "rootfs": str(self.rootfs),
            "nspawn_pid": self.nspawn_pid,
            "pid": self.pid,
            "binds": [list(b) for b in self.binds],
            "ro_binds": [list(b) for b in self.ro_binds],
            "exec_cgroup": self.exec_cgroup,
            "cgroups": [str(c) for c in self.cgroups],
            "controllers": self.controllers,
            "mountpoints": [str(p) for p in self.mountpoints],
            "exec_cgroups": [str(c) for c in self.exec_cgroups],
            "bus_address": self.bus_address if self.pid else None,
            "netns": self.network.name if self.network is not None else None,
        }

    @classmethod
    def from_record(cls, doc: Mapping[str, Any]) -> Machine:
        """The machine described by ``doc`` (from :meth:`record`). Raises :class:`MachineError`
        when the document is not such a description."""
        try:
            if doc.get("version") != RECORD_VERSION:
                raise ValueError(f"unknown record version {doc.get('version')!r}")
            m = cls.__new__(cls)
            m.name = str(doc["name"])
            if not NAME_RE.fullmatch(m.name):
                raise ValueError(f"invalid name {m.name!r}")
            m.workdir = Path(doc["workdir"])
            m.binds = [(str(a), str(b)) for a, b in doc["binds"]]
            m.ro_binds = [(str(a), str(b)) for a, b in doc["ro_binds"]]
            m.exec_cgroup = str(doc["exec_cgroup"])
            m.cgroups = [Path(c) for c in doc["cgroups"]]
            m.controllers = [str(c) for c in doc["controllers"]]
            m.mountpoints = [Path(p) for p in doc["mountpoints"]]
            m.exec_cgroups = [Path(c) for c in doc["exec_cgroups"]]
            m.nspawn_pid = int(doc["nspawn_pid"])
            m.pid = int(doc["pid"])
            m.boot_seconds = []
            m.extract_seconds = 0.0
            netns = doc.get("netns")
            if netns is not None and netns != m.name:
                raise ValueError(f"network namespace {netns!r} is not the machine's")
            m.network = PrivateNetwork(m.name) if netns else None
        except (KeyError, TypeError, ValueError) as exc:
            raise MachineError(
                f"not a machine record: {exc}", "remove the record and the machine by hand"
            ) from exc
        for c in (*m.cgroups, *m.exec_cgroups):
            if not c.is_relative_to(CGROUP_FS) or m.name not in c.parts:
                raise MachineError(
                    f"machine record names cgroup {c} outside the machine's",
                    "remove the record and the machine by hand",
                )
        return m

    # -- life cycle ------------------------------------------------------------------------------

    def extract(self, tarball: Path) -> None:
        """Unpack the rootfs tarball into :attr:`rootfs`; give it a fresh machine-id and this
        machine's name as hostname."""
        t0 = time.monotonic()
        self.rootfs.mkdir()
        untar(tarball, self.rootfs)
        (self.rootfs / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        (self.rootfs / "etc/hostname").write_text(self.name + "\n")
        self.extract_seconds = time.monotonic() - t0

    def _is_our_nspawn(self) -> bool:
        argv = _cmdline(self.nspawn_pid)
        return (
            bool(argv) and argv[0].endswith("systemd-nspawn") and f"--machine={self.name}" in argv
        )

    @property
    def running(self) -> bool:
        """True while this machine's systemd-nspawn process lives."""
        return alive(self.nspawn_pid) and self._is_our_nspawn()

    def nspawn_argv(self) -> list[str]:
        argv = [
            "systemd-nspawn",
            "--boot",
            f"--directory={self.rootfs}",
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--capability=all",
            "--console=passive",
            "--link-journal=no",
        ]
        if self.network is not None:
            argv.append(f"--network-namespace-path={self.network.path}")
        for opt, binds in (("--bind", self.binds), ("--bind-ro", self.ro_binds)):
            for src, dst in binds:
                argv.append(f"{opt}={src}:{dst}")
        return argv

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot :attr:`rootfs` detached (again, for a reboot) and wait until systemd inside says
        "running" or "degraded"; sets :attr:`pid`. Raises :class:`MachineError` (``details``:
        console tail, failed units, jobs, journal) on timeout or when nspawn exits; the caller
        tears the machine down."""
        if self.running:
            raise MachineError(f"machine {self.name} is already running", "power it off first")
        t0 = time.monotonic()
        for d, ctrls in zip(self.cgroups, self.controllers, strict=True):
            if d.exists():  # left over from the previous boot: empty it
                kill_cgroup_trees([d])
                remove_cgroup_tree(d, keep_root=True)
            make_cgroup(d, cpuset="cpuset" in ctrls.split(","))
        if self.network is not None and not self.network.path.exists():
            self.network.create()
        argv = self.nspawn_argv()
        joins = [str(d / "cgroup.procs") for d in self.cgroups]
        env = {"PATH": MACHINE_PATH, "SYSTEMD_SECCOMP": "0", "LANG": "C.UTF-8"}
        with open(self.console_log, "ab") as console:
            console.write(
                f"==== boot at {time.strftime('%H:%M:%S')}: {shlex.join(argv)}\n".encode()
            )
        spawned = process.run(
            ["sh", "-c", _JOIN_AND_SPAWN, "sh", str(self.console_log), *joins, "--", *argv],
            env=env,
            timeout=30,
            error=MachineError,
            hint="systemd-nspawn is in the systemd-container package",
        )
        self.nspawn_pid = int(spawned.stdout.split()[-1])
        self.pid = 0
        self.exec_cgroups = []
        self._wait_running(time.monotonic() + timeout, timeout)
        self._make_exec_cgroups()
        self.boot_seconds.append(time.monotonic() - t0)

    def _find_init(self) -> int:
        for kid in children(self.nspawn_pid):
            ns = _ns_pids(kid)
            if len(ns) > 1 and ns[-1] == 1:
                return kid
        return 0

    def _state(self) -> str:
        try:
            proc = self._exec(
                ["systemctl", "is-system-running"], join=False, check=False, timeout=10
            )
        except MachineError:
            return "(systemctl is-system-running timed out)"
        return proc.stdout.decode(errors="replace").strip() or "(no answer)"

    def _wait_running(self, deadline: float, timeout: float) -> None:
        state = "(no init yet)"
        while True:
            if not alive(self.nspawn_pid):
                raise MachineError(
                    f"systemd-nspawn for {self.name} exited during boot",
                    f"see {self.console_log}",
                    details=f"console:\n{self.console(40)}",
                )
            if not self.pid:
                self.pid = self._find_init()
            if self.pid and Path(f"/proc/{self.pid}/exe").resolve().name == "systemd":
                state = self._state()
                if state in ("running", "degraded"):
                    return
                if state == "maintenance":
                    break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        details = []
        if self.pid:
            for title, argv in (
                ("systemctl --failed", ["systemctl", "--failed", "--no-pager", "--no-legend"]),
                ("systemctl list-jobs", ["systemctl", "list-jobs", "--no-pager", "--no-legend"]),
                ("journal", ["journalctl", "--boot", "--no-pager", "-n", "30"]),
            ):
                with contextlib.suppress(MachineError):
                    out = self._exec(argv, join=False, check=False, timeout=10).stdout
                    details.append(f"{title}:\n{out.decode(errors='replace')}")
        details.append(f"console:\n{self.console(40)}")
        raise MachineError(
            f"machine {self.name} did not come up within {timeout:g}s (state {state!r})",
            f"see {self.console_log}",
            details="\n".join(details),
        )

    def _make_exec_cgroups(self) -> None:
        """Create the exec cgroup in the machine's root cgroup of every hierarchy (the init's
        cgroup without ``/init.scope``) for :meth:`run` to join."""
        init = cgroup_of(self.pid)
        self.exec_cgroups = []
        for d_own, ctrls, mountpoint in zip(
            self.cgroups, self.controllers, self.mountpoints, strict=True
        ):
            path = init[ctrls]
            if path.endswith("/init.scope"):
                path = path[: -len("/init.scope")]
            d = mountpoint / path.lstrip("/")
            if not d.is_relative_to(d_own):
                raise MachineError(
                    f"machine init is in {d}, outside the machine's cgroup {d_own}",
                    "the host's cgroup setup moved it; this machine cannot be managed",
                )
            make_cgroup(d / self.exec_cgroup, cpuset="cpuset" in ctrls.split(","))
            self.exec_cgroups.append(d / self.exec_cgroup)

    def wait_stopped(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for systemd-nspawn to exit; True when it did."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def poweroff(self, timeout: float = STOP_TIMEOUT) -> None:
        """``systemctl poweroff`` inside; wait for systemd-nspawn to exit. Processes left running
        in the exec cgroup (not systemd's; a container pid 1 ignoring SIGTERM would hold the
        shutdown) are SIGKILLed first. Raises :class:`MachineError` (after killing the machine)
        when it does not exit within ``timeout``."""
        if not self.running:
            return
        kill_cgroup_trees(self.exec_cgroups)
        self._exec(["systemctl", "--no-block", "poweroff"], join=False, check=False, timeout=30)
        if not self.wait_stopped(timeout):
            self.kill()
            raise MachineError(
                f"machine {self.name} did not power off within {timeout:g}s; killed it",
                "look at the console log and the units that block shutdown",
                details=f"console:\n{self.console(30)}",
            )

    def kill(self) -> None:
        """SIGKILL systemd-nspawn and everything in the machine's cgroups."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.nspawn_pid, signal.SIGKILL)
        kill_cgroup_trees(self.cgroups)
        self.wait_stopped(10)

    def destroy(self) -> None:
        """Power off (kill when that hangs), kill whatever is left in the machine's cgroups,
        remove those cgroups deepest first, nspawn's leftovers in /run and the work directory.
        Safe to call twice. Raises :class:`MachineError` for the first thing that failed, after
        doing all the rest."""
        errors: list[MachineError] = []
        try:
            self.poweroff()
        except MachineError as exc:
            errors.append(exc)
            self.kill()
        try:
            kill_cgroup_trees(self.cgroups)
            for d in self.cgroups:
                remove_cgroup_tree(d)
        except MachineError as exc:
            errors.append(exc)
        remove_nspawn_leftovers(self.name, self.rootfs)
        if self.network is not None:
            try:
                self.network.destroy()
            except SystemdError as exc:
                errors.append(MachineError(exc.message, exc.hint))
        try:
            remove_mounted_tree(self.workdir)
        except MachineError as exc:
            errors.append(exc)
        if errors:
            first = errors[0]
            raise MachineError(
                first.message, first.hint, "\n".join(e.details or e.message for e in errors)
            )

    # -- inside ----------------------------------------------------------------------------------

    def nsenter_argv(self, argv: Sequence[str], *, join: bool = True) -> list[str]:
        """The host argv running ``argv`` inside the machine (all its namespaces, its root and
        working directory), after joining the exec cgroup when ``join``."""
        if not self.pid:
            raise MachineError(f"machine {self.name} is not booted", "boot it first")
        joins = [str(d / "cgroup.procs") for d in self.exec_cgroups] if join else []
        return [
            "sh", "-c", _JOIN_AND_EXEC, "sh", *joins, "--",
            "nsenter", f"--target={self.pid}", "--all", "--root", "--wd", "--", *argv,
        ]  # fmt: skip

    @staticmethod
    def exec_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The clean environment of commands run inside (PATH, LANG, HOME, TERM) plus ``env``."""
        full = {"PATH": MACHINE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
        full.update(env or {})
        return full

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 120,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        join: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside the machine with :meth:`exec_env` and capture its output. With
        ``check``, a non-zero exit raises :class:`MachineError` quoting stderr's last lines; a
        timeout always raises it. ``on_line`` gets each stderr line as it is written."""
        return self._exec(
            argv, check=check, timeout=timeout, env=env, input=input, join=join, on_line=on_line
        )

    def _exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float | None = 120,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        join: bool = True,
        on_line: Callable[[str], None] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        proc = process.run(
            self.nsenter_argv(argv, join=join),
            check=False,
            env=self.exec_env(env),
            input=input,
            timeout=timeout,
            on_line=on_line,
            error=MachineError,
            hint=f"in machine {self.name}: {shlex.join(argv)}",
        )
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            last = " | ".join(err.strip().splitlines()[-3:]) or "no output on stderr"
            raise MachineError(
                f"in machine {self.name}: {shlex.join(argv)} exited {proc.returncode}: {last}",
                f"look inside: {shlex.join(self.enter_argv())}",
                details=f"stdout:\n{tail(proc.stdout.decode(errors='replace'), 40)}\n"
                f"stderr:\n{tail(err, 40)}",
            )
        return proc

    def enter_argv(self) -> list[str]:
        """A command a user can type to get a shell inside the machine."""
        return ["nsenter", f"--target={self.pid}", "--all", "--root", "--wd", "--", "/bin/bash"]

    @property
    def bus_address(self) -> str:
        """The machine's system bus, reachable from the host (D-Bus address)."""
        return f"unix:path=/proc/{self.pid}/root/run/dbus/system_bus_socket"

    def console(self, lines: int = 40) -> str:
        """The last ``lines`` of the machine's console output (all boots)."""
        try:
            text = self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return tail(text.replace("\r", ""), lines)


# ---- orphans -----------------------------------------------------------------------------------


def reap_orphans(prefix: str, runtime_dir: Path) -> list[str]:
    """Tear down machines named ``PREFIX-<owner pid>-<6 hex>`` whose owner process is gone
    (killed before its teardown): kill the processes in their cgroups, remove those cgroups,
    their work directories in ``runtime_dir`` and nspawn's leftovers. Machines of a live owner
    are never touched. Returns the names reaped."""
    name_re = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]{{6}}$")
    workdir_re = re.compile(rf"^{re.escape(prefix)}-(?:build-|debootstrap-)?(\d+)-")
    stale: dict[str, list[Path]] = {}
    for h in hierarchies():
        for top, dirs, _ in os.walk(h.mountpoint):
            depth = len(Path(top).relative_to(h.mountpoint).parts)
            for d in dirs:
                m = name_re.match(d)
                if m and not alive(int(m.group(1))):
                    stale.setdefault(d, []).append(Path(top) / d)
            if depth >= 2:
                dirs.clear()  # machine dirs sit at most 3 levels down (memory/process_api/X/...)
            else:
                dirs[:] = [d for d in dirs if not name_re.match(d)]
    for roots in stale.values():
        kill_cgroup_trees(roots)
        for root in roots:
            remove_cgroup_tree(root)
    if runtime_dir.is_dir():
        for workdir in runtime_dir.iterdir():
            m = workdir_re.match(workdir.name)
            if m and not alive(int(m.group(1))):
                remove_nspawn_leftovers(workdir.name[: -len("-xxxxxxxx")], workdir / "rootfs")
                remove_mounted_tree(workdir)
                stale.setdefault(workdir.name, [])
    with contextlib.suppress(FileNotFoundError):
        for ns in NETNS_DIR.iterdir():
            m = name_re.match(ns.name)
            if m and not alive(int(m.group(1))):
                remove_stale_netns([ns.name])
                stale.setdefault(ns.name, [])
    with contextlib.suppress(FileNotFoundError):
        for propagate in NSPAWN_PROPAGATE.iterdir():
            m = name_re.match(propagate.name)
            if m and not alive(int(m.group(1))):
                remove_nspawn_leftovers(propagate.name, None)
                stale.setdefault(propagate.name, [])
    return sorted(stale)


def random_name(prefix: str, *, owner: int | None = None) -> str:
    """``PREFIX-<hex6>``, or ``PREFIX-<owner pid>-<hex6>`` (reapable by :func:`reap_orphans`)."""
    if owner is None:
        return f"{prefix}-{secrets.token_hex(3)}"
    return f"{prefix}-{owner}-{secrets.token_hex(3)}"
