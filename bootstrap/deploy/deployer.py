"""The deployer: install, update, rollback, uninstall, status and list of system containers, each
composing a plan, the slots, a checkout of the image, the host files and the unit under systemd.

The unit runs ``runc run --bundle $STATE/containers/NAME NAME``: the bundle is the symlink, so a
unit is the same whichever slot is active (:mod:`bootstrap.deploy.slots`). Per-container
operations hold the node lock shared, then an flock on ``$STATE/locks/containers/NAME.lock``
(a second one waits up to ``$BOOTSTRAP_LOCK_TIMEOUT`` seconds, default 60, then exits 6), and
repair what an interrupted command left first (:func:`bootstrap.deploy.slots.recover`).

Everything that can be checked before touching disk is (definition files, variables, values,
the runtime config, conflicts of the image's host files); a failure later removes what was
staged, so a failed command leaves the deployments, the unit, the tmpfiles file and the host
files as they were. Host files change with the symlink, before the unit (re)starts, so a
daemon finds its config and plugins in place; a failed update or rollback makes the host
files and the unit those of the slot it goes back to before restarting it. Install refuses,
before anything is written, a shipped path the host holds that is not the container's; update
refuses new ones the same way; rollback, restore, recovery and uninstall never fail on them
(they keep the host's file, with a warning line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.deploy import definition as defn
from bootstrap.deploy import failures, hostfs, records, slots, transaction
from bootstrap.deploy.definition import Definition
from bootstrap.deploy.plan import (
    Plan,
    health_job_timeout,
    install_settle,
    plan,
    restart_settle,
)
from bootstrap.deploy.records import (
    CONFIG,
    DEFINITION_COPY,
    INFO,
    TMPFILES,
    ContainerStatus,
    Deployment,
    DeployResult,
    ListResult,
    Options,
    Paths,
    options_changes,
    update_info,
    write_info,
)
from bootstrap.errors import BootstrapError, SystemdError, UsageError
from bootstrap.fsutil import PRIVATE_DIR, fsync_dir, make_dirs, make_private, write_atomic
from bootstrap.image import api
from bootstrap.image.api import Image
from bootstrap.locks import flocked
from bootstrap.process import run
from bootstrap.runtime import config as rtconfig
from bootstrap.runtime import runc
from bootstrap.runtime.health import HealthCheck
from bootstrap.settings import DEFAULT_UNIT_DIR, seconds_from_env
from bootstrap.systemd import units
from bootstrap.systemd.manager import Manager

log = logging.getLogger(__name__)

#: The node lock under ``$STATE/locks``: a node update holds it exclusively, every
#: per-container command shared (before its container's lock).
NODE_LOCK = "node.lock"
DEFAULT_TMPFILES_DIR = Path("/etc/tmpfiles.d")
DEFAULT_LOCK_TIMEOUT = 60.0


def lock_timeout() -> float:
    """Seconds to wait for another operation on the same container (``$BOOTSTRAP_LOCK_TIMEOUT``)."""
    return seconds_from_env("BOOTSTRAP_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)


def tmpfiles_dir() -> Path:
    """Where tmpfiles.d files go (``$BOOTSTRAP_TMPFILES_DIR``, default /etc/tmpfiles.d)."""
    return Path(os.environ.get("BOOTSTRAP_TMPFILES_DIR") or DEFAULT_TMPFILES_DIR)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RolledBackError(SystemdError):
    """An update failed (did not start, did not settle, unhealthy) and the previous deployment
    was made live again and restarted (exit 5)."""


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


# ---- the deployer ------------------------------------------------------------------------------


class Deployer:
    """Operations on system containers below ``state``, pulling from / checking out of
    ``store``. ``manager`` is created on first use (the bus is only needed to act on units).
    ``finish_node_update(deployer)`` finishes a node update a killed run left (its journal)
    before a per-container command (:func:`bootstrap.deploy.nodeupdate.finish_interrupted`,
    which :mod:`bootstrap.deploy.api` passes); without it such a journal is an error."""

    def __init__(
        self,
        state: Path,
        store: Any,
        *,
        manager: Manager | None = None,
        progress: Any = None,
        verifier: Callable[[], Any] | None = None,
        finish_node_update: Callable[[Deployer], object] | None = None,
    ) -> None:
        self.state = Path(state)
        self.store = store
        self._manager = manager
        self.progress = progress
        self._verifier_factory = verifier
        self._verifier: Any = None
        self._finish_node_update = finish_node_update

    @property
    def manager(self) -> Manager:
        if self._manager is None:
            self._manager = Manager()
        return self._manager

    # -- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, paths: Paths) -> Iterator[None]:
        """Hold the node lock shared, then container ``paths.name``'s lock, for the block;
        first finish a node update a killed run left (its journal), then repair what an
        interrupted command on this container left (:meth:`_recover`)."""
        with self._node_shared(), self.container_locked(paths):
            self._recover(paths)
            yield

    @contextlib.contextmanager
    def container_locked(self, paths: Paths) -> Iterator[None]:
        """Hold container ``paths.name``'s own lock (nothing is repaired); waits up to
        :func:`lock_timeout`, then :class:`~bootstrap.errors.BusyError` (exit 6)."""
        with flocked(paths.lock, timeout=lock_timeout(), what=f"system container {paths.name}"):
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
        left is finished first (``finish_node_update``, under the node lock held exclusively),
        as often as one appears before the lock is had."""
        journal = self.state.joinpath(*transaction.JOURNAL)
        while True:
            if journal.exists():
                if self._finish_node_update is None:
                    raise BootstrapError(
                        f"{journal}: a node update was interrupted",
                        "run 'bootstrap update --node' to finish it",
                    )
                self._finish_node_update(self)
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
        """Repair what an interrupted command on ``paths`` left (:func:`slots.recover`); when
        the symlink went back to a slot, its unit and tmpfiles files follow, systemd is
        reloaded and a unit running another deployment is restarted."""

        def went_back(slot: Path) -> None:
            self._install_unit(paths, slot, Path(Deployment.load(slot).unit_dir))
            self.manager.reload()
            self.run_what_the_link_says(paths)  # before the slot it may run is removed

        slots.recover(paths, went_back=went_back)

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
        users = list(slots.all_slots(paths))
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
        slots.remove(staged)
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
            record = the_plan.record(
                staged,
                installed=_now(),
                source_digest=self.source_digest(image),
                options=options,
                admitted=self._admitted(the_plan.image.name),
            )
            write_info(staged, record.info())
            fsync_dir(staged)
            return the_plan
        except BaseException:
            slots.remove(staged)
            raise

    def source_digest(self, image: Image) -> str:
        """The digest the registry served for ``image``'s reference (what ``pull`` printed;
        the store keeps it when it differs from the stored manifest's)."""
        found = api.provenance(self.store, image.name)
        return found.source_digest if found is not None else image.manifest.digest

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
                if same and current.options_differ(options):
                    current = update_info(active, options_changes(options))
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
                slots.remove(leftover)
            os.rename(paths.staged, slot)
            try:  # host-file conflicts are refused before the slot is live
                host = hostfs.prepare(name, (), slots.shipped(slot), strict=True)
                host.begin(slot)
            except BaseException:
                slots.remove(slot)
                raise
            slots.flip(paths, slot)
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
            active = slots.require_active(paths)
            current = Deployment.load(active)
            options = current.options()
            if auto_update is not None:
                options = dataclasses.replace(options, auto_update=auto_update)
            udir = Path(current.unit_dir)
            self.manager.state(paths.unit)  # systemd must be reachable before anything changes
            ref = reference or current.image
            image = self.image(ref, pull="always" if pull else "missing")
            values = {**current.set_values, **set_values}
            definition = new_definition or slots.kept_definition(active, current)
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
                    current = update_info(active, {"source_digest": source})
                if current.options_differ(options):
                    current = update_info(active, options_changes(options))
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
                slots.remove(paths.staged)
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
            older = slots.promote(paths, active.name)
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
            known = {e.path for e in slots.shipped(active).entries}
            host = hostfs.prepare(
                paths.name, owned, slots.shipped(paths.staged), strict=True, known=known
            )
        except BaseException:
            slots.remove(paths.staged)
            raise
        return StagedUpdate(paths, active, current, staged, host)

    def switch(self, staged: StagedUpdate) -> None:
        """Make ``staged`` live without (re)starting its unit: mark it with the slot it
        replaces (:data:`~bootstrap.deploy.slots.PREVIOUS`), move the host files (marked
        first), point the symlink at it, write its unit and tmpfiles files, reload systemd,
        clear a past start limit."""
        paths = staged.paths
        slots.mark_previous(paths, staged.active)
        staged.host.begin(paths.staged)
        slots.flip(paths, paths.staged)
        staged.host.finish(paths.staged)
        self._install_unit(paths, paths.staged, Path(staged.current.unit_dir))
        self.manager.reload()
        self.manager.reset_failed(paths.unit)  # a past start-limit must not block it

    def make_live(
        self, paths: Paths, slot: Path, *, failed: Path | None = None, unit_dir: Path | None = None
    ) -> None:
        """Point ``paths``' symlink back at ``slot`` after a switch to ``failed`` that did not
        prove itself: its host files (taking as ours what either slot records or marks; files
        not ours kept), its unit and tmpfiles files (into ``unit_dir``, default the one its
        record names). systemd is not reloaded and nothing is (re)started here."""
        slots.settle_host_files(paths, slot, flip_link=True, owned_by=(slot, failed))
        self._install_unit(paths, slot, unit_dir or Path(Deployment.load(slot).unit_dir))

    def _wait_healthy(self, paths: Paths, check: HealthCheck) -> None:
        """Wait for ``check`` to pass in the running container; :class:`SystemdError` when it
        fails or the unit stops meanwhile."""
        from bootstrap.runtime.health import wait_healthy

        log.info("%s: waiting for its health check %s", paths.name, check.describe())
        wait_healthy(
            paths.name, check, alive=lambda: self.manager.state(paths.unit).active_state == "active"
        )

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
        try:
            self.make_live(paths, slot, failed=failed, unit_dir=udir)
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
            active = slots.require_active(paths)
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
            host = hostfs.prepare(name, hostfs.claims(active), slots.shipped(target), strict=False)
            host.begin(target)
            slots.flip(paths, target)
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
            present = [p for p in (paths.slot(0), paths.slot(1)) if os.path.lexists(p)]
            if active is None and not present and not paths.link.is_symlink():
                raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
            self.manager.state(paths.unit)  # systemd must be reachable before anything changes
            udir = DEFAULT_UNIT_DIR
            for candidate in [active, *present]:
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
        sources += [s for s in slots.all_slots(paths) if s not in sources and hostfs.pending(s)]
        owned = [e for s in sources for e in hostfs.claims(s)]
        if owned:  # ours removed, modified ones kept (a warning each), adopted ones left
            hostfs.prepare(paths.name, owned, hostfs.NOTHING, strict=False).apply()
        runc.delete(paths.name)
        paths.link.unlink(missing_ok=True)
        for p in (paths.slot(0), paths.slot(1), paths.staged, paths.trash):
            slots.remove(p)
        if paths.root.exists():
            fsync_dir(paths.root)

    # -- list / status -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The installed containers, sorted (:func:`~bootstrap.deploy.records.names`)."""
        return records.names(self.state)

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
        installed = self.names()
        if not installed:
            return ListResult(())
        try:
            _ = self.manager  # connect once; every status below shares it
            reachable = True
        except SystemdError:
            reachable = False
        out = []
        for name in installed:
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


def _fits_mount_options(*dirs: Path) -> bool:
    """Paths usable in overlay mount options (no separators ``,`` ``:`` ``\\``, no spaces)."""
    return not any(c in str(d) for d in dirs for c in ",:\\ \t\n=")


def _host_note(deployment: Deployment) -> str:
    n, _ = deployment.host_counts()
    return f"; {n} host files from /exports/hostfs" if n else ""
