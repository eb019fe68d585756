"""Unattended updates: ``bootstrap auto-update [--dry-run] [NAME...]``.

For each installed container whose auto-update policy is not ``off`` (see
:class:`~bootstrap.deploy.deploy.Options`), find the digest its image reference names now —
``registry``: one ``HEAD`` of the manifest (:meth:`RegistryClient.head_digest`, with the
registries' auth and mirrors); ``local``: the tag in the store — and compare it with the
deployed image's source digest (what ``pull`` printed when it was pulled). When they differ,
run the ordinary staged update (:meth:`Deployer.update`: pull through the normal pull path,
stage, restart, settle, health check, roll back on failure, all under the container's lock).

Containers are taken one at a time, dependencies first (their ``after:``), otherwise by name.
When a container with a CRI socket (the CRI daemon) was updated, the run waits until that socket
answers ``Version`` again and then restarts the running containers ordered after it; if it does
not answer, the container is rolled back. The first failure stops the run: later containers
are not looked at. Containers with policy ``off`` are never touched.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bootstrap.deploy.deploy import Deployer, Deployment, Paths, RolledBackError
from bootstrap.errors import BootstrapError, ExitCode, UsageError
from bootstrap.image import api
from bootstrap.systemd import units

log = logging.getLogger(__name__)

RESULTS = ("unchanged", "pending", "updated", "rolled-back", "failed")


@dataclass(frozen=True)
class Outcome:
    """What the run did to one container: ``from_digest`` the deployed source digest,
    ``to_digest`` the one its reference names now ("" when not looked up: policy off, or the
    lookup failed); ``result`` one of :data:`RESULTS`; ``message`` says why, in a line."""

    name: str
    image: str
    policy: str
    from_digest: str
    to_digest: str
    result: str
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "policy": self.policy,
            "from": self.from_digest,
            "to": self.to_digest or None,
            "result": self.result,
            "message": self.message,
        }


@dataclass(frozen=True)
class Report:
    """Every container looked at, in the order handled; ``elapsed`` seconds for the run."""

    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)
    dry_run: bool = False
    elapsed: float = 0.0

    @property
    def exit_code(self) -> int:
        """5 (systemd/runtime) when a container rolled back or failed, else 0."""
        bad = any(o.result in ("rolled-back", "failed") for o in self.outcomes)
        return int(ExitCode.SYSTEMD) if bad else int(ExitCode.OK)

    def to_json(self) -> list[dict[str, Any]]:
        return [o.to_json() for o in self.outcomes]

    def to_text(self) -> str:
        if not self.outcomes:
            return "no system containers installed"
        rows = [("NAME", "POLICY", "RESULT", "FROM", "TO", "IMAGE")]
        for o in self.outcomes:
            rows.append(
                (
                    o.name,
                    o.policy,
                    o.result,
                    _short(o.from_digest),
                    _short(o.to_digest),
                    o.image,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5] for r in rows]
        lines += [f"{o.name}: {o.message}" for o in self.outcomes if o.result in RESULTS[3:]]
        return "\n".join(lines)


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12] if digest else "-"


def order(deployments: Sequence[Deployment]) -> list[Deployment]:
    """``deployments`` dependencies first (``after``; names not among them are ignored),
    otherwise by name. A cycle (which ``up`` refuses) is broken by name order."""
    left = sorted(deployments, key=lambda d: d.name)
    names = {d.name for d in left}
    placed: set[str] = set()
    out: list[Deployment] = []
    while left:
        ready = [d for d in left if all(a in placed or a not in names for a in d.after)]
        d = ready[0] if ready else left[0]
        out.append(d)
        placed.add(d.name)
        left.remove(d)
    return out


def auto_update(
    deployer: Deployer,
    names: Sequence[str] = (),
    *,
    dry_run: bool = False,
    remote: api.Remote | None = None,
) -> Report:
    """Run one auto-update pass over ``names`` (default: every installed container).

    Returns the :class:`Report` (its ``exit_code`` is 5 when something rolled back or failed);
    raises :class:`UsageError` (exit 2) for a name that is not installed, before anything is
    looked up. ``remote``: where registry digests are looked up (default: an
    :class:`~bootstrap.image.api.Remote` of this pass, whose client is opened when the first
    ``registry`` container is reached)."""
    started = time.monotonic()
    wanted = [units.check_name(n) for n in names] or deployer.names()
    deployments = []
    for name in wanted:
        paths = Paths(deployer.state, name)
        if paths.active() is None and not paths.link.is_symlink():
            raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
        # under the container's lock, so what an interrupted update left is repaired first and
        # an unproven staged deployment is never taken for the deployed one
        with deployer.locked(paths):
            active = paths.active()
            if active is None:
                raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
            deployments.append(Deployment.load(active))
    outcomes: list[Outcome] = []
    lookup = remote if remote is not None else api.Remote()
    try:
        for current in order(deployments):
            outcome = _one(deployer, current, lookup, dry_run)
            _log(outcome)
            outcomes.append(outcome)
            if outcome.result == "updated" and current.cri_socket:
                outcome = _after_cri(deployer, current, deployments, outcome)
                if outcome.result != "updated":
                    _log(outcome)
                outcomes[-1] = outcome
            if outcome.result in ("rolled-back", "failed"):
                left = [d.name for d in deployments if d.name not in {o.name for o in outcomes}]
                if left:
                    log.warning("auto-update: stopping; not looked at: %s", ", ".join(left))
                break
    finally:
        if remote is None:
            lookup.close()
    return Report(tuple(outcomes), dry_run, time.monotonic() - started)


def _one(deployer: Deployer, current: Deployment, remote: api.Remote, dry_run: bool) -> Outcome:
    name, policy = current.name, current.auto_update

    def outcome(to: str, result: str, message: str) -> Outcome:
        return Outcome(name, current.image, policy, current.source_digest, to, result, message)

    if policy not in ("registry", "local"):
        return outcome("", "unchanged", "auto-update is off")
    try:
        now = _digest_now(deployer, current, remote)
    except BootstrapError as err:
        return outcome("", "failed", f"cannot look up {current.image}: {err.message}")
    if now == current.source_digest:
        return outcome(now, "unchanged", f"{current.image} is still {_short(now)}")
    if dry_run:
        return outcome(now, "pending", f"{current.image} moved to {_short(now)} (dry run)")
    try:
        result = deployer.update(
            name, None, set_values={}, definition_dir=None, pull=policy == "registry"
        )
    except RolledBackError as err:
        return outcome(now, "rolled-back", err.message)
    except BootstrapError as err:
        return outcome(now, "failed", err.message)
    new = result.deployment.source_digest if result.deployment is not None else now
    if not result.changed:
        return outcome(new, "unchanged", result.message)
    return outcome(new, "updated", result.message)


def _digest_now(deployer: Deployer, current: Deployment, remote: api.Remote) -> str:
    if current.auto_update == "registry":
        return remote.digest(current.image).digest
    return deployer.source_digest(deployer.image(current.image, pull="never"))


def _after_cri(
    deployer: Deployer, cri: Deployment, deployments: Sequence[Deployment], done: Outcome
) -> Outcome:
    """Wait for the updated CRI daemon ``cri`` to answer, then restart its running dependants;
    roll it back when it does not answer."""
    from bootstrap.cri.client import wait_for_cri

    try:
        log.info("auto-update: %s: waiting for CRI Version on %s", cri.name, cri.cri_socket)
        wait_for_cri(cri.cri_socket, timeout=cri.ready_timeout, network=False, what=cri.name)
    except BootstrapError as err:
        try:
            deployer.rollback(cri.name)
        except BootstrapError as again:
            return _replace(done, "failed", f"{err.message}; rollback failed: {again.message}")
        return _replace(done, "rolled-back", f"{err.message}; rolled back")
    for dep in deployments:
        if cri.name not in dep.after:
            continue
        unit = Paths(deployer.state, dep.name).unit
        try:
            if deployer.manager.state(unit).running:
                log.info("auto-update: %s: restarting %s after %s", dep.name, unit, cri.name)
                deployer.manager.restart(unit)
        except BootstrapError as err:
            return _replace(done, "failed", f"restarting {unit}: {err.message}")
    return done


def _replace(o: Outcome, result: str, message: str) -> Outcome:
    return Outcome(o.name, o.image, o.policy, o.from_digest, o.to_digest, result, message)


def _log(o: Outcome) -> None:
    """One journald-friendly line per container."""
    level = logging.WARNING if o.result in ("rolled-back", "failed") else logging.INFO
    log.log(
        level,
        "auto-update: %s: %s (policy %s, %s -> %s): %s",
        o.name,
        o.result,
        o.policy,
        _short(o.from_digest),
        _short(o.to_digest),
        o.message,
    )
    sys.stderr.flush()
