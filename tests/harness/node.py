"""A real systemd node for tests: Debian bookworm's systemd 252 booted with systemd-nspawn.

A thin test layer over the product's :mod:`bootstrap.demo.machine` (one implementation of the
rootfs cache, the boot, the cgroups and the teardown): :class:`Node` is a
:class:`~bootstrap.demo.machine.Machine` with test conveniences and errors that pytest shows as
test failures. The root filesystem comes from ``debootstrap`` once per cache key and is kept
under ``REPO/.cache/node/`` (see :func:`rootfs_tarball`); every :class:`Node` extracts it into a
fresh directory on tmpfs and boots it with ``systemd-nspawn -b`` in cgroups of its own, sharing
the host's network (so it reaches registries on the host's 127.0.0.1) and with the repository
bound at the same path (so ``REPO/.venv`` runs inside: the venv was made from
``/usr/bin/python3``, which is Python 3.11 both on the host and in the node).

Cgroups: for every cgroup hierarchy the test process is in, the node gets a directory
``<the test process's cgroup>/<node name>`` and ``systemd-nspawn`` is started inside those. Commands
run with :meth:`Node.run` first join a ``harness`` cgroup inside the node's own tree, so a
``runc`` they start derives a cgroup inside the node. Teardown kills only processes found in the
node's cgroup directories and removes only those directories, deepest first. Nodes are named
``bsnode-<test process pid>-<hex>`` so :func:`reap_stale_nodes` can tear down those of a killed
test run.

Errors are :class:`NodeError` (an ``AssertionError``, so pytest shows the message and the
console tail as a test failure) or ``subprocess`` exceptions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from bootstrap.demo import machine as m
from bootstrap.demo.machine import (  # noqa: F401  (re-exported: part of this module's interface)
    BOOT_TIMEOUT,
    BUILD_LOCK_TIMEOUT,
    CGROUP_FS,
    CUSTOMIZE,
    MIRROR,
    NODEROOT,
    NSPAWN_LOCKS,
    NSPAWN_PROPAGATE,
    OVERLAY,
    PACKAGES,
    STOP_TIMEOUT,
    SUITE,
    VARIANT,
    Hierarchy,
    MachineError,
    base_key,
    rootfs_key,
)
from tests.harness.cli import Ran

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
CACHE_DIR = REPO / ".cache" / "node"
RUNTIME_DIR = Path("/dev/shm")

NAME_PREFIX = "bsnode"
HARNESS_CGROUP = "harness"
NODE_PATH = m.MACHINE_PATH


class NodeError(AssertionError):
    """The node could not be built, booted, reached or stopped; the message says why."""


class NodeCommandError(subprocess.CalledProcessError):
    """A command run inside the node with ``check=True`` exited non-zero."""

    def __str__(self) -> str:
        return (
            f"in node: {self.cmd} exited {self.returncode}\n"
            f"stdout: {_tail(self.stdout or '', 40)}\nstderr: {_tail(self.stderr or '', 40)}"
        )


@contextlib.contextmanager
def _as_node_error() -> Iterator[None]:
    """Turn the product's MachineError into NodeError, details included."""
    try:
        yield
    except MachineError as exc:
        text = f"{exc.message}\n{exc.details}" if exc.details else exc.message
        raise NodeError(text) from exc


def _tail(text: str, lines: int) -> str:
    return m.tail(text, lines)


def remove_tree(path: Path) -> None:
    """Remove ``path`` recursively, first detaching anything mounted below it."""
    with _as_node_error():
        m.remove_mounted_tree(path)


def rootfs_tarball() -> Path:
    """Return the cached, customised node rootfs tarball in ``CACHE_DIR``, building it first
    when missing (see :func:`bootstrap.demo.machine.rootfs_tarball`). Raises :class:`NodeError`
    when a step fails."""
    with _as_node_error():
        return m.rootfs_tarball(CACHE_DIR, work_dir=RUNTIME_DIR, scratch_prefix=NAME_PREFIX)


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup that this process belongs to."""
    with _as_node_error():
        return m.hierarchies()


def reap_stale_nodes() -> list[str]:
    """Tear down nodes this harness left behind in an earlier run whose test process is gone
    (killed before its teardown): kill the processes in their cgroups, remove those cgroups and
    their ``/dev/shm`` directories. Nodes are recognised by name, ``bsnode-<owner pid>-<hex>``;
    nodes of a live owner are never touched. Returns the names reaped."""
    with _as_node_error():
        return m.reap_orphans(NAME_PREFIX, RUNTIME_DIR)


# --------------------------------------------------------------------------------------------
# The node


_PIPE_GRACE = 1.0  # seconds to keep reading a command's output after it exited


def _pump(stream: IO[bytes], sink: list[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while chunk := stream.read1(65536):  # type: ignore[attr-defined]
            sink.append(chunk)


def _feed(stream: IO[bytes], data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.write(data)
        stream.close()


Bind = str | Path | tuple[str | Path, str]


def _bind(b: Bind) -> m.Bind:
    return (str(b[0]), str(b[1])) if isinstance(b, tuple) else (str(b), str(b))


class Node(m.Machine):
    """A booted (or bootable) systemd node in ``/dev/shm/<name>-XXXX/rootfs``.

    Construct with :meth:`start` (extract + boot, torn down on failure) or use it as a context
    manager; :meth:`close` powers it off (killing it if it hangs), removes the cgroups and
    processes it created and deletes the rootfs. ``binds`` and ``ro_binds`` are extra
    ``--bind``/``--bind-ro`` arguments: a path (bound at the same path) or ``(host, in_node)``.
    ``REPO`` is always bound read-write at the same path.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        binds: Sequence[Bind] = (),
        ro_binds: Sequence[Bind] = (),
        boot_timeout: float = BOOT_TIMEOUT,
        private_network: bool = False,
    ) -> None:
        name = name or m.random_name(NAME_PREFIX, owner=os.getpid())
        workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=RUNTIME_DIR))
        try:
            with _as_node_error():
                super().__init__(
                    name,
                    workdir,
                    binds=[_bind(REPO), *(_bind(b) for b in binds)],
                    ro_binds=[_bind(b) for b in ro_binds],
                    exec_cgroup=HARNESS_CGROUP,
                    private_network=private_network,
                )
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.boot_timeout = boot_timeout

    @property
    def _cgroups(self) -> list[Path]:
        """The node's own cgroup directories, one per hierarchy."""
        return self.cgroups

    @property
    def _harness(self) -> list[Path]:
        """The ``harness`` cgroups inside the node that :meth:`run` joins."""
        return self.exec_cgroups

    def __repr__(self) -> str:
        return f"<Node {self.name} pid={self.pid} running={self.running}>"

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        name: str | None = None,
        *,
        binds: Sequence[Bind] = (),
        ro_binds: Sequence[Bind] = (),
        boot_timeout: float = BOOT_TIMEOUT,
        private_network: bool = False,
        forward: Sequence[int] = (),
    ) -> Node:
        """Build/reuse the rootfs cache, extract it, boot, wait for "running"/"degraded".
        With ``private_network`` the node boots in a network namespace of its own (198.51.100.2
        with a default route, see :mod:`bootstrap.demo.netns`), and each port of ``forward``
        (e.g. a registry's) on its 127.0.0.1 reaches the same port on the host's 127.0.0.1.
        Raises :class:`NodeError` (after cleaning up) when any step fails."""
        tarball = rootfs_tarball()
        node = cls(
            name,
            binds=binds,
            ro_binds=ro_binds,
            boot_timeout=boot_timeout,
            private_network=private_network,
        )
        try:
            node.extract(tarball)
            node.boot()
            for port in forward:
                node.forward(port)
        except BaseException:
            with contextlib.suppress(AssertionError, OSError):
                node.close()  # the boot error is the one to show
            raise
        return node

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extract(self, tarball: Path | None = None) -> None:
        """Unpack the rootfs tarball into :attr:`rootfs` and give it a fresh machine-id and
        this node's hostname."""
        with _as_node_error():
            super().extract(tarball or rootfs_tarball())

    def boot(self, timeout: float | None = None) -> None:
        """Boot :attr:`rootfs` (again, for a reboot test) and wait until systemd inside says
        "running" or "degraded"; updates :attr:`pid`. Raises :class:`NodeError` with the
        console tail and ``systemctl --failed`` on timeout or when nspawn exits."""
        with _as_node_error():
            super().boot(self.boot_timeout if timeout is None else timeout)

    def forward(self, port: int) -> None:
        """Relay ``127.0.0.1:port`` inside the node (a private-network node) to the host's."""
        if self.network is None:
            raise NodeError(f"{self.name} shares the host's network; nothing to forward")
        with _as_node_error():
            self.network.forward(port)

    def poweroff(self, timeout: float = STOP_TIMEOUT) -> None:
        """``systemctl poweroff`` inside; wait for systemd-nspawn to exit. Processes that
        :meth:`run` started and left running (they are in the ``harness`` cgroup, e.g. a
        ``runc run -d`` container) are SIGKILLed first: they are not systemd's, and a container
        pid 1 ignoring SIGTERM would hold the shutdown for DefaultTimeoutStopSec. Raises
        :class:`NodeError` (after killing the node) when it does not exit within ``timeout``."""
        with _as_node_error():
            super().poweroff(timeout)

    def close(self) -> None:
        """Power off (kill when that hangs), kill whatever is left in the node's cgroups, remove
        those cgroups deepest first, and delete the rootfs. Safe to call twice."""
        with _as_node_error():
            self.destroy()

    # -- running things inside ---------------------------------------------------------------

    def _nsenter(
        self,
        argv: Sequence[str],
        *,
        join: bool = True,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        with _as_node_error():
            full = self.nsenter_argv(argv, join=join)
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.exec_env(env),
        )
        # Read the pipes in threads and stop waiting for them shortly after the command exits: a
        # process it left running (``runc run -d``, a daemon) may hold them open for good.
        out_chunks: list[bytes] = []
        err_chunks: list[bytes] = []
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, out_chunks), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err_chunks), daemon=True),
        ]
        if input is not None:
            pumps.append(threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True))
        for t in pumps:
            t.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in reversed(m.descendants(proc.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(
                list(argv), timeout, b"".join(out_chunks), b"".join(err_chunks)
            ) from None
        for t in pumps[:2]:
            t.join(_PIPE_GRACE)
        out, err = b"".join(out_chunks), b"".join(err_chunks)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def run(  # type: ignore[override]
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the node (``nsenter --all`` into the node's init, after joining
        the node's ``harness`` cgroup) with a clean environment (PATH, LANG, HOME, TERM) plus
        ``env``; ``input`` is fed to stdin. Output is decoded as text; output written more than
        a second after the command exited (by a process it left running) is not waited for.
        With ``check``, a non-zero exit raises :class:`NodeCommandError` showing stdout and
        stderr; on ``timeout`` the command and its children are killed and
        ``subprocess.TimeoutExpired`` is raised."""
        proc = self._nsenter(argv, timeout=timeout, env=env, input=input)
        done = subprocess.CompletedProcess(
            list(argv),
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and done.returncode != 0:
            raise NodeCommandError(done.returncode, list(argv), done.stdout, done.stderr)
        return done

    def bootstrap(
        self,
        *args: str,
        check: bool = False,
        timeout: float = 600,
        env: Mapping[str, str] | None = None,
    ) -> Ran:
        """Run ``REPO/.venv/bin/bootstrap ARGS`` inside the node; with ``check``, assert exit 0."""
        proc = self.run(str(VENV / "bin/bootstrap"), *args, check=False, timeout=timeout, env=env)
        ran = Ran(proc.returncode, proc.stdout, proc.stderr)
        if check:
            assert ran.rc == 0, (
                f"in node: bootstrap {' '.join(args)} exited {ran.rc}\n"
                f"stdout: {ran.stdout}\nstderr: {ran.stderr}"
            )
        return ran

    def python(self, code: str, *, check: bool = True, timeout: float = 120) -> str:
        """Run ``code`` with the repository venv's python inside the node; return stdout."""
        return self.run(str(VENV / "bin/python"), "-c", code, check=check, timeout=timeout).stdout

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``systemctl --no-pager ARGS`` inside the node, unchecked (for assertions)."""
        return self.run("systemctl", "--no-pager", *args, check=False, timeout=60)

    def journal(self, unit: str, lines: int = 50) -> str:
        """The last ``lines`` journal lines of ``unit`` inside the node."""
        return self.run(
            "journalctl", "--no-pager", "-n", str(lines), "-u", unit, check=False, timeout=60
        ).stdout

    # -- D-Bus -------------------------------------------------------------------------------

    def bus(self) -> Any:
        """A pydbus bus connected to the node's system bus (from the host)."""
        import pydbus

        return pydbus.connect(self.bus_address)

    # -- files -------------------------------------------------------------------------------

    def path(self, path_in_node: str) -> Path:
        """The host path of ``path_in_node``: through ``/proc/PID/root`` while the node runs
        (so tmpfs mounts inside, e.g. /run, are seen), else under :attr:`rootfs`."""
        base = Path(f"/proc/{self.pid}/root") if self.running else self.rootfs
        return base / path_in_node.lstrip("/")

    def write_file(self, path_in_node: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write ``data`` to ``path_in_node`` (parents created), then chmod ``mode``."""
        dest = self.path(path_in_node)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data.encode() if isinstance(data, str) else data)
        dest.chmod(mode)

    def read_file(self, path_in_node: str) -> str:
        return self.path(path_in_node).read_text()

    def copy_in(self, src: Path, dest_in_node: str) -> None:
        """Copy a file or a directory tree (symlinks kept, modes preserved) into the node."""
        dest = self.path(dest_in_node)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest, follow_symlinks=False)


class JobWaiter:
    """Waits for systemd jobs over pydbus: ``jobs = JobWaiter(node.bus().get(".systemd1"))``,
    then ``jobs.wait(manager.StartUnit(unit, "replace"))`` returns the job's result ("done",
    "failed", ...). Connects to ``JobRemoved`` and calls ``Subscribe()`` first (systemd sends
    the signal only to subscribers). :meth:`wait` iterates the default GLib main context (a
    100 ms ``GLib.timeout_add`` tick bounds each blocking step) until the job is reported;
    signals that arrived earlier are kept, so none is missed. Raises ``AssertionError`` after
    ``timeout`` seconds."""

    def __init__(self, systemd: Any) -> None:
        self.results: dict[str, str] = {}
        systemd.JobRemoved.connect(self._removed)
        systemd.Subscribe()  # JobRemoved goes only to subscribed clients

    def _removed(self, _id: int, job: str, _unit: str, result: str) -> None:
        self.results[job] = result

    def wait(self, job: str, timeout: float = 60) -> str:
        from gi.repository import GLib

        context = GLib.MainContext.default()
        tick = GLib.timeout_add(100, lambda: True)  # wake up to check the deadline
        deadline = time.monotonic() + timeout
        try:
            while job not in self.results:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no JobRemoved for {job} within {timeout}s")
                context.iteration(True)
        finally:
            GLib.source_remove(tick)
        return self.results[job]


@contextlib.contextmanager
def started_node(
    name: str | None = None,
    *,
    binds: Sequence[Bind] = (),
    ro_binds: Sequence[Bind] = (),
    boot_timeout: float = BOOT_TIMEOUT,
) -> Iterator[Node]:
    """``with started_node() as node:`` — :meth:`Node.start`, then :meth:`Node.close`."""
    node = Node.start(name, binds=binds, ro_binds=ro_binds, boot_timeout=boot_timeout)
    with node:
        yield node
