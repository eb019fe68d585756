"""System-container deployments: the one place that composes a checkout, a runtime config and a
systemd unit, and the NAME.0/NAME.1 swap.

Layout under ``$STATE/containers``::

    NAME -> NAME.0        the active deployment (a symlink, flipped atomically)
    NAME.0/ NAME.1/       deployments: rootfs/, config.json, info.json, NAME.service,
                          tmpfiles.conf (when the definition has one), definition/ (a copy of a
                          --definition directory), hostfs.json (the host files it owns) and
                          hostfs.pending (while its host files are being changed)
    NAME.new/             a deployment being staged or proven by an update (transient)

The unit runs ``runc run --bundle $STATE/containers/NAME NAME``: the bundle is the symlink, so a
unit is the same whichever slot is active. Per-container operations hold an flock on
``$STATE/locks/containers/NAME.lock`` (a second one waits up to ``$BOOTSTRAP_LOCK_TIMEOUT``
seconds, default 60, then exits 6).

Everything that can be checked before touching disk is (definition files, variables, values,
the runtime config, conflicts of the image's host files); a failure later removes what was
staged, so a failed command leaves the deployments, the unit, the tmpfiles file and the host
files as they were.

Host files (the image's ``/exports/hostfs``, see :mod:`bootstrap.deploy.hostfs`) change with
the symlink, before the unit (re)starts, so a daemon finds its config and plugins in place:
the transition into a slot is planned (conflicts refused), marked in that slot
(``hostfs.pending``) *before* the symlink is flipped to it, carried out, then recorded
(``hostfs.json``) — and only then is the unit installed and (re)started. So whenever a command
is killed, the slot the symlink points to either has no mark (the host holds its files) or has
one, or the symlink is being moved back by recovery: :meth:`Deployer._recover` (run under the
lock before every command) then makes the host files those of the slot the symlink points to
after it repaired the symlink, taking as ours every state any slot's record or mark names.
A failed update or rollback (:meth:`Deployer._restore`) does the same before restarting the
slot it goes back to. Install refuses, before anything is written, a shipped path the host
holds that is not the container's; update refuses new ones the same way; rollback, restore,
recovery and uninstall never fail on them (they keep the host's file, with a warning line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import shlex
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.deploy import definition as defn
from bootstrap.deploy import failures, hostfs
from bootstrap.deploy.definition import Definition, TemplateFile
from bootstrap.deploy.listing import ListResult
from bootstrap.errors import BootstrapError, SystemdError, UsageError
from bootstrap.fsutil import (
    PRIVATE_DIR,
    fsync_dir,
    make_dirs,
    make_private,
    remove_tree,
    write_atomic,
)
from bootstrap.image import api
from bootstrap.image.api import Image
from bootstrap.locks import flocked
from bootstrap.process import run
from bootstrap.runtime import config as rtconfig
from bootstrap.runtime import init as rtinit
from bootstrap.runtime import runc
from bootstrap.runtime.health import HealthCheck
from bootstrap.settings import DEFAULT_UNIT_DIR
from bootstrap.systemd import units
from bootstrap.systemd.manager import Manager, UnitState

log = logging.getLogger(__name__)

INFO = "info.json"
CONFIG = "config.json"
TMPFILES = "tmpfiles.conf"
DEFINITION_COPY = "definition"
#: The node lock under ``$STATE/locks``: a node update holds it exclusively, every
#: per-container command shared (before its container's lock).
NODE_LOCK = "node.lock"
#: Marker in a staged deployment while an update proves it: the name of the slot that was live
#: before (so an interrupted update can go back to it). Removed once the update is final.
PREVIOUS = ".previous"
DEFAULT_TMPFILES_DIR = Path("/etc/tmpfiles.d")
DEFAULT_LOCK_TIMEOUT = 60.0
#: The shortest wait for a start/restart job (see :func:`job_timeout`).
DEFAULT_JOB_TIMEOUT = 120.0

#: Built-in variables that hold unit syntax already (quoted by bootstrap).
EXEC_VARIABLES = frozenset({"EXEC_START", "EXEC_STOP", "EXEC_START_PRE", "EXEC_STOP_POST"})
#: Built-ins that ``--set`` may not override: they tie the unit to this deployment.
FORCED_VARIABLES = frozenset({"NAME", "DESTDIR"})


def lock_timeout() -> float:
    """Seconds to wait for another operation on the same container (``$BOOTSTRAP_LOCK_TIMEOUT``)."""
    raw = os.environ.get("BOOTSTRAP_LOCK_TIMEOUT", "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT


def tmpfiles_dir() -> Path:
    """Where tmpfiles.d files go (``$BOOTSTRAP_TMPFILES_DIR``, default /etc/tmpfiles.d)."""
    return Path(os.environ.get("BOOTSTRAP_TMPFILES_DIR") or DEFAULT_TMPFILES_DIR)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- paths -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where container ``name``'s pieces live under ``state``."""

    state: Path
    name: str

    @property
    def root(self) -> Path:
        return self.state / "containers"

    @property
    def link(self) -> Path:
        return self.root / self.name

    def slot(self, index: int) -> Path:
        return self.root / f"{self.name}.{index}"

    @property
    def staged(self) -> Path:
        return self.root / f"{self.name}.new"

    @property
    def trash(self) -> Path:
        return self.root / f"{self.name}.old"

    @property
    def lock(self) -> Path:
        return self.state / "locks" / "containers" / f"{self.name}.lock"

    @property
    def unit(self) -> str:
        return f"{self.name}.service"

    def active(self) -> Path | None:
        """The slot the symlink points at, or None when not installed."""
        if not self.link.is_symlink():
            return None
        target = self.root / os.readlink(self.link)
        return target if target.is_dir() else None

    def other(self, active: Path) -> Path:
        """The slot that is not ``active`` (it may not exist)."""
        return self.slot(1) if active.name.endswith(".0") else self.slot(0)


# ---- deployment records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One deployment as its info.json describes it."""

    name: str
    path: Path
    image: str
    digest: str
    image_id: str
    values: Mapping[str, str]
    set_values: Mapping[str, str]
    definition_source: str
    definition_origin: str
    definition_digest: str
    installed: str
    unit_dir: str
    #: The digest the registry served for ``image`` (what ``pull`` prints); ``digest`` when the
    #: stored manifest is the one served.
    source_digest: str = ""
    #: Auto-update policy (``registry``, ``local``, ``off``) and where it came from
    #: (``install``: given explicitly, ``definition``: the definition's default, ``default``).
    auto_update: str = "off"
    auto_update_from: str = "default"
    #: Containers this one is ordered after (the node manifest's ``after:``).
    after: tuple[str, ...] = ()
    #: A CRI socket that must answer ``Version`` before the container counts as ready.
    cri_socket: str = ""
    ready_timeout: float = 300.0
    #: The signature-policy requirement that admitted the image ("" when none was recorded).
    admitted: str = ""
    #: The host files this deployment owns (its ``hostfs.json``; see :mod:`.hostfs`).
    host_files: tuple[hostfs.Entry, ...] = ()
    #: How the container imports an image archive (a CRI daemon; the definition's
    #: ``imageImport`` rendered with this deployment's values): argv and timeout in seconds.
    image_import: tuple[str, ...] = ()
    image_import_timeout: float = 0.0
    #: The definition's health check (None: none, or recorded by an older bootstrap).
    health: HealthCheck | None = None

    @classmethod
    def load(cls, path: Path) -> Deployment:
        """Read ``path/info.json``; a missing or damaged one is a :class:`BootstrapError`."""
        info = path / INFO
        try:
            doc = json.loads(info.read_text(encoding="utf-8"))
            d = doc["definition"]
            return cls(
                name=str(doc["name"]),
                path=path,
                image=str(doc["image"]),
                digest=str(doc["digest"]),
                image_id=str(doc["image_id"]),
                values={str(k): str(v) for k, v in doc["values"].items()},
                set_values={str(k): str(v) for k, v in doc["set"].items()},
                definition_source=str(d["source"]),
                definition_origin=str(d["origin"]),
                definition_digest=str(d["digest"]),
                installed=str(doc["installed"]),
                unit_dir=str(doc["unit_dir"]),
                source_digest=str(doc.get("source_digest") or doc["digest"]),
                auto_update=str(doc.get("auto_update", "off")),
                auto_update_from=str(doc.get("auto_update_from", "default")),
                after=tuple(str(a) for a in doc.get("after", ())),
                cri_socket=str(doc.get("cri_socket") or ""),
                ready_timeout=float(doc.get("ready_timeout", 300.0)),
                admitted=str(doc.get("admitted", "")),
                host_files=hostfs.load(path),
                image_import=tuple(str(a) for a in (doc.get("image_import") or {}).get("argv", ())),
                image_import_timeout=float((doc.get("image_import") or {}).get("timeout", 0.0)),
                health=HealthCheck.from_json(doc["health"]) if doc.get("health") else None,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BootstrapError(
                f"deployment {path}: cannot read {INFO}: {exc}",
                "the deployment is damaged; uninstall and install the container again",
            ) from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "slot": self.path.name,
            "image": self.image,
            "digest": self.digest,
            "image_id": self.image_id,
            "values": dict(self.values),
            "set": dict(self.set_values),
            "definition": {
                "source": self.definition_source,
                "origin": self.definition_origin,
                "digest": self.definition_digest,
            },
            "installed": self.installed,
            "unit_dir": self.unit_dir,
            **self.extra(),
            "admitted": self.admitted,
            "host_files": [e.to_json() for e in self.host_files],
            **self._image_import_json(),
            "health": self.health.to_json() if self.health else None,
        }

    def _image_import_json(self) -> dict[str, Any]:
        if not self.image_import:
            return {}
        return {
            "image_import": {
                "argv": list(self.image_import),
                "timeout": self.image_import_timeout,
            }
        }

    def extra(self) -> dict[str, Any]:
        """The info.json keys an update carries over from this deployment to the next."""
        return {
            "source_digest": self.source_digest,
            "auto_update": self.auto_update,
            "auto_update_from": self.auto_update_from,
            "after": list(self.after),
            "cri_socket": self.cri_socket,
            "ready_timeout": self.ready_timeout,
        }


@dataclass(frozen=True)
class Options:
    """Per-container settings kept with the deployment beside the image and values:
    ``auto_update`` None means the definition's default (else ``off``); ``after`` and
    ``cri_socket``/``ready_timeout`` come from a node manifest (ordering and readiness)."""

    auto_update: str | None = None
    after: tuple[str, ...] = ()
    cri_socket: str = ""
    ready_timeout: float = 300.0


class RolledBackError(SystemdError):
    """An update failed (did not start, did not settle, unhealthy) and the previous deployment
    was made live again and restarted (exit 5)."""


@dataclass(frozen=True)
class Plan:
    """Everything about a deployment computed before touching disk."""

    name: str
    image: Image
    definition: Definition
    values: Mapping[str, str]
    set_values: Mapping[str, str]
    service: str
    tmpfiles: str | None
    config: rtconfig.PreparedConfig
    unit_dir: Path
    #: The definition's ``imageImport`` argv rendered with ``values`` (empty: none).
    image_import: tuple[str, ...] = ()

    def info(self, installed: str) -> dict[str, Any]:
        """The deployment's info.json document."""
        extra: dict[str, Any] = {}
        if self.definition.health is not None:
            extra["health"] = self.definition.health.to_json()
        if self.image_import and self.definition.image_import is not None:
            extra["image_import"] = {
                "argv": list(self.image_import),
                "timeout": self.definition.image_import.timeout,
            }
        return {
            **extra,
            "name": self.name,
            "image": self.image.name,
            "digest": self.image.manifest.digest,
            "image_id": self.image.config.digest,
            "values": dict(self.values),
            "set": dict(self.set_values),
            "definition": {
                "source": self.definition.source,
                "origin": self.definition.origin,
                "digest": self.definition.digest,
            },
            "installed": installed,
            "unit_dir": str(self.unit_dir),
        }


@dataclass(frozen=True)
class StagedUpdate:
    """An update staged in ``paths.staged`` and checked against the host, not live yet:
    ``active`` is the slot it replaces (its deployment ``current``), ``plan`` what was
    rendered, ``host`` the planned change of the host files."""

    paths: Paths
    active: Path
    current: Deployment
    plan: Plan
    host: hostfs.Transition

    @property
    def job_timeout(self) -> float:
        """How long to wait for the restart job (see :func:`health_job_timeout`)."""
        return health_job_timeout(self.plan)


def plan(
    paths: Paths,
    image: Image,
    definition: Definition,
    set_values: Mapping[str, str],
    unit_dir: Path,
    *,
    uuid_value: str | None = None,
    check_only: bool = False,
) -> Plan:
    """Resolve variables and render every file of the deployment (nothing is written).
    ``check_only``: a validation before the deployment is staged (which plans again): the
    ``--set`` names the definition does not use are said by that later plan only, once.

    Raises :class:`UsageError` (exit 2) for bad ``--set`` names or values, unknown variables
    (naming file and line), bad JSON in the rendered config template, a config without a
    command."""
    for key in set_values:
        defn.check_variable_name(key, "--set")
        if key in FORCED_VARIABLES:
            raise UsageError(
                f"--set {key}: ${key} is set by bootstrap and cannot be overridden",
                "choose another variable name",
            )
    runtime = runc.runtime_path()
    name = paths.name
    bundle = str(paths.link)
    stop_timeout = definition.stop_timeout
    builtins = {
        "INIT": definition.init,
        "NAME": name,
        "DESTDIR": bundle,
        "IMAGE_NAME": image.name,
        "IMAGE_ID": image.config.digest,
        "RUN_DIRECTORY": "/run",
        "STATE_DIRECTORY": "/var/lib",
        "CONF_DIRECTORY": "/etc",
        "HOST_UID": str(os.getuid()),
        "HOST_GID": str(os.getgid()),
        "RUNTIME": runtime,
        "EXEC_START_PRE": units.exec_command(units.start_pre_script(runtime, name, bundle)),
        "EXEC_START": units.exec_command([runtime, "run", "--bundle", bundle, name]),
        "EXEC_STOP": units.exec_command(units.stop_script(runtime, name, stop_timeout)),
        "EXEC_STOP_POST": units.exec_command(units.stop_post_script(runtime, name, bundle)),
        "PIDFILE": f"/run/container-{name}.pid",
        "UUID": uuid_value or str(uuid.uuid4()),
        "TIMEOUT_STOP_SEC": str(stop_timeout + 30),
        "TIMEOUT_START_SEC": str(definition.start_timeout),
    }
    values = {**definition.default_values, **builtins, **set_values}

    template_doc: dict[str, Any] | None = None
    where_cfg = "config.json.template"
    if definition.config_template is not None:
        where_cfg = definition.config_template.where
        text = definition.config_template.render(values, defn.escape_json)
        doc = defn.parse_json(text, where_cfg)
        if not isinstance(doc, dict):
            raise UsageError(f"{where_cfg}: must be a JSON object", "an OCI runtime config")
        template_doc = doc
    prepared = rtconfig.prepare(image.config, hostname=name, template=template_doc, where=where_cfg)
    init_mode = defn.check_init_mode(
        values["INIT"],
        "--set INIT" if "INIT" in set_values else f"{definition.origin}/manifest.json",
    )
    if rtinit.wanted(
        init_mode,
        prepared.document["process"]["args"],
        host_pid=prepared.host_pid,
        extra=definition.init_names,
    ):
        doc_init = rtinit.apply(prepared.document, rtinit.find_init())
        prepared = dataclasses.replace(prepared, document=doc_init)

    service_t = definition.service_template or TemplateFile(
        "builtin:service.template",
        units.default_service_template(
            host_network=prepared.host_network,
            notify=definition.readiness == "notify",
            oneshot=definition.unit_type == "oneshot",
        ),
    )
    raw = frozenset(EXEC_VARIABLES - set(set_values))
    service = service_t.render(values, defn.unit_escaper(service_t.where, raw, commands=True))
    tmpfiles: str | None = None
    if definition.tmpfiles_template is not None:
        t = definition.tmpfiles_template
        tmpfiles = t.render(values, defn.unit_escaper(t.where))
    image_import: tuple[str, ...] = ()
    if definition.image_import is not None:
        image_import = definition.image_import.render(values)
    used = definition.variables() | {n for n, _ in service_t.placeholders()} | {"INIT"}
    unused = sorted(set(set_values) - used)
    if unused and not check_only:
        log.warning("--set %s: not used by the definition", ", ".join(unused))
    return Plan(
        name=name,
        image=image,
        definition=definition,
        values=values,
        set_values=dict(set_values),
        service=service,
        tmpfiles=tmpfiles,
        config=prepared,
        unit_dir=unit_dir,
        image_import=image_import,
    )


# ---- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployResult:
    """What install/update/rollback/uninstall did."""

    action: str
    name: str
    changed: bool
    message: str
    deployment: Deployment | None = None
    unit: UnitState | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "name": self.name,
            "changed": self.changed,
            "message": self.message,
            "deployment": self.deployment.to_json() if self.deployment else None,
            "unit": self.unit.to_json() if self.unit else None,
        }

    def to_text(self) -> str:
        return self.message


@dataclass(frozen=True)
class ContainerStatus:
    """A container: its active deployment, the rollback target, the unit and runc's view."""

    name: str
    active: Deployment | None
    previous: Deployment | None
    unit: UnitState | None
    runc: runc.ContainerState | None
    problems: tuple[str, ...] = ()
    #: A digest of its image that was rolled back (auto-update skips it; see
    #: :mod:`bootstrap.deploy.failures`).
    failed: failures.Failed | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "active": self.active.to_json() if self.active else None,
            "previous": self.previous.to_json() if self.previous else None,
            "unit": self.unit.to_json() if self.unit else None,
            "runc": self.runc.to_json() if self.runc else None,
            "problems": list(self.problems),
            "failed_update": self.failed.to_json() if self.failed else None,
        }

    def to_text(self) -> str:
        lines = [f"{self.name}:"]
        if self.active:
            lines.append(f"  image:    {self.active.image}")
            lines.append(f"  digest:   {self.active.digest}")
            lines.append(f"  slot:     {self.active.path}")
            lines.append(f"  installed {self.active.installed}")
            a = self.active
            lines.append(f"  update:   {a.auto_update} ({a.auto_update_from})")
            if self.active.admitted:
                lines.append(f"  trust:    {self.active.admitted}")
            if self.active.host_files:
                files = [e for e in self.active.host_files if e.type != hostfs.DIRECTORY]
                dirs = len(self.active.host_files) - len(files)
                lines.append(
                    f"  host:     {len(files)} files/symlinks, {dirs} directories from "
                    "/exports/hostfs"
                )
            if self.active.set_values:
                values = sorted(self.active.set_values.items())
                lines.append("  set:      " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values))
        if self.previous:
            lines.append(f"  rollback: {self.previous.image} ({self.previous.digest[:19]})")
        if self.unit:
            u = self.unit
            lines.append(
                f"  unit:     {u.name} {u.active_state} ({u.sub_state}), main pid {u.main_pid}"
            )
        if self.runc:
            lines.append(f"  runc:     {self.runc.status}, pid {self.runc.pid}")
        if self.failed:
            lines.append(f"  skipped:  {self.failed.skip_note()}")
        lines += [f"  problem:  {p}" for p in self.problems]
        return "\n".join(lines)


# ---- the deployer ------------------------------------------------------------------------------


class Deployer:
    """Operations on system containers below ``state``, pulling from / checking out of
    ``store``. ``manager`` is created on first use (the bus is only needed to act on units)."""

    def __init__(
        self,
        state: Path,
        store: Any,
        *,
        manager: Manager | None = None,
        progress: Any = None,
        verifier: Callable[[], Any] | None = None,
    ) -> None:
        self.state = Path(state)
        self.store = store
        self._manager = manager
        self.progress = progress
        self._verifier_factory = verifier
        self._verifier: Any = None

    @property
    def manager(self) -> Manager:
        if self._manager is None:
            self._manager = Manager()
        return self._manager

    # -- helpers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, paths: Paths) -> Iterator[None]:
        """Hold the node lock shared, then container ``paths.name``'s lock, for the block;
        first finish a node update a killed run left (its journal), then repair what an
        interrupted command on this container left (:meth:`_recover`)."""
        with (
            self._node_shared(),
            flocked(paths.lock, timeout=lock_timeout(), what=f"system container {paths.name}"),
        ):
            self._recover(paths)
            yield

    @property
    def _node_lock(self) -> Path:
        return self.state / "locks" / NODE_LOCK

    @contextlib.contextmanager
    def node_locked(self) -> Iterator[None]:
        """Hold the node lock exclusively (a node update): no per-container command runs
        meanwhile. Waits up to :func:`lock_timeout`, then :class:`BusyError` (exit 6)."""
        with flocked(self._node_lock, timeout=lock_timeout(), what="the node (a node update)"):
            yield

    @contextlib.contextmanager
    def _node_shared(self) -> Iterator[None]:
        """The node lock, shared, with no node update journal left behind: one a killed run
        left is finished first (:func:`bootstrap.deploy.nodeupdate.finish_interrupted`, under
        the node lock held exclusively), as often as one appears before the lock is had."""
        journal = self.state / "node" / "transaction.json"
        while True:
            if journal.exists():
                from bootstrap.deploy.nodeupdate import finish_interrupted

                finish_interrupted(self)
            with contextlib.ExitStack() as stack:
                stack.enter_context(
                    flocked(
                        self._node_lock,
                        shared=True,
                        timeout=lock_timeout(),
                        what="the node (a node update)",
                    )
                )
                if journal.exists():  # a node update was killed meanwhile
                    continue
                yield
                return

    def _recover(self, paths: Paths) -> None:
        """Repair what an update killed midway left (see :data:`PREVIOUS`): a symlink on an
        unproven staged deployment goes back to the slot recorded in it; a symlink dangling
        because the proven staged deployment was already renamed into its slot follows it;
        stale staged/trash directories and markers are removed. When the symlink moved, or a
        host-file transition was left unfinished (``hostfs.pending`` in a slot), the host files
        are made those of the slot the symlink points to (:meth:`_settle_host_files`)."""
        if paths.link.is_symlink():
            target = os.readlink(paths.link)
            slots = [p for p in (paths.slot(0), paths.slot(1)) if (p / INFO).exists()]
            back: Path | None = None
            if target == paths.staged.name and paths.staged.is_dir():
                recorded = _read_marker(paths.staged)
                back = paths.root / recorded if recorded else None
                if back is None or not (back / INFO).exists():
                    back = _newest(slots)
            elif not paths.link.exists():
                marked = [p for p in slots if (p / PREVIOUS).exists()]
                back = marked[0] if marked else _newest(slots)
            if back is not None:
                log.warning("%s: an update was interrupted; making %s live", paths.name, back)
                self._settle_host_files(paths, back, flip=True)
                self._install_unit(paths, back, Path(Deployment.load(back).unit_dir))
                self.manager.reload()
                self.run_what_the_link_says(paths)  # before the slot it may run is removed
        live = paths.active()
        if live is not None and any(hostfs.pending(s) for s in _all_slots(paths)):
            log.warning("%s: a change of its host files was interrupted; finishing it", paths.name)
            self._settle_host_files(paths, live)
        for slot in (paths.slot(0), paths.slot(1)):
            (slot / PREVIOUS).unlink(missing_ok=True)
        for stale in (paths.staged, paths.trash):
            if os.path.lexists(stale) and paths.active() != stale:
                log.info("removing stale %s", stale)
                _remove_slot(stale)

    def run_what_the_link_says(self, paths: Paths) -> bool:
        """Restart ``paths``' unit when it is running but its container does not run the
        deployment the ``NAME`` symlink points to (:func:`runc.runs_from`; when that cannot be
        told, it is restarted too). Returns whether it was restarted; a unit that is not running
        is left so (it starts what the symlink names). Raises :class:`SystemdError` when the
        restart fails."""
        live = paths.active()
        if live is None:
            return False
        unit = self.manager.state(paths.unit)
        if not unit.running:
            return False
        if unit.service_type != "oneshot" and runc.runs_from(paths.name, live / "rootfs"):
            return False
        log.warning(
            "%s: %s does not run %s, which %s points to; restarting it",
            paths.name,
            paths.unit,
            live.name,
            paths.link.name,
        )
        self.manager.reset_failed(paths.unit)
        self.manager.restart(paths.unit, settle=0.0)
        return True

    def _settle_host_files(
        self,
        paths: Paths,
        live: Path,
        *,
        flip: bool = False,
        owned_by: tuple[Path | None, ...] | None = None,
    ) -> None:
        """Make the host files those ``live`` ships, taking as ours every state that the slots
        ``owned_by`` (default: all of the container's) record or mark (:func:`hostfs.claims`);
        host files that are not ours are kept (a warning each). With ``flip``, ``live`` is
        marked, then the symlink flipped to it, then the files changed. A failure is logged,
        not raised (the symlink is still flipped; the mark stays, so the next command tries
        again)."""
        transition = None
        try:
            slots = _all_slots(paths) if owned_by is None else owned_by
            owned = [e for slot in slots if slot is not None for e in hostfs.claims(slot)]
            transition = hostfs.prepare(paths.name, owned, self._shipped(live), strict=False)
            transition.begin(live)
        except BootstrapError as err:
            log.error("%s: cannot restore the host files of %s: %s", paths.name, live, err)
        if flip:
            _flip(paths, live)
        if transition is None:
            return
        try:
            transition.finish(live)
        except BootstrapError as err:
            log.error("%s: cannot restore the host files of %s: %s", paths.name, live, err)
            return
        for slot in _all_slots(paths):
            if slot != live:
                hostfs.clear_pending(slot)

    def _shipped(self, slot: Path) -> hostfs.Shipped:
        """The host files deployment ``slot`` ships: its image tree's ``exports/hostfs`` (the
        ``lower`` link of an overlay deployment, else its ``rootfs/`` checkout)."""
        tree = slot / "lower" if (slot / "lower").is_symlink() else slot / "rootfs"
        try:
            image = Deployment.load(slot).image
        except BootstrapError:
            image = slot.name
        return hostfs.scan(tree, f"{image}:/exports/hostfs")

    def image(self, reference: str, *, pull: str = "missing") -> Image:
        """The stored image for ``reference``, obtained as ``bootstrap pull`` and ``checkout``
        obtain it (registries.conf aliases and search registries, signature policy, layers
        inflated as they download); ``pull`` is the policy: ``"missing"`` (pull only when not
        stored), ``"always"`` or ``"never"``."""
        return api.obtain(
            self.store, reference, policy=pull, verifier=self._verifier_once, progress=self.progress
        ).image

    def _verifier_once(self) -> Any:
        """The signature verifier, loaded on the first pull (list and rollback need no policy)."""
        if self._verifier is None and self._verifier_factory is not None:
            self._verifier = self._verifier_factory()
        return self._verifier

    def _admitted(self, name: str) -> str:
        """The signature-policy requirement that admitted stored image ``name`` ("" if none
        was recorded)."""
        found = api.provenance(self.store, name)
        return found.admitted if found is not None else ""

    def _rootfs(self, paths: Paths, image: Image, staged: Path) -> Path:
        """Prepare the rootfs of the deployment being staged; returns the directory holding the
        image's files as they will be seen (to read /exports and users from).

        With overlayfs (root, kernel support, and paths that fit mount options): ``lower`` links
        to the image's composed tree in the store (held for gc), ``upper/`` and ``work/`` are
        the slot's own, ``rootfs/`` the empty mount point the unit mounts the overlay on before
        runc starts. Otherwise ``rootfs/`` is a checkout with files of its own (reflinks or
        copies); nothing is shared with the cache either way."""
        overlay = api.overlay_supported() and _fits_mount_options(paths.root, self.store.root)
        users = [paths.slot(0), paths.slot(1), paths.staged]
        return api.deployment_rootfs(self.store, image, staged, users, overlay=overlay).files

    def _stage(
        self,
        paths: Paths,
        image: Image,
        definition: Definition | None,
        set_values: Mapping[str, str],
        unit_dir: Path,
        uuid_value: str | None,
        options: Options | None = None,
    ) -> Plan:
        """Build a complete deployment in ``paths.staged``; ``definition`` None means: the
        image's /exports if it has one, else the built-in. ``options`` are recorded in its
        info.json (the auto-update policy resolved against the definition's default). Removes
        the staged dir on failure."""
        options = options or Options()
        early = None
        if definition is not None:
            early = plan(paths, image, definition, set_values, unit_dir, uuid_value=uuid_value)
        staged = paths.staged
        _remove_slot(staged)
        make_dirs(paths.state)  # the state and its containers are root's alone, whatever the umask
        make_private(paths.root)
        staged.mkdir(mode=PRIVATE_DIR)
        try:
            tree = self._rootfs(paths, image, staged)
            the_plan = early
            if the_plan is None:
                exports = tree / "exports"
                found = None
                if (
                    exports.is_dir()
                    and not exports.is_symlink()
                    and any(os.path.lexists(exports / f) for f in defn.FILES)
                ):
                    found = defn.load(exports, source="image", where=f"{image.name}:/exports")
                the_plan = plan(
                    paths,
                    image,
                    found or defn.builtin(),
                    set_values,
                    unit_dir,
                    uuid_value=uuid_value,
                )
            doc = rtconfig.finalize(the_plan.config, tree)
            write_atomic(staged / CONFIG, rtconfig.dumps(doc))
            write_atomic(staged / paths.unit, the_plan.service)
            if the_plan.tmpfiles is not None:
                write_atomic(staged / TMPFILES, the_plan.tmpfiles)
            if the_plan.definition.source == "directory":
                (staged / DEFINITION_COPY).mkdir(mode=PRIVATE_DIR)
                for fname, text in the_plan.definition.files.items():
                    write_atomic(staged / DEFINITION_COPY / fname, text)
            info = the_plan.info(_now())
            info.update(self._extra(image, the_plan.definition, options))
            info["admitted"] = self._admitted(the_plan.image.name)
            write_atomic(staged / INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")
            fsync_dir(staged)
            return the_plan
        except BaseException:
            _remove_slot(staged)
            raise

    def source_digest(self, image: Image) -> str:
        """The digest the registry served for ``image``'s reference (what ``pull`` printed;
        the store keeps it when it differs from the stored manifest's)."""
        found = api.provenance(self.store, image.name)
        return found.source_digest if found is not None else image.manifest.digest

    def _extra(self, image: Image, definition: Definition, options: Options) -> dict[str, Any]:
        policy, origin = options.auto_update, "install"
        if policy is None:
            policy, origin = definition.auto_update or "off", "definition"
            if definition.auto_update is None:
                origin = "default"
        return {
            "source_digest": self.source_digest(image),
            "auto_update": policy,
            "auto_update_from": origin,
            "after": list(options.after),
            "cri_socket": options.cri_socket,
            "ready_timeout": options.ready_timeout,
        }

    def _install_unit(self, paths: Paths, slot: Path, unit_dir: Path) -> None:
        """Make ``slot``'s unit and tmpfiles the live ones (files only; no reload)."""
        unit_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(unit_dir / paths.unit, (slot / paths.unit).read_bytes())
        live_tmpfiles = tmpfiles_dir() / f"bootstrap-{paths.name}.conf"
        if (slot / TMPFILES).exists():
            live_tmpfiles.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(live_tmpfiles, (slot / TMPFILES).read_bytes())
            run(
                ["systemd-tmpfiles", "--create", live_tmpfiles],
                error=SystemdError,
                hint=f"check {live_tmpfiles}",
                timeout=60,
            )
        elif live_tmpfiles.exists():
            live_tmpfiles.unlink()

    def _unit_arg(self, paths: Paths, unit_dir: Path) -> str:
        """How to name the unit file to EnableUnitFiles: by name in the default directory, by
        path elsewhere (systemd then links it)."""
        if unit_dir == DEFAULT_UNIT_DIR:
            return paths.unit
        return str(unit_dir / paths.unit)

    # -- install -------------------------------------------------------------------------------

    def install(
        self,
        name: str,
        reference: str,
        *,
        set_values: Mapping[str, str],
        definition_dir: str | None,
        start: bool,
        unit_dir: str | None,
        options: Options | None = None,
        settle: float | None = None,
    ) -> DeployResult:
        """Install container ``name`` from image ``reference`` (pulled when not stored).

        Re-running with the same inputs changes nothing; with the same inputs but other
        ``options`` (policy, ordering, readiness) only those are recorded anew. ``settle``:
        seconds the started unit must stay active (None: the manager's default for a
        ``readiness: "none"`` definition and none for a ``"notify"`` one, whose start job ends
        only at READY=1; 0 for a caller that checks readiness itself, e.g. ``up`` asking the CRI
        socket). Raises
        :class:`UsageError` when the name is taken by another installation or a unit file
        bootstrap did not write, :class:`SystemdError` when the unit does not start (the
        installation is undone)."""
        paths = Paths(self.state, units.check_name(name))
        options = options or Options()
        if options.auto_update is not None:
            defn.check_policy(options.auto_update, "--auto-update")
        udir = Path(unit_dir).absolute() if unit_dir else DEFAULT_UNIT_DIR
        definition = defn.load(definition_dir) if definition_dir else None
        image = self.image(reference)
        if definition is not None:  # fail on bad input before taking the lock or writing
            plan(paths, image, definition, set_values, udir, check_only=True)
        self.manager.state(paths.unit)  # systemd must be reachable before anything is written
        with self.locked(paths):
            active = paths.active()
            if active is not None:
                current = Deployment.load(active)
                same = (
                    current.digest == image.manifest.digest
                    and dict(current.set_values) == dict(set_values)
                    and Path(current.unit_dir) == udir
                    and (
                        definition.digest == current.definition_digest
                        if definition is not None
                        else current.definition_source in ("image", "builtin")
                    )
                )
                if same and _options_differ(current, options):
                    current = self._record_options(active, current, options)
                    return DeployResult(
                        "install",
                        name,
                        True,
                        f"{name}: already installed from {image.name}; recorded auto-update "
                        f"{current.auto_update}",
                        current,
                    )
                if same:
                    return DeployResult(
                        "install",
                        name,
                        False,
                        f"{name} is already installed from {image.name} with these inputs; "
                        "nothing changed",
                        current,
                    )
                raise UsageError(
                    f"{name} is already installed (from {current.image})",
                    f"use 'bootstrap update {name} {reference}' or uninstall it first",
                )
            if (udir / paths.unit).exists():
                raise UsageError(
                    f"{udir / paths.unit} exists and was not written by bootstrap",
                    "choose another container name, or remove that unit file",
                )
            staged_plan = self._stage(paths, image, definition, set_values, udir, None, options)
            slot = paths.slot(0)
            for leftover in (paths.slot(0), paths.slot(1)):
                _remove_slot(leftover)
            os.rename(paths.staged, slot)
            try:  # host-file conflicts are refused before the slot is live
                host = hostfs.prepare(name, (), self._shipped(slot), strict=True)
                host.begin(slot)
            except BaseException:
                _remove_slot(slot)
                raise
            _flip(paths, slot)
            try:
                host.finish(slot)
                self._install_unit(paths, slot, udir)
                self.manager.reload()
                self.manager.enable([self._unit_arg(paths, udir)])
                health = staged_plan.definition.health
                unit = (
                    self.manager.start(
                        paths.unit,
                        timeout=health_job_timeout(staged_plan),
                        settle=install_settle(staged_plan, settle),
                    )
                    if start
                    else self.manager.state(paths.unit)
                )
                if start and health is not None:
                    self._wait_healthy(paths, health)
                    unit = self.manager.state(paths.unit)
            except BaseException as exc:
                try:
                    self._remove_everything(paths, udir)
                except BootstrapError as again:
                    log.error("undoing the install of %s: %s", name, again.message)
                if isinstance(exc, BootstrapError):
                    raise exc.with_context(f"install {name} (nothing installed)") from exc
                raise
            deployment = Deployment.load(slot)
            failures.forget(self.state, name)  # a new installation under an old name
            how = "started" if start else "not started (--no-start)"
            if start and staged_plan.definition.health is not None:
                how += f" and healthy ({staged_plan.definition.health.describe()})"
            return DeployResult(
                "install",
                name,
                True,
                f"{name}: installed {image.name} ({image.manifest.digest[:19]}) in {slot}; "
                f"{paths.unit} enabled and {how}{_host_note(deployment)}",
                deployment,
                unit,
            )

    # -- update --------------------------------------------------------------------------------

    def update(
        self,
        name: str,
        reference: str | None,
        *,
        set_values: Mapping[str, str],
        definition_dir: str | None,
        pull: bool,
        auto_update: str | None = None,
    ) -> DeployResult:
        """Update ``name`` to ``reference`` (default: the image it runs, pulled again);
        ``auto_update`` sets a new policy (alone, it only records it).

        The new deployment is staged beside the two slots, made live, restarted (when the unit
        was running) and must stay active; only then does it replace the older slot. On failure
        the staged one is removed, the current one restored and restarted, and
        :class:`SystemdError` (exit 5) says it rolled back."""
        paths = Paths(self.state, units.check_name(name))
        if auto_update is not None:
            defn.check_policy(auto_update, "--auto-update")
        new_definition = defn.load(definition_dir) if definition_dir else None
        with self.locked(paths):
            active = _require_active(paths)
            current = Deployment.load(active)
            options = carried_options(current)
            if auto_update is not None:
                options = dataclasses.replace(options, auto_update=auto_update)
            udir = Path(current.unit_dir)
            self.manager.state(paths.unit)  # systemd must be reachable before anything changes
            ref = reference or current.image
            image = self.image(ref, pull="always" if pull else "missing")
            values = {**current.set_values, **set_values}
            definition = new_definition
            if definition is None and current.definition_source == "directory":
                definition = defn.load(active / DEFINITION_COPY, where=current.definition_origin)
            # otherwise (image or built-in): decided after checkout, the new image may ship
            # /exports
            same = (
                image.manifest.digest == current.digest
                and values == dict(current.set_values)
                and (definition is None or definition.digest == current.definition_digest)
            )
            if same:
                source = self.source_digest(image)
                if source != current.source_digest:  # an info.json older than source digests
                    current = self._record_source(active, source)
                if _options_differ(current, options):
                    current = self._record_options(active, current, options)
                    return DeployResult(
                        "update",
                        name,
                        True,
                        f"{name}: still runs {image.name}; auto-update is now "
                        f"{current.auto_update}",
                        current,
                    )
                return DeployResult(
                    "update",
                    name,
                    False,
                    f"{name} already runs {image.name} ({image.manifest.digest[:19]}) with "
                    "these values; nothing changed",
                    current,
                )
            staged = self.stage_update(paths, active, current, image, values, definition, options)
            health = staged.plan.definition.health
            was_running = self.manager.state(paths.unit).running
            self.switch(staged)
            try:
                unit = (
                    self.manager.restart(
                        paths.unit, settle=restart_settle(staged.plan), timeout=staged.job_timeout
                    )
                    if was_running
                    else None
                )
                if unit is not None and health is not None:
                    self._wait_healthy(paths, health)
                    unit = self.manager.state(paths.unit)
            except BaseException as exc:
                err = exc if isinstance(exc, BootstrapError) else BootstrapError(str(exc))
                self._restore(paths, active, udir, was_running, err, failed=paths.staged)
                _remove_slot(paths.staged)
                if not isinstance(exc, BootstrapError):
                    raise
                failures.remember(
                    self.state, name, image.name, self.source_digest(image), err.message
                )
                raise RolledBackError(
                    f"update of {name} to {image.name} failed, rolled back to {current.image} "
                    f"({active.name}): {err.message}",
                    err.hint or f"journalctl -u {paths.unit}",
                ) from err
            older = self.promote(paths, active.name)
            failures.forget(self.state, name)
            deployment = Deployment.load(older)
            how = "restarted and active" if was_running else "not running, not started"
            return DeployResult(
                "update",
                name,
                True,
                f"{name}: updated to {image.name} ({image.manifest.digest[:19]}) in "
                f"{older.name}, {how}; rollback target: {current.image} in {active.name}"
                f"{_host_note(deployment)}",
                deployment,
                unit,
            )

    # -- the steps of an update, also taken one container at a time by a node transaction ------

    def stage_update(
        self,
        paths: Paths,
        active: Path,
        current: Deployment,
        image: Image,
        values: Mapping[str, str],
        definition: Definition | None,
        options: Options,
    ) -> StagedUpdate:
        """Stage ``image`` (with ``values``, ``definition``; None: the image's /exports or the
        built-in) as ``paths.staged`` beside the slots, and check the host files it ships
        against the host (new ones the host holds already: :class:`UsageError`). Nothing live
        changes; on failure nothing is left. The caller holds the container's lock."""
        udir = Path(current.unit_dir)
        if definition is not None:
            plan(paths, image, definition, values, udir, check_only=True)
        uuid_value = current.values.get("UUID")
        staged = self._stage(paths, image, definition, values, udir, uuid_value, options)
        try:  # new host files the host holds already are refused before anything changes
            owned = hostfs.claims(active)
            known = {e.path for e in self._shipped(active).entries}
            host = hostfs.prepare(
                paths.name, owned, self._shipped(paths.staged), strict=True, known=known
            )
        except BaseException:
            _remove_slot(paths.staged)
            raise
        return StagedUpdate(paths, active, current, staged, host)

    def switch(self, staged: StagedUpdate) -> None:
        """Make ``staged`` live without (re)starting its unit: mark it with the slot it
        replaces (:data:`PREVIOUS`), move the host files (marked first), point the symlink at
        it, write its unit and tmpfiles files, reload systemd, clear a past start limit."""
        paths = staged.paths
        write_atomic(paths.staged / PREVIOUS, staged.active.name)
        staged.host.begin(paths.staged)
        _flip(paths, paths.staged)
        staged.host.finish(paths.staged)
        self._install_unit(paths, paths.staged, Path(staged.current.unit_dir))
        self.manager.reload()
        self.manager.reset_failed(paths.unit)  # a past start-limit must not block it

    def promote(self, paths: Paths, previous: str) -> Path:
        """Make the proven ``paths.staged`` the slot that is not ``previous`` (the slot it
        replaced stays as the rollback target; the older one is removed) and point the symlink
        at it; returns that slot. Finishes a promotion that was cut short: when the staged
        deployment was renamed already, only the symlink and the leftovers are seen to."""
        older = paths.other(paths.root / previous)
        if paths.staged.is_dir():
            if os.path.lexists(older):
                _remove_slot(paths.trash)  # a leftover of an earlier promotion
                os.rename(older, paths.trash)
            os.rename(paths.staged, older)
        _flip(paths, older)
        (older / PREVIOUS).unlink(missing_ok=True)
        _remove_slot(paths.trash)
        return older

    def make_live(self, paths: Paths, slot: Path, *, failed: Path | None = None) -> None:
        """Point ``paths``' symlink back at ``slot`` after a switch to ``failed`` that did not
        prove itself: its host files (taking as ours what either slot records or marks; files
        not ours kept), its unit and tmpfiles files. systemd is not reloaded and nothing is
        (re)started here."""
        self._settle_host_files(paths, slot, flip=True, owned_by=(slot, failed))
        self._install_unit(paths, slot, Path(Deployment.load(slot).unit_dir))

    def discard_staged(self, paths: Paths) -> None:
        """Remove ``paths.staged`` (unmounting its rootfs first); the symlink must not point at
        it."""
        _remove_slot(paths.staged)

    def definition_of(self, slot: Path) -> Definition:
        """The definition deployment ``slot`` was rendered from: its copy of a definition
        directory, the image's ``/exports``, or the built-in."""
        dep = Deployment.load(slot)
        if dep.definition_source == "directory":
            return defn.load(slot / DEFINITION_COPY, where=dep.definition_origin)
        if dep.definition_source == "image":
            tree = slot / "lower" if (slot / "lower").is_symlink() else slot / "rootfs"
            return defn.load(tree / "exports", source="image", where=f"{dep.image}:/exports")
        return defn.builtin()

    def _wait_healthy(self, paths: Paths, check: HealthCheck) -> None:
        """Wait for ``check`` to pass in the running container; :class:`SystemdError` when it
        fails or the unit stops meanwhile."""
        from bootstrap.runtime.health import wait_healthy

        log.info("%s: waiting for its health check %s", paths.name, check.describe())
        wait_healthy(
            paths.name, check, alive=lambda: self.manager.state(paths.unit).active_state == "active"
        )

    def _record_options(self, slot: Path, current: Deployment, options: Options) -> Deployment:
        """Rewrite ``slot``'s info.json with ``options`` (image, values, files unchanged)."""
        doc = json.loads((slot / INFO).read_text(encoding="utf-8"))
        if options.auto_update is not None:
            doc["auto_update"], doc["auto_update_from"] = options.auto_update, "install"
        doc["after"] = list(options.after)
        doc["cri_socket"] = options.cri_socket
        doc["ready_timeout"] = options.ready_timeout
        write_atomic(slot / INFO, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return Deployment.load(slot)

    def _record_source(self, slot: Path, source: str) -> Deployment:
        """Rewrite ``slot``'s info.json with the registry digest ``source`` of its image."""
        doc = json.loads((slot / INFO).read_text(encoding="utf-8"))
        doc["source_digest"] = source
        write_atomic(slot / INFO, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return Deployment.load(slot)

    def _restore(
        self,
        paths: Paths,
        slot: Path,
        udir: Path,
        was_running: bool,
        cause: BootstrapError,
        *,
        failed: Path | None = None,
    ) -> None:
        """Make ``slot`` live again after a failed switch to ``failed``: its host files back
        (taking as ours what either slot records or marks; files not ours kept), its unit;
        restart it when it was running."""
        self._settle_host_files(paths, slot, flip=True, owned_by=(slot, failed))
        try:
            self._install_unit(paths, slot, udir)
            self.manager.reload()
            self.manager.reset_failed(paths.unit)
            if was_running:
                self.manager.restart(paths.unit)
            else:
                self.manager.stop(paths.unit)
        except BootstrapError as again:
            raise SystemdError(
                f"{paths.name}: {cause.message}; restoring {slot.name} failed too: {again.message}",
                f"journalctl -u {paths.unit}",
            ) from again

    # -- rollback ------------------------------------------------------------------------------

    def rollback(self, name: str) -> DeployResult:
        """Make the other deployment active (restarting the unit when it runs).

        Raises :class:`UsageError` when there is none, :class:`SystemdError` when it does not
        start (the current one is then restored)."""
        paths = Paths(self.state, units.check_name(name))
        with self.locked(paths):
            active = _require_active(paths)
            current = Deployment.load(active)
            target = paths.other(active)
            if not (target / INFO).exists():
                raise UsageError(
                    f"{name} has no previous deployment to roll back to",
                    "rollback needs an earlier install or update",
                )
            previous = Deployment.load(target)
            udir = Path(current.unit_dir)
            # systemd must be reachable before anything changes
            was_running = self.manager.state(paths.unit).running
            host = hostfs.prepare(name, hostfs.claims(active), self._shipped(target), strict=False)
            host.begin(target)
            _flip(paths, target)
            try:
                host.finish(target)
                self._install_unit(paths, target, udir)
                self.manager.reload()
                self.manager.reset_failed(paths.unit)  # a past start-limit must not block it
                unit = self.manager.restart(paths.unit) if was_running else None
            except BootstrapError as err:
                self._restore(paths, active, udir, was_running, err, failed=target)
                raise SystemdError(
                    f"rollback of {name} to {previous.image} ({target.name}) failed; it stays "
                    f"on {current.image} ({active.name}): {err.message}",
                    err.hint,
                ) from err
            if current.source_digest != previous.source_digest or current.image != previous.image:
                # the image the operator rolled back from is not re-applied by auto-update
                failures.remember(
                    self.state,
                    name,
                    current.image,
                    current.source_digest,
                    "rolled back by 'bootstrap rollback'",
                )
            return DeployResult(
                "rollback",
                name,
                True,
                f"{name}: rolled back to {previous.image} ({previous.digest[:19]}) in "
                f"{target.name}; {current.image} in {active.name} is now the rollback target",
                Deployment.load(target),
                unit,
            )

    # -- uninstall -----------------------------------------------------------------------------

    def uninstall(self, name: str) -> DeployResult:
        """Stop and disable the unit, remove it, its tmpfiles file, the runc state and every
        deployment of ``name``. Images stay in the store. :class:`UsageError` if not installed."""
        paths = Paths(self.state, units.check_name(name))
        with self.locked(paths):
            active = paths.active()
            slots = [p for p in (paths.slot(0), paths.slot(1)) if os.path.lexists(p)]
            if active is None and not slots and not paths.link.is_symlink():
                raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
            self.manager.state(paths.unit)  # systemd must be reachable before anything changes
            udir = DEFAULT_UNIT_DIR
            for candidate in [active, *slots]:
                if candidate is not None and (candidate / INFO).exists():
                    udir = Path(Deployment.load(candidate).unit_dir)
                    break
            self._remove_everything(paths, udir)
            failures.forget(self.state, name)
            return DeployResult(
                "uninstall",
                name,
                True,
                f"{name}: stopped, disabled and removed (images stay in the store until gc)",
            )

    def _remove_everything(self, paths: Paths, udir: Path) -> None:
        unit_file = udir / paths.unit
        if unit_file.exists() or self.manager.state(paths.unit).load_state != "not-found":
            self.manager.stop(paths.unit)
            with contextlib.suppress(SystemdError):  # not enabled: nothing to disable
                self.manager.disable([paths.unit])
        unit_file.unlink(missing_ok=True)
        self.manager.reload()
        self.manager.reset_failed(paths.unit)
        live_tmpfiles = tmpfiles_dir() / f"bootstrap-{paths.name}.conf"
        if live_tmpfiles.exists():
            run(["systemd-tmpfiles", "--remove", live_tmpfiles], check=False, timeout=60)
            live_tmpfiles.unlink()
        live = paths.active()
        sources = [live] if live is not None else [paths.slot(0), paths.slot(1)]
        sources += [s for s in _all_slots(paths) if s not in sources and hostfs.pending(s)]
        owned = [e for s in sources for e in hostfs.claims(s)]
        if owned:  # ours removed, modified ones kept (a warning each), adopted ones left
            hostfs.prepare(paths.name, owned, hostfs.NOTHING, strict=False).apply()
        runc.delete(paths.name)
        paths.link.unlink(missing_ok=True)
        for p in (paths.slot(0), paths.slot(1), paths.staged, paths.trash):
            _remove_slot(p)
        if paths.root.exists():
            fsync_dir(paths.root)

    # -- list / status -------------------------------------------------------------------------

    def names(self) -> list[str]:
        root = self.state / "containers"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_symlink() and "." not in p.name)

    def status(self, name: str) -> ContainerStatus:
        """The container's deployments, unit state and runc state (problems listed, not
        raised). :class:`UsageError` when not installed."""
        paths = Paths(self.state, units.check_name(name))
        active = paths.active()
        if active is None:
            raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
        problems: list[str] = []
        current = Deployment.load(active)
        previous = None
        other = paths.other(active)
        if (other / INFO).exists():
            try:
                previous = Deployment.load(other)
            except BootstrapError as err:
                problems.append(err.message)
        unit = None
        try:
            unit = self.manager.state(paths.unit)
        except SystemdError as err:
            problems.append(err.message)
        state = None
        try:
            state = runc.state(name)
        except BootstrapError as err:
            problems.append(err.message)
        failed = failures.get(self.state, name)
        return ContainerStatus(name, current, previous, unit, state, tuple(problems), failed)

    def list(self) -> ListResult:
        """Every installed container with its unit state (None when systemd is unreachable).
        With none installed, systemd is not asked (no D-Bus start-up cost)."""
        names = self.names()
        if not names:
            return ListResult(())
        try:
            _ = self.manager  # connect once; every status below shares it
            reachable = True
        except SystemdError:
            reachable = False
        out = []
        for name in names:
            try:
                if not reachable:
                    paths = Paths(self.state, name)
                    active = paths.active()
                    dep = Deployment.load(active) if active else None
                    out.append(
                        ContainerStatus(name, dep, None, None, None, ("systemd unreachable",))
                    )
                else:
                    out.append(self.status(name))
            except BootstrapError as err:
                out.append(ContainerStatus(name, None, None, None, None, (err.message,)))
        return ListResult(tuple(out))


def carried_options(current: Deployment) -> Options:
    """What an update keeps of ``current``'s options: an explicit policy (one that came from
    the definition follows the new definition), the ordering and the readiness."""
    return Options(
        auto_update=current.auto_update if current.auto_update_from == "install" else None,
        after=current.after,
        cri_socket=current.cri_socket,
        ready_timeout=current.ready_timeout,
    )


def _options_differ(current: Deployment, options: Options) -> bool:
    return (
        (options.auto_update is not None and options.auto_update != current.auto_update)
        or tuple(options.after) != current.after
        or options.cri_socket != current.cri_socket
        or options.ready_timeout != current.ready_timeout
    )


def install_settle(the_plan: Plan, settle: float | None) -> float | None:
    """The settle of an install's first start: ``settle`` when given; else 0 for a
    ``readiness: "notify"`` definition (its start job ends only once the container sent
    READY=1, a stronger proof than staying active a while) and None (the manager's default) for
    others; 0 for a ``oneshot`` too (its start job ends when its command exited, with success
    only if it exited 0: the unit is then active (exited)). Updates and rollbacks keep the
    settle (:func:`restart_settle`): a new version must also prove it stays up."""
    if settle is not None:
        return settle
    return 0.0 if the_plan.definition.readiness == "notify" or _oneshot(the_plan) else None


def restart_settle(the_plan: Plan) -> float | None:
    """The settle of an update's restart: None (the manager's default) but 0 for a
    ``oneshot``, which stays nothing but active (exited) after its command succeeded."""
    return 0.0 if _oneshot(the_plan) else None


def _oneshot(the_plan: Plan) -> bool:
    return the_plan.definition.unit_type == "oneshot"


def start_job_timeout(the_plan: Plan) -> float:
    """How long bootstrap waits for a start or restart job of ``the_plan``'s unit: longer than
    systemd's own stop and start timeouts, so systemd's verdict (and message) comes first."""
    d = the_plan.definition
    return float(max(DEFAULT_JOB_TIMEOUT, d.start_timeout + d.stop_timeout + 60))


def health_job_timeout(the_plan: Plan) -> float:
    """How long bootstrap waits for a start or restart job of ``the_plan``'s unit when its
    health is judged next: :func:`start_job_timeout`, but a ``notify`` unit whose health check
    has a start period must send READY=1 within that period."""
    health = the_plan.definition.health
    if health and health.start_period > 0 and the_plan.definition.readiness == "notify":
        return health.start_period
    return start_job_timeout(the_plan)


def _fits_mount_options(*dirs: Path) -> bool:
    """Paths usable in overlay mount options (no separators ``,`` ``:`` ``\\``, no spaces)."""
    return not any(c in str(d) for d in dirs for c in ",:\\ \t\n=")


def unmount_below(path: Path) -> None:
    """Unmount every mount at or below ``path`` (deepest first), e.g. a slot's overlay rootfs
    left mounted by a stop that never ran. Raises SystemdError when one cannot be unmounted."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as fh:
            points = [
                line.split()[4].encode().decode("unicode_escape") for line in fh if line.strip()
            ]
    except OSError:
        return
    inside = [p for p in points if p == real or p.startswith(real + "/")]
    for point in sorted(set(inside), key=len, reverse=True):
        run(["umount", point], error=SystemdError, hint=f"something still uses {point}", timeout=60)


def _remove_slot(path: Path) -> None:
    """Remove a deployment directory, unmounting its rootfs first if it is mounted."""
    if os.path.lexists(path):
        unmount_below(path)
    remove_tree(path)


def _all_slots(paths: Paths) -> tuple[Path, ...]:
    """Every deployment directory a container may have: both slots and the staged one."""
    return (paths.slot(0), paths.slot(1), paths.staged)


def _host_note(deployment: Deployment) -> str:
    n = sum(1 for e in deployment.host_files if e.type != hostfs.DIRECTORY)
    return f"; {n} host files from /exports/hostfs" if n else ""


def _require_active(paths: Paths) -> Path:
    active = paths.active()
    if active is None:
        raise UsageError(f"{paths.name} is not installed", f"bootstrap install {paths.name} REF")
    return active


def _newest(slots: list[Path]) -> Path | None:
    return max(slots, key=lambda p: Deployment.load(p).installed) if slots else None


def _read_marker(staged: Path) -> str | None:
    try:
        name = (staged / PREVIOUS).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if name and "/" not in name else None


def _flip(paths: Paths, target: Path) -> None:
    """Point ``paths.link`` at ``target`` atomically (new symlink + rename over the old)."""
    tmp = paths.root / f".{paths.name}.link.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, paths.link)
    fsync_dir(paths.root)
