"""Node updates: ``bootstrap update --node`` and ``bootstrap auto-update`` as one transaction.

1. A transaction a killed run left behind is finished or rolled back first
   (:func:`finish_interrupted`).
2. **lookup**: every installed container (``update --node``), or every one whose auto-update
   policy is not ``off`` (``auto-update [NAME...]``), is asked for the digest its reference
   names now: ``update --node`` pulls it again (``--no-pull``: the stored tag; ``--dry-run``:
   one ``HEAD``), ``auto-update`` asks the registry (policy ``registry``: one ``HEAD``); a
   container with policy ``local`` follows the tag in the store either way. A digest that
   differs from the deployed source digest is an update; ``auto-update`` skips one that was
   rolled back before (:mod:`bootstrap.deploy.failures`) unless ``--retry-failed``.
3. **pull**: the images of the updates are obtained (pulled, verified, inflated).
4. Under the node lock (``$STATE/locks/node.lock``, exclusive; every per-container command takes
   it shared first) and then the containers' own locks in name order, the updates and their
   running dependants (ordered after one of them, directly or not) are one
   :mod:`bootstrap.deploy.transaction`: staged, started in dependency order, judged, committed
   or rolled back. :class:`DeployerSteps` is what each step does here.
5. A rolled-back update's digest is remembered for the member to blame
   (:func:`~bootstrap.deploy.transaction.blame`); a committed one forgets what was remembered.

The report has podman auto-update's shape: one row per container (UNIT, CONTAINER, IMAGE,
POLICY, UPDATED), then the node's verdict and the seconds each phase took.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bootstrap.deploy import failures, slots, transaction
from bootstrap.deploy.deployer import Deployer, StagedUpdate
from bootstrap.deploy.plan import DEFAULT_JOB_TIMEOUT, restart_settle
from bootstrap.deploy.records import Deployment, Paths
from bootstrap.deploy.transaction import Journal, Member, Outcome
from bootstrap.errors import BootstrapError, ExitCode, SystemdError, UsageError
from bootstrap.image import api
from bootstrap.image.api import Image
from bootstrap.runtime.health import HealthCheck
from bootstrap.systemd import units

log = logging.getLogger(__name__)

#: The UPDATED column: podman auto-update's values, and ``skipped`` (a remembered failure).
UPDATED = ("true", "false", "pending", "skipped", "failed", "rolled back")


@dataclass(frozen=True)
class Row:
    """One container of the report. ``updated`` is one of :data:`UPDATED`; ``result`` says
    the same in the older words (``updated``, ``unchanged``, ``pending``, ``skipped``,
    ``rolled-back``, ``failed``, ``restarted``); ``from_digest``/``to_digest`` are source
    digests ("" when not looked up); ``message`` says why, in a line."""

    unit: str
    container: str
    image: str
    policy: str
    updated: str
    result: str
    from_digest: str = ""
    to_digest: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "container": self.container,
            "name": self.container,
            "image": self.image,
            "policy": self.policy,
            "updated": self.updated,
            "result": self.result,
            "from": self.from_digest or None,
            "to": self.to_digest or None,
            "message": self.message,
        }


#: The node's verdicts: nothing to do, a dry run found updates, committed and healthy, rolled
#: back, or something failed (a lookup, a pull, or the rollback itself).
VERDICTS = ("unchanged", "pending", transaction.HEALTHY, transaction.ROLLED_BACK, "failed")


@dataclass(frozen=True)
class NodeReport:
    """What a node update did: ``rows`` in dependency order, the node's ``verdict`` (one of
    :data:`VERDICTS`), the transaction's :class:`~bootstrap.deploy.transaction.Outcome` (None
    when none ran), ``phases`` (seconds: lookup, pull, stage, start, judge, commit or
    rollback), ``elapsed`` seconds in all; ``recovered``: a transaction a killed run left,
    finished first."""

    command: str
    rows: tuple[Row, ...] = ()
    verdict: str = "unchanged"
    outcome: Outcome | None = None
    phases: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    dry_run: bool = False
    recovered: Outcome | None = None

    @property
    def exit_code(self) -> int:
        """5 (systemd/runtime) when the node rolled back or something failed, else 0."""
        bad = self.verdict in (transaction.ROLLED_BACK, "failed") or any(
            r.updated == "failed" for r in self.rows
        )
        return int(ExitCode.SYSTEMD) if bad else int(ExitCode.OK)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "dry_run": self.dry_run,
            "units": [r.to_json() for r in self.rows],
            "node": {
                "verdict": self.verdict,
                **(self.outcome.to_json() if self.outcome else {}),
                "recovered": self.recovered.to_json() if self.recovered else None,
            },
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "elapsed": round(self.elapsed, 3),
        }

    def to_text(self) -> str:
        lines: list[str] = []
        if self.recovered is not None:
            lines.append(f"first finished an interrupted node update: {_said(self.recovered)}")
        if not self.rows:
            lines.append("no system containers installed")
            return "\n".join(lines)
        table = [("UNIT", "CONTAINER", "IMAGE", "POLICY", "UPDATED")]
        table += [(r.unit, r.container, r.image, r.policy, r.updated) for r in self.rows]
        widths = [max(len(t[i]) for t in table) for i in range(4)]
        for t in table:
            lines.append("  ".join(t[i].ljust(widths[i]) for i in range(4)) + "  " + t[4])
        lines.append(f"node: {self.verdict_line()}")
        if self.phases:
            parts = [f"{k} {v:.2f}s" for k, v in self.phases.items()]
            lines.append(f"phases: {', '.join(parts)} (total {self.elapsed:.2f}s)")
        for r in self.rows:
            if r.updated != "false" or r.result == "restarted":
                lines.append(f"{r.container}: {r.message}")
        return "\n".join(lines)

    def verdict_line(self) -> str:
        o = self.outcome
        if o is None:
            return {
                "unchanged": "unchanged (nothing to update)",
                "pending": "updates pending (dry run)",
                "failed": "not updated (see below)",
            }.get(self.verdict, self.verdict)
        if o.committed:
            return "healthy: " + "; ".join(o.checks) if o.checks else "healthy"
        text = f"{self.verdict}: {_why(o)}"
        if o.problems:
            text += "; the rollback met problems: " + "; ".join(o.problems)
        return text


def _said(o: Outcome) -> str:
    if o.committed:
        return "committed"
    return f"{o.verdict} ({o.failure})"


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12] if digest else "-"


# ---- locks and recovery ------------------------------------------------------------------------


@contextlib.contextmanager
def _member_locks(deployer: Deployer, names: Sequence[str]) -> Iterator[None]:
    """The containers' own locks, in name order (the node lock is held already)."""
    with contextlib.ExitStack() as stack:
        for name in sorted(set(names)):
            stack.enter_context(deployer.container_locked(Paths(deployer.state, name)))
        yield


def finish_interrupted(deployer: Deployer) -> Outcome | None:
    """Finish the node transaction a killed run left (its journal), under the node lock and
    its members' locks: commit one that was committing, roll back any other. None when there
    was none. Raises what :func:`transaction.recover` raises."""
    journal = Journal(deployer.state)
    if not journal.exists():
        return None
    with deployer.node_locked():
        record = journal.read()
        if record is None:
            return None
        with _member_locks(deployer, [m.name for m in record.members]):
            outcome = transaction.recover(journal, DeployerSteps(deployer, {}))
    if outcome is not None:
        log.warning("node update: the interrupted one is %s", _said(outcome))
    return outcome


# ---- the steps of a transaction, over the deployer ---------------------------------------------


class DeployerSteps:
    """:class:`~bootstrap.deploy.transaction.Steps` over ``deployer``: ``images`` are the new
    images of the movers (by name; empty for a recovery, which stages nothing). The caller
    holds the node lock and the members' locks."""

    def __init__(self, deployer: Deployer, images: Mapping[str, Image]) -> None:
        self.d = deployer
        self.images = dict(images)
        self.staged: dict[str, StagedUpdate] = {}
        self.started_at: dict[str, float] = {}

    def _paths(self, m: Member) -> Paths:
        return Paths(self.d.state, m.name)

    def stage(self, m: Member) -> None:
        paths = self._paths(m)
        active = paths.root / m.from_slot
        current = Deployment.load(active)
        self.staged[m.name] = self.d.stage_update(
            paths,
            active,
            current,
            self.images[m.name],
            dict(current.set_values),
            slots.kept_definition(active, current),
            current.options(),
        )

    def switch(self, m: Member) -> None:
        self.d.switch(self.staged[m.name])

    def start(self, m: Member) -> None:
        if not m.was_running:
            return
        paths = self._paths(m)
        staged = self.staged.get(m.name)
        timeout = staged.job_timeout if staged is not None else DEFAULT_JOB_TIMEOUT
        # a CRI daemon's proof is CRI Status (judged next), a oneshot's its command's exit
        settle = 0.0 if m.cri_socket else restart_settle(staged.plan) if staged else None
        log.info("node update: %s: (re)starting %s", m.name, paths.unit)
        self.d.manager.reset_failed(paths.unit)
        self.started_at[m.name] = time.monotonic()
        self.d.manager.restart(paths.unit, timeout=timeout, settle=settle)

    def judge(self, m: Member, *, again: bool) -> str:
        if not m.was_running:
            return f"{m.name}: not running"
        paths = self._paths(m)
        manager = self.d.manager
        state = manager.state(paths.unit)
        if state.active_state != "active":
            raise SystemdError(
                f"{paths.unit} is {state.active_state} ({state.sub_state})",
                f"journalctl -u {paths.unit}",
            )
        said = [f"{paths.unit} active"]
        if m.cri_socket:
            from bootstrap.cri.client import wait_for_cri

            wanted = "RuntimeReady and NetworkReady" if m.network_ready else "RuntimeReady"
            log.info("node update: %s: waiting for CRI Status %s", m.name, wanted)
            wait_for_cri(
                m.cri_socket,
                timeout=min(10.0, m.ready_timeout) if again else m.ready_timeout,
                network=m.network_ready,
                what=f"{m.name} ({paths.unit})",
            )
            said.append(f"CRI {wanted}")
        health = self._health(paths)
        if health is not None:
            from bootstrap.runtime.health import wait_healthy

            if again:
                health = dataclasses.replace(health, start_period=0.0)
            log.info("node update: %s: waiting for its health check %s", m.name, health.describe())
            wait_healthy(
                m.name,
                health,
                alive=lambda: manager.state(paths.unit).active_state == "active",
                started=self.started_at.get(m.name),
            )
            said.append(f"healthy ({health.describe()})")
        return f"{m.name}: {', '.join(said)}"

    def _health(self, paths: Paths) -> HealthCheck | None:
        """The health check of the deployment the symlink names (recorded, else from its
        definition)."""
        live = paths.active()
        if live is None:
            return None
        recorded = Deployment.load(live).health
        if recorded is not None:
            return recorded
        try:
            return slots.definition_of(live).health
        except BootstrapError:
            return None

    def stop(self, m: Member) -> None:
        log.info("node update: %s: stopping %s", m.name, self._paths(m).unit)
        self.d.manager.stop(self._paths(m).unit)

    def restore(self, m: Member) -> None:
        paths = self._paths(m)
        back = paths.root / m.from_slot
        live = paths.active()
        if live != back or paths.staged.exists():
            log.info("node update: %s: back to %s", m.name, m.from_slot)
            self.d.make_live(paths, back, failed=paths.staged)
        slots.remove(paths.staged)

    def reload(self) -> None:
        self.d.manager.reload()

    def commit(self, m: Member) -> None:
        slots.promote(self._paths(m), m.from_slot)

    def settle(self, m: Member) -> None:
        self.d.run_what_the_link_says(self._paths(m))


# ---- the node update ---------------------------------------------------------------------------


@dataclass
class _Candidate:
    current: Deployment
    policy: str
    #: how its digest is found: ``registry`` (HEAD), ``local`` (the store), ``pull``
    mode: str
    digest: str = ""
    image: Image | None = None


def node_update(
    deployer: Deployer,
    *,
    command: str,
    names: Sequence[str] = (),
    dry_run: bool = False,
    pull: bool = True,
    retry_failed: bool = False,
    remote: api.Remote | None = None,
) -> NodeReport:
    """Run a node update (see the module doc). ``command`` is ``"update --node"`` (every
    container, each pulled again unless not ``pull``; remembered failures are retried) or
    ``"auto-update"`` (``names``, default all, whose policy is not ``off``; remembered
    failures are skipped unless ``retry_failed``). ``dry_run``: look up and report, change
    nothing. Returns the :class:`NodeReport` (exit code 5 when it rolled back or something
    failed); raises :class:`UsageError` for a name that is not installed (before anything is
    looked up), :class:`~bootstrap.errors.BusyError` when the node or a container stays
    locked."""
    started = time.monotonic()
    auto = command == "auto-update"
    recovered = None if dry_run else finish_interrupted(deployer)
    deployments = _installed(deployer, names)
    phases: dict[str, float] = {}
    lap = time.monotonic()
    remembered = failures.load(deployer.state)
    rows: dict[str, Row] = {}
    candidates: list[_Candidate] = []
    lookup = remote if remote is not None else api.Remote()
    try:
        for d in deployments:
            policy = d.auto_update
            row = _row(d, policy)
            if auto and policy not in ("registry", "local"):
                rows[d.name] = row(updated="false", result="unchanged", msg="auto-update is off")
                continue
            # by hand every container is looked at; one that follows the store stays so
            mode = policy if auto or policy == "local" else "registry" if dry_run else "pull"
            try:
                digest, image = _look_up(deployer, d, mode, lookup, pull=pull)
            except BootstrapError as err:
                msg = f"cannot look up {d.image}: {err.message}"
                rows[d.name] = row(updated="failed", result="failed", msg=msg)
                continue
            if digest == d.source_digest:
                rows[d.name] = row(
                    updated="false", result="unchanged", to=digest, msg=f"still {_short(digest)}"
                )
                continue
            known = remembered.get(d.name)
            if auto and not retry_failed and known is not None and known.matches(d.image, digest):
                rows[d.name] = row(
                    updated="skipped", result="skipped", to=digest, msg=known.skip_note()
                )
                continue
            if dry_run:
                rows[d.name] = row(
                    updated="pending",
                    result="pending",
                    to=digest,
                    msg=f"{d.image} moved to {_short(digest)} (dry run)",
                )
                continue
            candidates.append(_Candidate(d, policy, mode, digest, image))
    finally:
        if remote is None:
            lookup.close()
    phases["lookup"] = time.monotonic() - lap
    lap = time.monotonic()
    pulled = False
    for c in candidates:
        if c.image is None:
            pulled = True
            try:
                c.image = deployer.image(c.current.image, pull=_pull_policy(c.mode, pull))
                c.digest = deployer.source_digest(c.image)
            except BootstrapError as err:
                rows[c.current.name] = _row(c.current, c.policy)(
                    updated="failed", result="failed", to=c.digest, msg=f"pull: {err.message}"
                )
    movers = [c for c in candidates if c.image is not None and c.current.name not in rows]
    if pulled:  # (update --node pulled while it looked up)
        phases["pull"] = time.monotonic() - lap
    dependants = _dependants(deployments, {c.current.name for c in movers}) if movers else []
    if dry_run:
        pending = {n for n, r in rows.items() if r.updated == "pending"}
        for d in _dependants(deployments, pending):
            said = f"would be restarted after {', '.join(a for a in d.after if a in pending)}"
            before = rows.get(d.name)
            if before is not None and before.updated in ("skipped", "failed"):
                rows[d.name] = dataclasses.replace(before, message=f"{before.message}; {said}")
                continue
            rows[d.name] = _row(d, d.auto_update)(updated="false", result="restarted", msg=said)
    outcome = None
    if movers:
        outcome = _transaction(deployer, command, movers, dependants, rows)
        phases.update(outcome.times)
        if outcome.verdict == "unchanged":  # every one was updated meanwhile by another command
            outcome = None
    ordered = tuple(rows[d.name] for d in deployments if d.name in rows)
    for r in ordered:  # one journald-friendly line per container
        bad = r.updated in ("failed", "rolled back")
        log.log(
            logging.WARNING if bad else logging.INFO,
            "%s: %s: %s (policy %s, %s -> %s): %s",
            command,
            r.container,
            r.result,
            r.policy,
            _short(r.from_digest),
            _short(r.to_digest),
            r.message,
        )
    if outcome is not None:
        verdict = outcome.verdict
    elif any(r.updated == "failed" for r in ordered):
        verdict = "failed"
    elif any(r.updated == "pending" for r in ordered):
        verdict = "pending"
    else:
        verdict = "unchanged"
    return NodeReport(
        command,
        ordered,
        verdict,
        outcome,
        phases,
        time.monotonic() - started,
        dry_run,
        recovered,
    )


def _installed(deployer: Deployer, names: Sequence[str]) -> list[Deployment]:
    """The active deployments of ``names`` (default: every installed container), in
    dependency order, each read under its lock (so what an interrupted command left is
    repaired first). :class:`UsageError` for a name that is not installed."""
    wanted = [units.check_name(n) for n in names] or deployer.names()
    out = []
    for name in wanted:
        paths = Paths(deployer.state, name)
        if paths.active() is None and not paths.link.is_symlink():
            raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
        with deployer.locked(paths):
            active = paths.active()
            if active is None:
                raise UsageError(f"{name} is not installed", "see 'bootstrap list'")
            out.append(Deployment.load(active))
    return order(out)


def order(deployments: Sequence[Deployment]) -> list[Deployment]:
    """``deployments`` dependencies first (``after``; names not among them are ignored),
    otherwise by name. A cycle (which ``up`` refuses) is broken by name order."""
    by_name = {d.name: d for d in deployments}
    members = [Member(d.name, False, "", False, after=d.after) for d in deployments]
    return [by_name[m.name] for m in transaction.order(members)]


def _row(d: Deployment, policy: str) -> Any:
    def make(*, updated: str, result: str, to: str = "", msg: str = "") -> Row:
        return Row(
            f"{d.name}.service", d.name, d.image, policy, updated, result, d.source_digest, to, msg
        )

    return make


def _pull_policy(mode: str, pull: bool) -> str:
    if mode == "local":
        return "never"
    return "always" if pull else "missing"


def _look_up(
    deployer: Deployer, d: Deployment, mode: str, remote: api.Remote, *, pull: bool
) -> tuple[str, Image | None]:
    """The source digest ``d``'s reference names now, and its image when it was pulled to find
    out: ``mode`` ``registry`` asks the registry (one HEAD), ``local`` the store, ``pull``
    pulls it again (the stored tag when not ``pull``)."""
    if mode == "local":
        return deployer.source_digest(deployer.image(d.image, pull="never")), None
    if mode == "registry":
        return remote.digest(d.image).digest, None
    image = deployer.image(d.image, pull=_pull_policy(mode, pull))
    return deployer.source_digest(image), image


def _dependants(deployments: Sequence[Deployment], moving: set[str]) -> list[Deployment]:
    """The containers ordered after one in ``moving`` (directly or not), not moving
    themselves, in the order of ``deployments``."""
    reached = set(moving)
    changed = True
    while changed:
        changed = False
        for d in deployments:
            if d.name not in reached and any(a in reached for a in d.after):
                reached.add(d.name)
                changed = True
    return [d for d in deployments if d.name in reached and d.name not in moving]


def _network_ready(socket: str) -> bool:
    """Whether the CRI daemon on ``socket`` reports NetworkReady now (False when it does not
    answer): what the daemon must report again after the update."""
    from bootstrap.cri.client import CriClient, CriError

    try:
        with CriClient(socket, timeout=5.0) as client:
            return client.status().network_ready
    except CriError as err:
        log.info("node update: %s: %s; NetworkReady is not required after", socket, err.message)
        return False


def _transaction(
    deployer: Deployer,
    command: str,
    movers: Sequence[_Candidate],
    dependants: Sequence[Deployment],
    rows: dict[str, Row],
) -> Outcome:
    """Run the transaction over ``movers`` and the running ``dependants`` under the node lock
    and their locks; fill ``rows`` and remember or forget failed digests."""
    by_name = {c.current.name: c for c in movers}
    names = [*by_name, *(d.name for d in dependants)]
    with deployer.node_locked(), _member_locks(deployer, names):
        members: list[Member] = []
        images: dict[str, Image] = {}
        for name in names:
            paths = Paths(deployer.state, name)
            active = paths.active()
            if active is None:
                continue  # uninstalled meanwhile
            current = Deployment.load(active)
            running = deployer.manager.state(paths.unit).running
            c = by_name.get(name)
            move = c is not None and c.image is not None and c.digest != current.source_digest
            if c is not None and not move:
                rows[name] = _row(current, c.policy)(
                    updated="false", result="unchanged", msg="updated meanwhile by another command"
                )
                continue
            if not move and not running:
                continue  # a dependant that does not run is not started
            if c is not None and c.image is not None:
                images[name] = c.image
            members.append(
                Member(
                    name=name,
                    move=move,
                    from_slot=active.name,
                    was_running=running,
                    image=current.image,
                    from_digest=current.source_digest,
                    to_digest=c.digest if c is not None else "",
                    policy=c.policy if c is not None else current.auto_update,
                    after=current.after,
                    cri_socket=current.cri_socket,
                    ready_timeout=current.ready_timeout,
                    network_ready=bool(current.cri_socket and running)
                    and _network_ready(current.cri_socket),
                )
            )
        if not any(m.move for m in members):
            return Outcome("unchanged", tuple(members))
        steps = DeployerSteps(deployer, images)
        outcome = transaction.run(Journal(deployer.state), steps, members, command=command)
    _record(deployer, outcome, rows)
    return outcome


def _why(outcome: Outcome) -> str:
    """What made ``outcome`` roll back, naming the member unless its message does."""
    who = outcome.failed_member or "node"
    text = outcome.failure or outcome.verdict
    return text if text.startswith(f"{who}:") or text.startswith(f"{who} ") else f"{who}: {text}"


def _record(deployer: Deployer, outcome: Outcome, rows: dict[str, Row]) -> None:
    """Rows for the members; remember the blamed movers' digests after a rollback that judged
    them (not after one of staging), forget a committed mover's."""
    blamed = set()
    judged = outcome.phase in ("starting", "judging")
    if not outcome.committed and judged:
        for m in transaction.blame(outcome.members, outcome.failed_member):
            failures.remember(
                deployer.state, m.name, m.image, m.to_digest, outcome.failure or outcome.verdict
            )
            blamed.add(m.name)
    for m in outcome.members:
        unit = f"{m.name}.service"
        if m.move:
            if outcome.committed:
                failures.forget(deployer.state, m.name)
                row = Row(
                    unit,
                    m.name,
                    m.image,
                    m.policy,
                    "true",
                    "updated",
                    m.from_digest,
                    m.to_digest,
                    f"updated {_short(m.from_digest)} -> {_short(m.to_digest)}",
                )
            else:
                why = "rolled back" + (
                    " (remembered: auto-update skips it)" if m.name in blamed else " with the node"
                )
                updated = "rolled back" if outcome.verdict != "failed" else "failed"
                row = Row(
                    unit,
                    m.name,
                    m.image,
                    m.policy,
                    updated,
                    "rolled-back",
                    m.from_digest,
                    m.to_digest,
                    f"{_short(m.to_digest)} {why}: {_why(outcome)}",
                )
        else:
            after = ", ".join(a for a in m.after if any(x.name == a for x in outcome.members))
            how = "restarted after" if outcome.committed else "restarted on its old version after"
            if not outcome.committed:
                how += " the rollback of"
            said = f"{how} {after}"
            before = rows.get(m.name)
            if before is not None and before.updated == "skipped":
                said += f"; its update was skipped: {before.message}"
            row = Row(
                unit,
                m.name,
                m.image,
                m.policy,
                "false",
                "restarted",
                m.from_digest,
                before.to_digest if before is not None else m.from_digest,
                said,
            )
        rows[m.name] = row
