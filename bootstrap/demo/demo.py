"""``bootstrap demo`` / ``bootstrap demo --down``: the main job on an embedded default.

``demo`` brings up a throwaway systemd machine on this host (:mod:`bootstrap.demo.machine`),
builds the demo's images offline (:mod:`bootstrap.demo.images`), serves them from Debian's
docker-registry on the machine's loopback (:mod:`bootstrap.demo.registry`; started and stopped
by the demo) and provisions the machine the way a real node is provisioned at first boot,
running this installation's ``bootstrap`` inside it, which pulls them:

- with the node manifest ``examples/node.yaml`` (``bootstrap up``): the CNI plugins, the CRI
  daemon ``ocid`` (Debian's containerd) and the kubelet stand-in, as runc system containers
  under the machine's systemd, the pod network and the pod images handed to the CRI daemon;
  the stand-in then runs ``examples/static-pods/web.json`` as a kubelet runs a static pod
  (its own network, a hostPath volume, a hostPort). The machine has a network namespace of its
  own (198.51.100.0/24), so none of this touches the host's network. When the CRI images cannot
  be built here, it falls back to
- one busybox "hello" system container (``bootstrap install``), imported with ``bootstrap
  import`` instead.

It then shows ``bootstrap list`` and ``bootstrap status NAME`` from inside and leaves the
machine running, recorded in ``$STATE/demo/node.json`` (written atomically), with the commands to
look around. ``demo`` again while the machine is up says so and shows the status (a machine
whose provisioning failed is provisioned again: ``up`` resumes). ``demo --down`` powers the
machine off and removes its processes, cgroups, rootfs and record; the caches stay
(``$STATE/demo/cache`` for the machine rootfs, ``$STATE/demo/images`` for the images).

Both hold ``$STATE/demo/demo.lock``; a second command while one runs fails at once with exit 6.
Progress goes to stderr as log lines, one per step.

Requirements (each missing one is a one-line error with a hint): root; systemd-nspawn, nsenter,
debootstrap, tar, zstd; bootstrap installed editable (``pip install -e``) from its source
checkout in a venv made from ``/usr/bin/python3`` (the machine runs that venv, bound read-only at
the same path, with the machine's Debian Python 3.11); Debian's package mirror for the first
run (debootstrap, ``apt-get download``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bootstrap
from bootstrap.demo import images
from bootstrap.demo.machine import Machine, MachineError, random_name, rootfs_tarball
from bootstrap.demo.oci import ImageBuildError
from bootstrap.errors import BootstrapError, UsageError
from bootstrap.fsutil import write_atomic
from bootstrap.locks import flocked
from bootstrap.settings import Settings

log = logging.getLogger(__name__)

NAME_PREFIX = "bsdemo"
EXEC_CGROUP = "demo"
RUNTIME_DIR = Path("/dev/shm")
"""Where the machine's rootfs lives: tmpfs boots in a fraction of a second, disk in seconds."""
RUNTIME_MIN_FREE = 2 << 30
"""Free bytes :data:`RUNTIME_DIR` needs (the machine takes ~430 MB with the CRI images)."""
TOOLS = {
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
    "debootstrap": "debootstrap",
    "tar": "tar",
    "zstd": "zstd",
    "setsid": "util-linux",
    "docker-registry": "docker-registry",
}
KUBELET_REPORT = "/var/lib/kubelet/standin-status.json"
"""Where the kubelet stand-in writes what the CRI daemon answered and how its pod probe went
(see its main.py)."""
KUBELET_REPORT_TIMEOUT = 30.0
HELLO_NAME = "hello"
HELLO_REF = "localhost/bootstrap-demo/hello:1"
PROVISION_TIMEOUT = 1200.0
STEPS = 6


@dataclass(frozen=True)
class Install:
    """Where this bootstrap runs from: its source checkout and its venv."""

    repo: Path
    venv: Path

    @property
    def bootstrap(self) -> Path:
        return self.venv / "bin" / "bootstrap"


@dataclass(frozen=True)
class Workload:
    """What the demo provisions: images to import (reference, host archive), the containers
    that result, and the ``bootstrap`` arguments that provision them inside the machine."""

    kind: str
    images: tuple[tuple[str, Path], ...]
    containers: tuple[str, ...]
    provision: tuple[str, ...]
    static_pods: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DemoResult:
    """What ``bootstrap demo`` did. ``action``: ``up`` (booted and provisioned now),
    ``already-up`` (found running), ``down`` (torn down), ``not-running`` (nothing to tear
    down). ``listing``/``status`` hold the inner ``bootstrap list``/``status NAME`` output
    (``text`` and ``json``)."""

    action: str
    message: str
    node: dict[str, Any] | None = None
    workload: str = ""
    containers: tuple[str, ...] = ()
    listing: dict[str, Any] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    look_around: tuple[str, ...] = ()
    kubelet: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "message": self.message,
            "node": self.node,
            "workload": self.workload,
            "containers": list(self.containers),
            "list": self.listing.get("json"),
            "status": {name: s.get("json") for name, s in self.status.items()},
            "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "look_around": list(self.look_around),
            "kubelet": self.kubelet,
        }

    def to_text(self) -> str:
        lines = [self.message]
        if self.listing:
            lines += ["", "$ bootstrap list", self.listing.get("text", "").rstrip()]
        for name, s in self.status.items():
            lines += ["", f"$ bootstrap status {name}", s.get("text", "").rstrip()]
        if self.kubelet:
            k = self.kubelet
            conditions = ", ".join(f"{t} {v}" for t, v in (k.get("conditions") or {}).items())
            failure = k.get("failure") or {}
            if k.get("state") == "ok":
                pod = f"pod probe passed: pod IP {k.get('pod_ip') or '(host network)'}"
            else:
                pod = f"pod probe {k.get('state')}: {failure.get('step')}: {failure.get('error')}"
            lines += [
                "",
                f"The kubelet stand-in talks CRI to {k.get('runtime_name')} "
                f"{k.get('runtime_version')} ({k.get('runtime_api_version')}) at "
                f"{k.get('endpoint')}: {conditions}; {pod}",
            ]
        if self.look_around:
            lines += ["", "Look around:", *(f"  {x}" for x in self.look_around)]
        return "\n".join(lines)


# ---- entry point -------------------------------------------------------------------------------


def demo(settings: Settings, *, down: bool = False) -> DemoResult:
    """``bootstrap demo`` (``down`` false) or ``bootstrap demo --down`` (see the module doc).

    Raises :class:`~bootstrap.errors.BusyError` (6) while another demo command runs,
    :class:`UsageError` (2) when this installation cannot run the demo (not root, not an editable
    install, a tool missing), :class:`MachineError` (5) when the machine cannot be built, booted,
    provisioned or stopped, and the inner command's error otherwise."""
    base = settings.state / "demo"
    with flocked(base / "demo.lock", timeout=0, what=f"the demo in {base}"):
        if down:
            return _down(base)
        return _up(settings, base)


def demo_command(settings: Settings, *args: str) -> str:
    """``bootstrap demo ARGS`` as the user must type it again: with ``--state`` when the demo
    lives elsewhere than the default (so printed suggestions work as printed)."""
    from bootstrap.settings import DEFAULT_ROOT

    state = [] if settings.state == DEFAULT_ROOT else ["--state", str(settings.state)]
    return shlex.join(["bootstrap", *state, "demo", *args])


def _step(n: int, text: str) -> None:
    log.info("demo: [%d/%d] %s", n, STEPS, text)


# ---- down --------------------------------------------------------------------------------------


def _load_record(base: Path) -> dict[str, Any] | None:
    path = base / "node.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path}: unreadable demo record: {exc}",
            f"tear the machine down by hand, then remove {path}",
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("machine"), dict):
        raise UsageError(f"{path}: not a demo record", f"remove {path}")
    return doc


def _down(base: Path) -> DemoResult:
    _require_root()
    started = time.monotonic()
    doc = _load_record(base)
    if doc is None:
        return DemoResult("not-running", f"no demo machine is recorded in {base}; nothing to do")
    machine = Machine.from_record(doc["machine"])
    log.info("demo: powering off %s (pid %d)", machine.name, machine.pid)
    was_running = machine.running
    machine.destroy()
    (base / "node.json").unlink(missing_ok=True)
    elapsed = time.monotonic() - started
    caches = [p for p in (base / "cache", base / "images") if p.exists()]
    note = f"; caches kept: {', '.join(map(str, caches))}" if caches else ""
    how = "powered off and removed" if was_running else "was not running; its leftovers removed"
    return DemoResult(
        "down",
        f"demo machine {machine.name} {how} in {elapsed:.1f}s{note}",
        node={"name": machine.name, "rootfs": str(machine.rootfs)},
        timings={"down": elapsed},
    )


# ---- up ----------------------------------------------------------------------------------------


def _up(settings: Settings, base: Path) -> DemoResult:
    _require_root()
    inst = install_location()
    _require_tools()
    started = time.monotonic()
    timings: dict[str, float] = {}

    doc = _load_record(base)
    machine: Machine | None = None
    if doc is not None:
        found = Machine.from_record(doc["machine"])
        if found.running and doc.get("provisioned"):
            log.info("demo: %s is already up (pid %d)", found.name, found.pid)
            workload = Workload(str(doc.get("workload", "")), (), tuple(doc["containers"]), ())
            return _report(settings, found, inst, workload, "already-up", timings, started)
        if found.running:
            log.info("demo: %s is up but was not provisioned completely; resuming", found.name)
            machine = found
        else:
            log.info("demo: %s is recorded but not running; removing its leftovers", found.name)
            found.destroy()
            (base / "node.json").unlink(missing_ok=True)

    t = time.monotonic()
    _step(1, f"machine rootfs: Debian bookworm + systemd, cached in {base / 'cache'}")
    tarball = rootfs_tarball(base / "cache", work_dir=base / "cache")
    timings["rootfs"] = time.monotonic() - t

    t = time.monotonic()
    _step(2, f"images, built offline, cached in {base / 'images'}")
    workload = _workload(inst, base / "images")
    for ref, path in workload.images:
        log.info("demo:   %s <- %s (%.1f MB)", ref, path.name, path.stat().st_size / 1e6)
    timings["images"] = time.monotonic() - t

    if machine is None:
        t = time.monotonic()
        binds = _binds(inst, base / "images")
        machine = Machine.create(
            random_name(NAME_PREFIX),
            runtime_dir=_runtime_dir(base),
            ro_binds=binds,
            exec_cgroup=EXEC_CGROUP,
            private_network=True,
        )
        _save(base, machine, workload, provisioned=False)
        _step(3, f"booting machine {machine.name} with systemd-nspawn in {machine.workdir}")
        try:
            machine.extract(tarball)
            machine.boot()
        except BaseException:
            log.info("demo: boot failed; removing %s", machine.name)
            try:
                machine.destroy()
            finally:
                (base / "node.json").unlink(missing_ok=True)
            raise
        _save(base, machine, workload, provisioned=False)
        timings["boot"] = time.monotonic() - t
        log.info("demo:   systemd is up (pid %d) in %.1fs", machine.pid, timings["boot"])

    try:
        # `bootstrap` on the machine's PATH, as install.sh puts it on a real node's
        machine.run(["ln", "-sfn", str(inst.bootstrap), "/usr/local/bin/bootstrap"], timeout=30)
        for pod in workload.static_pods:  # as a provisioner drops static pods before first boot
            dest = f"/etc/kubernetes/manifests/{pod.name}"
            machine.run(["install", "-D", "-m", "0644", str(pod), dest], timeout=30)
        with contextlib.ExitStack() as stack:
            t = time.monotonic()
            addr = _registry_addr(workload)
            if addr is not None:
                from bootstrap.demo.registry import DemoRegistry

                _step(
                    4,
                    f"serving {len(workload.images)} image(s) from docker-registry on {addr} "
                    "in the machine's network",
                )
                reg = stack.enter_context(DemoRegistry(base / "registry", addr, machine.pid))
                reg.push(list(workload.images))
                timings["registry"] = time.monotonic() - t
            else:
                _step(4, f"importing {len(workload.images)} image(s) into the machine's store")
                for ref, path in workload.images:
                    _inner(machine, inst, ["import", str(path), "--name", ref], timeout=600)
                timings["import"] = time.monotonic() - t

            t = time.monotonic()
            _step(5, f"provisioning inside the machine: bootstrap {shlex.join(workload.provision)}")
            out = _inner(
                machine,
                inst,
                list(workload.provision),
                timeout=PROVISION_TIMEOUT,
                on_line=lambda line: log.info("demo:   %s", line),  # live, as the node logs it
            )
            for line in out.stdout.decode(errors="replace").splitlines():
                log.info("demo:   %s", line)
            timings["provision"] = time.monotonic() - t
    except BootstrapError as err:
        details = getattr(err, "details", "")
        raise MachineError(
            f"demo machine {machine.name}: {err.message}",
            f"{err.hint}; the machine stays up to look around: '{demo_command(settings)}' "
            f"resumes, '{demo_command(settings, '--down')}' removes it",
            details=details,
        ) from err
    _save(base, machine, workload, provisioned=True)
    return _report(settings, machine, inst, workload, "up", timings, started)


def _registry_addr(workload: Workload) -> str | None:
    """The loopback registry (``127.0.0.1:PORT``) all of a ``bootstrap up`` workload's images
    name, which the demo serves them from; None to import them instead (the busybox
    fallback, or images named elsewhere)."""
    from bootstrap.image.api import Reference

    if not workload.images or workload.provision[:1] != ("up",):
        return None
    domains = {Reference.parse(ref).domain for ref, _ in workload.images}
    if len(domains) != 1:
        return None
    (domain,) = domains
    return domain if domain.startswith("127.0.0.1:") else None


def _runtime_dir(base: Path) -> Path:
    """:data:`RUNTIME_DIR` when it has room for the machine (:data:`RUNTIME_MIN_FREE`), else
    ``$STATE/demo/run`` on disk (slower to boot)."""
    try:
        if shutil.disk_usage(RUNTIME_DIR).free >= RUNTIME_MIN_FREE:
            return RUNTIME_DIR
    except OSError:
        pass
    log.info("demo: %s is missing or small; the machine goes to %s", RUNTIME_DIR, base / "run")
    return base / "run"


def _save(base: Path, machine: Machine, workload: Workload, *, provisioned: bool) -> None:
    doc = {
        "machine": machine.record(),
        "workload": workload.kind,
        "containers": list(workload.containers),
        "provisioned": provisioned,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    base.mkdir(parents=True, exist_ok=True)
    write_atomic(base / "node.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _report(
    settings: Settings,
    machine: Machine,
    inst: Install,
    workload: Workload,
    action: str,
    timings: dict[str, float],
    started: float,
) -> DemoResult:
    _step(6, "bootstrap list / status inside the machine")
    kubelet = _kubelet_report(machine) if "kubelet" in workload.containers else None
    listing = _show(machine, inst, ["list"])
    status = {name: _show(machine, inst, ["status", name]) for name in workload.containers}
    timings["total"] = time.monotonic() - started
    enter = shlex.join(machine.enter_argv())
    inner = shlex.join([*machine.enter_argv()[:-1], str(inst.bootstrap), "list"])
    look = (
        f"a shell inside:        {enter}",
        f"bootstrap inside:      {inner}",
        "inside, try:           systemctl status "
        + " ".join(f"{c}.service" for c in workload.containers)
        + "; journalctl -u "
        + (
            "ocid"  # the CRI daemon's log says the most (the first container may be a oneshot)
            if "ocid" in workload.containers
            else workload.containers[0]
            if workload.containers
            else "dbus"
        )
        + "; runc list",
        *_update_and_rollback(workload),
        f"its systemd over D-Bus: busctl --address={machine.bus_address} "
        "tree org.freedesktop.systemd1",
        f"its files:             /proc/{machine.pid}/root (rootfs {machine.rootfs})",
        f"tear it down:          {demo_command(settings, '--down')}",
    )
    if action == "up":
        message = (
            f"demo machine {machine.name} is up (systemd pid {machine.pid}), provisioned "
            f"({workload.kind}) in {timings['total']:.1f}s"
        )
    else:
        message = (
            f"demo machine {machine.name} is already up (systemd pid {machine.pid}); "
            "nothing changed"
        )
    return DemoResult(
        action,
        message,
        node={
            "name": machine.name,
            "pid": machine.pid,
            "nspawn_pid": machine.nspawn_pid,
            "rootfs": str(machine.rootfs),
            "bus_address": machine.bus_address,
            "enter": machine.enter_argv(),
        },
        workload=workload.kind,
        containers=workload.containers,
        listing=listing,
        status=status,
        timings=timings,
        look_around=look,
        kubelet=kubelet,
    )


#: What the printed update changes and the rollback takes back: the CRI daemon's log level
#: (its definition's LOG_LEVEL, containerd's --log-level in the demo's image).
UPDATE_SET = "LOG_LEVEL=debug"


def _update_and_rollback(workload: Workload) -> tuple[str, ...]:
    """The suggested update (one that changes something: ``--set`` of a value the CRI
    daemon's definition uses; ``--no-pull``: the demo's registry is stopped once the machine
    is provisioned) and the rollback that takes it back, with what shows each. None for a
    workload without the CRI daemon (the busybox fallback's definition has no variable)."""
    if "ocid" not in workload.containers:
        return ()
    return (
        f"change, then undo:     bootstrap update --no-pull --set {UPDATE_SET} ocid   "
        "(containerd restarts at debug: journalctl -u ocid | grep level=debug; "
        "bootstrap status ocid shows the value and the rollback target)",
        "                       bootstrap rollback ocid   (back to the deployment before: "
        "info again; bootstrap status ocid)",
    )


# ---- inside the machine ------------------------------------------------------------------------


def _inner(
    machine: Machine,
    inst: Install,
    args: Sequence[str],
    *,
    timeout: float,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run this installation's ``bootstrap ARGS`` inside the machine; check its exit code.
    ``on_line`` gets each line it writes on stderr as it is written."""
    return machine.run([str(inst.bootstrap), *args], timeout=timeout, on_line=on_line)


def _show(machine: Machine, inst: Install, args: Sequence[str]) -> dict[str, Any]:
    text = _inner(machine, inst, args, timeout=120).stdout.decode(errors="replace")
    raw = _inner(machine, inst, ["--json", *args], timeout=120).stdout
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    return {"text": text, "json": doc}


def _kubelet_report(machine: Machine, timeout: float = KUBELET_REPORT_TIMEOUT) -> Any:
    """What the kubelet stand-in last wrote to its status file inside the machine (its CRI
    answers and pod probe), waiting up to ``timeout`` seconds for a finished probe (``state``
    ok or failed; after that, whatever is there); None without a file."""
    path = Path(f"/proc/{machine.pid}/root") / KUBELET_REPORT.lstrip("/")
    deadline = time.monotonic() + timeout
    while True:
        try:
            doc = json.loads(path.read_text())
            if doc.get("state") in ("ok", "failed") or time.monotonic() > deadline:
                return doc
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                log.info(
                    "demo: no kubelet stand-in report in %s after %gs", KUBELET_REPORT, timeout
                )
                return None
        time.sleep(0.2)


def _binds(inst: Install, images_dir: Path) -> list[tuple[str, str]]:
    """Read-only binds at the same paths: the checkout, the venv when outside it, the images."""
    paths = [inst.repo]
    if not inst.venv.is_relative_to(inst.repo):
        paths.append(inst.venv)
    images_dir.mkdir(parents=True, exist_ok=True)
    paths.append(images_dir)
    return [(str(p), str(p)) for p in paths]


# ---- the workload ------------------------------------------------------------------------------


def _workload(inst: Install, cache: Path) -> Workload:
    """The node manifest's containers when their images can be built here, else busybox."""
    node_manifest = _node_manifest_workload(inst, cache)
    if node_manifest is not None:
        return node_manifest
    return Workload(
        "busybox system container",
        ((HELLO_REF, images.image("busybox", cache).archive()),),
        (HELLO_NAME,),
        ("install", HELLO_NAME, HELLO_REF),
    )


def _node_manifest_workload(inst: Install, cache: Path) -> Workload | None:
    """examples/node.yaml's containers, provisioned with ``bootstrap up``, with images built
    here; None (after saying why) when they cannot be built or this install has no ``up``."""
    manifest = inst.repo / "examples" / "node.yaml"
    try:
        from bootstrap.node.manifest import load

        spec = load(manifest)
        built = images.node_manifest_images(cache)
        missing = [c.name for c in spec.containers if c.name not in built]
        pods = spec.pods.images if spec.pods is not None else ()
        missing += [ref for ref in pods if _repository_name(ref) not in built]
        if missing:
            raise ImageBuildError(
                f"no offline image for {', '.join(missing)}", "use the node manifest's names"
            )
    except (ImportError, BootstrapError) as exc:
        log.warning(
            "demo: cannot provision %s here (%s); using a busybox system container", manifest, exc
        )
        return None
    mirrors = {m.registry: m.mirrors[0] for m in spec.registries.mirrors}
    served = [(c.image, built[c.name]) for c in spec.containers]
    served += [(_served_as(ref, mirrors), built[_repository_name(ref)]) for ref in pods]
    return Workload(
        f"node manifest {manifest.relative_to(inst.repo)}",
        tuple(served),
        tuple(c.name for c in spec.containers),
        ("up", str(manifest)),
        tuple(sorted((inst.repo / "examples" / "static-pods").glob("*.json"))),
    )


def _repository_name(ref: str) -> str:
    """The last component of a reference's repository (``.../pause:3.9`` -> ``pause``)."""
    from bootstrap.image.api import Reference

    return Reference.parse(ref).path.rsplit("/", 1)[-1]


def _served_as(ref: str, mirrors: dict[str, str]) -> str:
    """Where the demo's registry serves ``ref``: at its own name, or for a registry the
    manifest mirrors (registry.k8s.io), at the mirror's (as a site mirror holds it)."""
    from bootstrap.image.api import Reference

    r = Reference.parse(ref)
    if r.domain not in mirrors:
        return ref
    return str(r).replace(r.domain, mirrors[r.domain], 1)


# ---- requirements ------------------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError(
            "bootstrap demo boots a systemd machine with systemd-nspawn and needs root",
            "run it as root (as root: bootstrap demo; from a user's shell: sudo bootstrap demo)",
        )


def _require_tools() -> None:
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            raise UsageError(
                f"bootstrap demo needs {tool}, which is not installed",
                f"apt-get install {package}",
            )


def install_location() -> Install:
    """This installation's source checkout and venv. Raises :class:`UsageError` unless bootstrap
    runs from a venv made from ``/usr/bin/python3`` with the package installed editable from a
    checkout that holds ``examples/`` (the machine runs that venv at the same path)."""
    hint = (
        "run the demo from a source checkout: /usr/bin/python3 -m venv .venv && "
        ".venv/bin/pip install -e . && .venv/bin/bootstrap demo"
    )
    package = Path(bootstrap.__file__).resolve().parent
    repo = package.parent
    venv = Path(sys.prefix).resolve()
    if not (repo / "pyproject.toml").is_file() or not (repo / "examples").is_dir():
        raise UsageError(
            f"bootstrap demo needs bootstrap installed editable from its source checkout; "
            f"this one runs from {package}",
            hint,
        )
    if sys.prefix == sys.base_prefix or not (venv / "bin" / "bootstrap").exists():
        raise UsageError(
            f"bootstrap demo needs bootstrap installed in a venv; this one runs from {sys.prefix}",
            hint,
        )
    home = ""
    cfg = venv / "pyvenv.cfg"
    if cfg.is_file():
        for line in cfg.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                home = value.strip()
    if home not in ("/usr/bin", "/bin"):
        raise UsageError(
            f"the venv {venv} was made from {home or 'an unknown Python'}, which the demo "
            "machine (Debian bookworm, /usr/bin/python3) cannot run",
            hint,
        )
    return Install(repo, venv)


__all__ = ["DemoResult", "MachineError", "demo", "install_location"]
