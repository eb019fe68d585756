"""The records of system-container deployments: where a container's pieces live, what a
deployment's ``info.json`` holds, the options kept with it, and what the commands return.

Layout under ``$STATE/containers`` (:class:`Paths`)::

    NAME -> NAME.0        the active deployment (a symlink, flipped atomically)
    NAME.0/ NAME.1/       deployments: rootfs/, config.json, info.json, NAME.service,
                          tmpfiles.conf (when the definition has one), definition/ (a copy of a
                          --definition directory), hostfs.json (the host files it owns) and
                          hostfs.pending (while its host files are being changed)
    NAME.new/             a deployment being staged or proven by an update (transient)

:class:`Deployment` is one deployment as its ``info.json`` describes it: :meth:`Deployment.info`
is the document written, :meth:`Deployment.load` reads it back (a missing or damaged one is a
:class:`~bootstrap.errors.BootstrapError`), :func:`update_info` rewrites some of its keys. The
results (:class:`DeployResult`, :class:`ContainerStatus`, :class:`ListResult`) have
``to_json()`` and ``to_text()``. Data only: nothing here talks to systemd or runc, and the
modules a ``list`` with nothing installed does not need (host files, health checks) are imported
by the calls that read a deployment.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootstrap.errors import BootstrapError

if TYPE_CHECKING:
    from bootstrap.deploy.failures import Failed
    from bootstrap.deploy.hostfs import Entry
    from bootstrap.runtime.health import HealthCheck
    from bootstrap.runtime.runc import ContainerState
    from bootstrap.systemd.manager import UnitState

INFO = "info.json"
CONFIG = "config.json"
TMPFILES = "tmpfiles.conf"
DEFINITION_COPY = "definition"


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


def names(state: Path) -> list[str]:
    """The containers installed below ``state``, sorted: each ``$STATE/containers/NAME``
    symlink (slots and the staged directory have a dot in their names)."""
    try:
        with os.scandir(state / "containers") as it:
            return sorted(e.name for e in it if e.is_symlink() and "." not in e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


# ---- deployment records ------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """Per-container settings kept with the deployment beside the image and values:
    ``auto_update`` None means the definition's default (else ``off``); ``after`` and
    ``cri_socket``/``ready_timeout`` come from a node manifest (ordering and readiness)."""

    auto_update: str | None = None
    after: tuple[str, ...] = ()
    cri_socket: str = ""
    ready_timeout: float = 300.0

    def policy(self, default: str | None) -> tuple[str, str]:
        """The auto-update policy and where it came from: given (``install``), else the
        definition's ``default`` (``definition``), else ``off`` (``default``)."""
        if self.auto_update is not None:
            return self.auto_update, "install"
        if default is None:
            return "off", "default"
        return default or "off", "definition"


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
    host_files: tuple[Entry, ...] = ()
    #: How the container imports an image archive (a CRI daemon; the definition's
    #: ``imageImport`` rendered with this deployment's values): argv and timeout in seconds.
    image_import: tuple[str, ...] = ()
    image_import_timeout: float = 0.0
    #: The definition's health check (None: none, or recorded by an older bootstrap).
    health: HealthCheck | None = None

    @classmethod
    def load(cls, path: Path) -> Deployment:
        """Read ``path/info.json``; a missing or damaged one is a :class:`BootstrapError`."""
        from bootstrap.deploy import hostfs
        from bootstrap.runtime.health import HealthCheck

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

    def info(self) -> dict[str, Any]:
        """The deployment's info.json document (what :meth:`load` reads back; the host files
        are kept apart, in ``hostfs.json``)."""
        doc = {**self._record_json(), **self._image_import_json()}
        if self.health is not None:
            doc["health"] = self.health.to_json()
        return doc

    def to_json(self) -> dict[str, Any]:
        record = self._record_json()
        return {
            "name": record.pop("name"),
            "path": str(self.path),
            "slot": self.path.name,
            **record,
            "host_files": [e.to_json() for e in self.host_files],
            **self._image_import_json(),
            "health": self.health.to_json() if self.health else None,
        }

    def _record_json(self) -> dict[str, Any]:
        """What info.json and the JSON output both hold, in that order: the image, the values,
        the definition, when and where it was installed, the options, the admitting policy."""
        return {
            "name": self.name,
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

    def host_counts(self) -> tuple[int, int]:
        """How many of the host files it owns are files or symlinks, and how many
        directories."""
        from bootstrap.deploy.hostfs import DIRECTORY

        dirs = sum(1 for e in self.host_files if e.type == DIRECTORY)
        return len(self.host_files) - dirs, dirs

    def options(self) -> Options:
        """What an update keeps of this deployment's options: an explicit policy (one that came
        from the definition follows the new definition), the ordering and the readiness."""
        return Options(
            auto_update=self.auto_update if self.auto_update_from == "install" else None,
            after=self.after,
            cri_socket=self.cri_socket,
            ready_timeout=self.ready_timeout,
        )

    def options_differ(self, options: Options) -> bool:
        """Whether recording ``options`` would change this deployment's."""
        return (
            (options.auto_update is not None and options.auto_update != self.auto_update)
            or tuple(options.after) != self.after
            or options.cri_socket != self.cri_socket
            or options.ready_timeout != self.ready_timeout
        )


def write_info(slot: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as ``slot``'s info.json (temp + fsync + rename)."""
    from bootstrap.fsutil import write_atomic

    write_atomic(slot / INFO, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def update_info(slot: Path, changes: Mapping[str, Any]) -> Deployment:
    """Rewrite ``slot``'s info.json with ``changes`` (every other key as it was, unknown ones
    included) and return the deployment it now describes."""
    doc = json.loads((slot / INFO).read_text(encoding="utf-8"))
    doc.update(changes)
    write_info(slot, doc)
    return Deployment.load(slot)


def options_changes(options: Options) -> dict[str, Any]:
    """The info.json keys that record ``options`` (the policy only when one is given)."""
    changes: dict[str, Any] = {}
    if options.auto_update is not None:
        changes["auto_update"], changes["auto_update_from"] = options.auto_update, "install"
    changes["after"] = list(options.after)
    changes["cri_socket"] = options.cri_socket
    changes["ready_timeout"] = options.ready_timeout
    return changes


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
    runc: ContainerState | None
    problems: tuple[str, ...] = ()
    #: A digest of its image that was rolled back (auto-update skips it; see
    #: :mod:`bootstrap.deploy.failures`).
    failed: Failed | None = None

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
                files, dirs = self.active.host_counts()
                lines.append(
                    f"  host:     {files} files/symlinks, {dirs} directories from /exports/hostfs"
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


@dataclass(frozen=True)
class ListResult:
    """What ``bootstrap list`` shows: every installed container."""

    containers: tuple[ContainerStatus, ...] = field(default_factory=tuple)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": c.name,
                "image": c.active.image if c.active else None,
                "digest": c.active.digest if c.active else None,
                "slot": c.active.path.name if c.active else None,
                "active_state": c.unit.active_state if c.unit else None,
                "sub_state": c.unit.sub_state if c.unit else None,
                "rollback": c.previous.image if c.previous else None,
                "auto_update": c.active.auto_update if c.active else None,
            }
            for c in self.containers
        ]

    def to_text(self) -> str:
        if not self.containers:
            return "no system containers installed"
        rows = [("NAME", "STATE", "SLOT", "UPDATE", "IMAGE")]
        for c in self.containers:
            rows.append(
                (
                    c.name,
                    c.unit.active_state if c.unit else "?",
                    c.active.path.name if c.active else "-",
                    c.active.auto_update if c.active else "-",
                    c.active.image if c.active else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows
        )
