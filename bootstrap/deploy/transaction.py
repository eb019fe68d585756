"""A node transaction: several system containers updated as one — staged first, started in
dependency order, judged by the node's health, then committed all or rolled back all.

This module is the state machine and its journal; what each step does to a container is behind
the :class:`Steps` protocol (:mod:`bootstrap.deploy.nodeupdate` implements it over the
deployer; the unit tests over a recording fake).

**Members**, in dependency order (the ``after:`` recorded with each deployment): containers
that *move* (a new deployment staged in ``NAME.new``) and the running containers ordered after
one of them (*dependants*, restarted on the version they run). Each records the slot it came
from, whether its unit was running, and for a CRI daemon whether CRI ``NetworkReady`` held
before (then it must hold after).

**Phases**, each recorded in the journal before it is entered:

``staging``
    ``NAME.new`` is built and checked against the host for every mover. Nothing live changes.
``starting``
    In order: a mover's symlink, host files and unit are switched to ``NAME.new`` and its unit
    restarted; a dependant is restarted. Each is judged right after its start (a CRI daemon
    must answer CRI ``Status`` with RuntimeReady, and NetworkReady when it held before; a
    definition's health check must pass), so the next starts on a healthy predecessor.
    ``started`` names the members done.
``judging``
    Every member judged again, together: the node's verdict.
``committing``
    The point of no return: ``NAME.new`` becomes each mover's slot (the slot it came from
    stays as its rollback target).
``rolling-back``
    After a failure in any phase before ``committing``: nothing to undo but the staged
    directories while ``staging``; otherwise every member is stopped in reverse order, every
    mover is pointed back at the slot it came from (its host files and unit too), and the
    members that ran are started again in order, each judged as far as it can be.

The journal is removed when the transaction ended either way. **Recovery** (:func:`recover`:
the next ``update --node`` or ``auto-update``, ``up``, or any command on a member) finds a
journal left by a killed run: in ``committing`` it commits (idempotently) and restarts a member
that does not run what its ``NAME`` symlink says; in any other phase it rolls back as above.

The journal, ``$STATE/node/transaction.json`` (temp + fsync + rename), e.g.::

    {"version": 1, "id": "6f1c...", "command": "update --node", "started": "2026-...Z",
     "phase": "starting", "started_members": ["ocid"], "failure": "", "failed_member": "",
     "members": [
       {"name": "ocid", "move": true, "from_slot": "ocid.0", "was_running": true,
        "image": "registry.example/ocid:1.7", "from_digest": "sha256:...",
        "to_digest": "sha256:...", "policy": "registry",
        "cri_socket": "/run/containerd/containerd.sock", "ready_timeout": 120.0,
        "network_ready": true},
       {"name": "kubelet", "move": false, "from_slot": "kubelet.1", "was_running": true, ...}],
     "times": {"stage": 1.52}}
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from bootstrap.errors import BootstrapError
from bootstrap.fsutil import write_atomic

log = logging.getLogger(__name__)

VERSION = 1
JOURNAL = ("node", "transaction.json")
#: Phases in the order a successful transaction passes them (``rolling-back`` is the other
#: way out).
PHASES = ("staging", "starting", "judging", "committing")
ROLLING_BACK = "rolling-back"
#: Verdicts of an :class:`Outcome`.
HEALTHY, ROLLED_BACK, FAILED = "healthy", "rolled-back", "failed"


@dataclass(frozen=True)
class Member:
    """One container of a transaction (see the module doc). ``to_digest`` and ``from_digest``
    are source digests (what the registry serves); ``network_ready``: CRI NetworkReady held
    before, so it must hold after."""

    name: str
    move: bool
    from_slot: str
    was_running: bool
    image: str = ""
    from_digest: str = ""
    to_digest: str = ""
    policy: str = ""
    after: tuple[str, ...] = ()
    cri_socket: str = ""
    ready_timeout: float = 300.0
    network_ready: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "move": self.move,
            "from_slot": self.from_slot,
            "was_running": self.was_running,
            "image": self.image,
            "from_digest": self.from_digest,
            "to_digest": self.to_digest,
            "policy": self.policy,
            "after": list(self.after),
            "cri_socket": self.cri_socket,
            "ready_timeout": self.ready_timeout,
            "network_ready": self.network_ready,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Member:
        """A member as :meth:`to_json` wrote it; KeyError/TypeError/ValueError when malformed."""
        return cls(
            name=str(doc["name"]),
            move=bool(doc["move"]),
            from_slot=str(doc["from_slot"]),
            was_running=bool(doc["was_running"]),
            image=str(doc.get("image", "")),
            from_digest=str(doc.get("from_digest", "")),
            to_digest=str(doc.get("to_digest", "")),
            policy=str(doc.get("policy", "")),
            after=tuple(str(a) for a in doc.get("after", ())),
            cri_socket=str(doc.get("cri_socket", "")),
            ready_timeout=float(doc.get("ready_timeout", 300.0)),
            network_ready=bool(doc.get("network_ready", False)),
        )


@dataclass(frozen=True)
class Record:
    """What the journal holds (see the module doc)."""

    id: str
    command: str
    started: str
    phase: str
    members: tuple[Member, ...]
    started_members: tuple[str, ...] = ()
    failure: str = ""
    failed_member: str = ""
    #: While ``rolling-back``: the phase that failed (``staging``: only staged dirs to drop).
    failed_phase: str = ""
    times: dict[str, float] = field(default_factory=dict)

    @property
    def movers(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.move)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "id": self.id,
            "command": self.command,
            "started": self.started,
            "phase": self.phase,
            "members": [m.to_json() for m in self.members],
            "started_members": list(self.started_members),
            "failure": self.failure,
            "failed_member": self.failed_member,
            "failed_phase": self.failed_phase,
            "times": {k: round(v, 3) for k, v in self.times.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> Record:
        """A record as :meth:`to_json` wrote it; KeyError/TypeError/ValueError when malformed
        or of another version."""
        if not isinstance(doc, dict) or doc.get("version") != VERSION:
            raise ValueError(f"not a version {VERSION} transaction journal")
        phase = str(doc["phase"])
        if phase not in (*PHASES, ROLLING_BACK):
            raise ValueError(f"unknown phase {phase!r}")
        return cls(
            id=str(doc["id"]),
            command=str(doc["command"]),
            started=str(doc["started"]),
            phase=phase,
            members=tuple(Member.from_json(m) for m in doc["members"]),
            started_members=tuple(str(n) for n in doc.get("started_members", ())),
            failure=str(doc.get("failure", "")),
            failed_member=str(doc.get("failed_member", "")),
            failed_phase=str(doc.get("failed_phase", "")),
            times={str(k): float(v) for k, v in (doc.get("times") or {}).items()},
        )


class Journal:
    """The journal file ``$STATE/node/transaction.json``."""

    def __init__(self, state: Path) -> None:
        self.path = state.joinpath(*JOURNAL)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> Record | None:
        """The record, or None when there is no journal. Raises :class:`BootstrapError` for a
        damaged one (nothing is guessed)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return Record.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise BootstrapError(
                f"{self.path}: damaged node transaction journal: {exc}",
                "check every container with 'bootstrap status NAME', roll back by hand what is "
                "not as wanted, then remove the file",
            ) from exc

    def write(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Steps(Protocol):
    """What a transaction does to one member; every method raises :class:`BootstrapError` on
    failure. ``stop``, ``restore``, ``commit`` and ``settle`` must be idempotent (recovery may
    repeat them after a kill)."""

    def stage(self, member: Member) -> None:
        """Build the mover's ``NAME.new``; nothing live changes."""

    def switch(self, member: Member) -> None:
        """Point the mover's symlink, host files and unit at ``NAME.new`` (no restart)."""

    def start(self, member: Member) -> None:
        """(Re)start the member's unit when it was running, and wait for its job."""

    def judge(self, member: Member, *, again: bool) -> str:
        """Judge a member that was running: its unit active, CRI readiness, health check;
        ``again``: the node's final pass (no start period). Returns what passed, one line."""

    def stop(self, member: Member) -> None:
        """Stop the member's unit."""

    def restore(self, member: Member) -> None:
        """Point the mover's symlink, host files and unit back at ``from_slot`` and remove
        ``NAME.new``; nothing is started."""

    def reload(self) -> None:
        """Reload systemd (after restores)."""

    def commit(self, member: Member) -> None:
        """Make the mover's ``NAME.new`` its slot (finishing one cut short)."""

    def settle(self, member: Member) -> None:
        """Restart the member's unit when it runs another deployment than its symlink names."""


@dataclass(frozen=True)
class Outcome:
    """How a transaction ended: ``verdict`` :data:`HEALTHY` (committed), :data:`ROLLED_BACK`
    (every member back where it was), or :data:`FAILED` (rolled back, but something of the
    rollback failed too: ``problems``). ``failure`` and ``failed_member`` say what made it roll
    back; ``checks`` what the judge saw pass; ``times`` seconds per phase; ``recovered``: it
    was finished from the journal of a killed run; ``phase``: the phase it ended in."""

    verdict: str
    members: tuple[Member, ...]
    failure: str = ""
    failed_member: str = ""
    checks: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    times: dict[str, float] = field(default_factory=dict)
    recovered: bool = False
    phase: str = ""

    @property
    def committed(self) -> bool:
        return self.verdict == HEALTHY

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "failure": self.failure or None,
            "failed_member": self.failed_member or None,
            "checks": list(self.checks),
            "problems": list(self.problems),
            "recovered": self.recovered,
            "phase": self.phase,
        }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def order(members: Sequence[Member]) -> list[Member]:
    """``members`` dependencies first (``after``; names not among them are ignored), otherwise
    by name; a cycle is broken by name order."""
    left = sorted(members, key=lambda m: m.name)
    names = {m.name for m in left}
    placed: set[str] = set()
    out: list[Member] = []
    while left:
        ready = [m for m in left if all(a in placed or a not in names for a in m.after)]
        m = ready[0] if ready else left[0]
        out.append(m)
        placed.add(m.name)
        left.remove(m)
    return out


def blame(members: Sequence[Member], failed: str) -> list[Member]:
    """The movers to remember as failed when ``failed`` (a member name, or "") made the
    transaction roll back: that member when it moved; else the movers it is ordered after,
    directly or not; else every mover (the node as a whole failed)."""
    by_name = {m.name: m for m in members}
    culprit = by_name.get(failed)
    if culprit is not None and culprit.move:
        return [culprit]
    if culprit is not None:
        seen: set[str] = set()
        todo = list(culprit.after)
        while todo:
            name = todo.pop()
            if name in seen or name not in by_name:
                continue
            seen.add(name)
            todo.extend(by_name[name].after)
        upstream = [m for m in members if m.name in seen and m.move]
        if upstream:
            return upstream
    return [m for m in members if m.move]


class _Clock:
    """Seconds per phase, accumulated in the record's ``times``."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.mark = now()

    def lap(self, record: Record, phase: str) -> Record:
        t = self.now()
        times = dict(record.times)
        times[phase] = times.get(phase, 0.0) + (t - self.mark)
        self.mark = t
        return replace(record, times=times)


def run(
    journal: Journal,
    steps: Steps,
    members: Sequence[Member],
    *,
    command: str,
    now: Callable[[], float] = time.monotonic,
) -> Outcome:
    """Carry out a transaction over ``members`` (put in dependency order here) and return how
    it ended. A failure of any step before ``committing`` rolls everything back (the outcome
    says so; nothing is raised); anything that is not a :class:`BootstrapError` (an interrupt,
    a bug) is rolled back too and then raised. A failure while committing is raised (the
    journal stays, so the next command finishes the commit)."""
    members = tuple(order(members))
    clock = _Clock(now)
    record = Record(uuid.uuid4().hex, command, _now(), "staging", members)
    journal.write(record)
    checks: list[str] = []
    current = ""
    try:
        for m in record.movers:
            current = m.name
            log.info("node update: %s: staging %s", m.name, m.image)
            steps.stage(m)
        record = clock.lap(record, "stage")
        record = replace(record, phase="starting")
        journal.write(record)
        for m in members:
            current = m.name
            if m.move:
                steps.switch(m)
            steps.start(m)
            record = replace(record, started_members=(*record.started_members, m.name))
            journal.write(record)
            if m.was_running:
                checks.append(steps.judge(m, again=False))
        record = clock.lap(record, "start")
        record = replace(record, phase="judging")
        journal.write(record)
        final = []
        for m in members:
            current = m.name
            if m.was_running:
                final.append(steps.judge(m, again=True))
        checks = final or checks
        record = clock.lap(record, "judge")
    except BaseException as exc:
        err = exc if isinstance(exc, BootstrapError) else BootstrapError(repr(exc))
        log.warning("node update: %s failed: %s; rolling back", current or "node", err.message)
        failed_in = record.phase
        record = clock.lap(
            record, {"staging": "stage", "starting": "start"}.get(failed_in, "judge")
        )
        record = replace(
            record,
            phase=ROLLING_BACK,
            failure=err.message,
            failed_member=current,
            failed_phase=failed_in,
        )
        journal.write(record)
        problems = _roll_back(steps, record, full=failed_in != "staging")
        record = clock.lap(record, "rollback")
        journal.remove()
        if not isinstance(exc, BootstrapError):
            raise
        return Outcome(
            FAILED if problems else ROLLED_BACK,
            members,
            err.message,
            current,
            tuple(checks),
            tuple(problems),
            record.times,
            phase=failed_in,
        )
    record = replace(record, phase="committing")
    journal.write(record)
    for m in record.movers:
        steps.commit(m)
    record = clock.lap(record, "commit")
    journal.remove()
    return Outcome(HEALTHY, members, checks=tuple(checks), times=record.times, phase="committing")


def _roll_back(steps: Steps, record: Record, *, full: bool) -> list[str]:
    """Undo ``record``: only the staged directories when nothing live changed (not ``full``);
    else stop every member in reverse order, point the movers back, start the members that
    ran in order (each judged as far as it can be). Returns the problems met (each step is
    tried even after one failed)."""
    problems: list[str] = []

    def attempt(what: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except BootstrapError as err:
            log.error("node update: rollback: %s: %s", what, err.message)
            problems.append(f"{what}: {err.message}")
            return False

    members = record.members
    if not full:
        for m in reversed(record.movers):
            attempt(f"{m.name}: removing {m.name}.new", partial(steps.restore, m))
        return problems
    for m in reversed(members):
        attempt(f"{m.name}: stop", partial(steps.stop, m))
    for m in reversed(record.movers):
        attempt(f"{m.name}: back to {m.from_slot}", partial(steps.restore, m))
    attempt("systemd reload", steps.reload)
    for m in members:
        if not m.was_running:
            continue
        log.info("node update: rollback: starting %s again", m.name)
        if attempt(f"{m.name}: start", partial(steps.start, m)):
            attempt(f"{m.name}: after the rollback", partial(steps.judge, m, again=False))
    return problems


def recover(
    journal: Journal, steps: Steps, *, now: Callable[[], float] = time.monotonic
) -> Outcome | None:
    """Finish the transaction a killed run left in ``journal`` (see the module doc); None when
    there is none. A commit is finished, anything earlier rolled back; the journal is removed
    unless the commit cannot be finished (then it is raised)."""
    record = journal.read()
    if record is None:
        return None
    clock = _Clock(now)
    log.warning(
        "node update %s (%s, started %s) was interrupted in phase %s; %s",
        record.id[:12],
        record.command,
        record.started,
        record.phase,
        "finishing its commit" if record.phase == "committing" else "rolling it back",
    )
    if record.phase == "committing":
        for m in record.movers:
            steps.commit(m)
        problems: list[str] = []
        for m in record.members:
            try:
                steps.settle(m)
            except BootstrapError as err:
                problems.append(f"{m.name}: {err.message}")
        record = clock.lap(record, "commit")
        journal.remove()
        return Outcome(
            FAILED if problems else HEALTHY,
            record.members,
            problems=tuple(problems),
            times=record.times,
            recovered=True,
            phase="committing",
        )
    was = record.failed_phase if record.phase == ROLLING_BACK else record.phase
    failure = f"interrupted in phase {record.phase}"
    if record.failure:
        failure += f" after: {record.failure}"
    record = replace(record, phase=ROLLING_BACK, failed_phase=was)
    journal.write(record)
    problems = _roll_back(steps, record, full=was != "staging")
    record = clock.lap(record, "rollback")
    journal.remove()
    return Outcome(
        FAILED if problems else ROLLED_BACK,
        record.members,
        failure=failure,
        failed_member=record.failed_member,
        problems=tuple(problems),
        times=record.times,
        recovered=True,
        phase=was,
    )
