"""The node transaction's state machine (bootstrap/deploy/transaction.py) over a model node:
the order of its steps, all-or-nothing, the journal it keeps, and recovery from a kill at every
point the journal was written (a kill -9 runs no code: the next run finds the journal and the
node as they were at that moment). The same machine runs over real containers in
tests/test_node_update.py."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bootstrap.deploy import transaction as tx
from bootstrap.deploy.transaction import Journal, Member, Record
from bootstrap.errors import BootstrapError, SystemdError


@dataclass
class World:
    """A model node: each container's symlink target, the slot its unit runs (None: stopped),
    whether its NAME.new exists."""

    link: dict[str, str] = field(default_factory=dict)
    runs: dict[str, str | None] = field(default_factory=dict)
    staged: set[str] = field(default_factory=set)


def other(slot: str) -> str:
    name, _, n = slot.rpartition(".")
    return f"{name}.{1 - int(n)}"


class Node:
    """:class:`tx.Steps` over a :class:`World`; ``fail`` maps ``(step, name)`` to the error it
    raises once (the new version; the old one then works); every call is recorded in
    ``calls``."""

    def __init__(self, world: World, fail: dict[tuple[str, str], BootstrapError] | None = None):
        self.world = world
        self.fail = fail or {}
        self.calls: list[tuple[str, str]] = []

    def _call(self, step: str, name: str) -> None:
        self.calls.append((step, name))
        err = self.fail.pop((step, name), None)  # the new version fails; the old one works
        if err is not None:
            raise err

    def stage(self, m: Member) -> None:
        self._call("stage", m.name)
        self.world.staged.add(m.name)

    def switch(self, m: Member) -> None:
        self._call("switch", m.name)
        assert m.name in self.world.staged
        self.world.link[m.name] = f"{m.name}.new"

    def start(self, m: Member) -> None:
        self._call("start", m.name)
        if m.was_running:
            self.world.runs[m.name] = self.world.link[m.name]

    def judge(self, m: Member, *, again: bool) -> str:
        self._call("judge-again" if again else "judge", m.name)
        return f"{m.name} ok"

    def stop(self, m: Member) -> None:
        self._call("stop", m.name)
        self.world.runs[m.name] = None

    def restore(self, m: Member) -> None:
        self._call("restore", m.name)
        self.world.link[m.name] = m.from_slot
        self.world.staged.discard(m.name)

    def reload(self) -> None:
        self.calls.append(("reload", ""))

    def commit(self, m: Member) -> None:
        self._call("commit", m.name)
        new = other(m.from_slot)
        if m.name in self.world.staged:  # the rename: a unit running NAME.new now runs `new`
            self.world.staged.discard(m.name)
            if self.world.runs.get(m.name) == f"{m.name}.new":
                self.world.runs[m.name] = new
        self.world.link[m.name] = new

    def settle(self, m: Member) -> None:
        self._call("settle", m.name)
        if self.world.runs.get(m.name) not in (None, self.world.link[m.name]):
            self.world.runs[m.name] = self.world.link[m.name]


class SnapshotJournal(Journal):
    """A journal that also keeps, at every write, the record and a copy of the world then."""

    def __init__(self, state: Path, world: World) -> None:
        super().__init__(state)
        self.world = world
        self.snapshots: list[tuple[Record, World]] = []

    def write(self, record: Record) -> None:
        super().write(record)
        self.snapshots.append((record, copy.deepcopy(self.world)))


def node_of_three() -> tuple[World, list[Member]]:
    """cni (not moving, nobody's dependant: not a member), ocid (moves), kubelet (moves, after
    ocid), agent (a running dependant of kubelet that does not move)."""
    world = World(
        link={"ocid": "ocid.0", "kubelet": "kubelet.1", "agent": "agent.0"},
        runs={"ocid": "ocid.0", "kubelet": "kubelet.1", "agent": "agent.0"},
    )
    members = [
        Member("agent", False, "agent.0", True, after=("kubelet",)),
        Member("kubelet", True, "kubelet.1", True, image="k", to_digest="sha256:k2",
               after=("ocid",)),
        Member("ocid", True, "ocid.0", True, image="o", to_digest="sha256:o2",
               cri_socket="/run/x.sock", network_ready=True),
    ]  # fmt: skip
    return world, members


def assert_consistent(world: World, names: list[str]) -> None:
    for name in names:
        assert name not in world.staged, (name, world)
        assert world.link[name] in (f"{name}.0", f"{name}.1"), (name, world)
        assert world.runs[name] == world.link[name], (name, world)


def test_a_good_transaction_stages_all_then_starts_in_order_and_commits(tmp_path: Path) -> None:
    world, members = node_of_three()
    node = Node(world)
    journal = Journal(tmp_path)
    ticks = iter(range(100))
    outcome = tx.run(journal, node, members, command="update --node", now=lambda: next(ticks))
    assert outcome.verdict == tx.HEALTHY and outcome.committed
    assert node.calls == [
        ("stage", "ocid"), ("stage", "kubelet"),
        ("switch", "ocid"), ("start", "ocid"), ("judge", "ocid"),
        ("switch", "kubelet"), ("start", "kubelet"), ("judge", "kubelet"),
        ("start", "agent"), ("judge", "agent"),
        ("judge-again", "ocid"), ("judge-again", "kubelet"), ("judge-again", "agent"),
        ("commit", "ocid"), ("commit", "kubelet"),
    ]  # fmt: skip
    assert world.link == {"ocid": "ocid.1", "kubelet": "kubelet.0", "agent": "agent.0"}
    assert_consistent(world, ["ocid", "kubelet", "agent"])
    assert outcome.checks == ("ocid ok", "kubelet ok", "agent ok")
    assert set(outcome.times) == {"stage", "start", "judge", "commit"}
    assert not journal.exists()


@pytest.mark.parametrize(
    ("step", "name", "phase"),
    [
        ("stage", "kubelet", "staging"),
        ("start", "ocid", "starting"),
        ("judge", "ocid", "starting"),  # e.g. NetworkReady false
        ("judge", "kubelet", "starting"),  # e.g. /healthz never answers ok
        ("judge", "agent", "starting"),
        ("judge-again", "ocid", "judging"),
    ],
)
def test_any_failure_before_the_commit_rolls_back_everything(
    tmp_path: Path, step: str, name: str, phase: str
) -> None:
    world, members = node_of_three()
    node = Node(world, {(step, name): SystemdError(f"{name} is sick")})
    journal = Journal(tmp_path)
    outcome = tx.run(journal, node, members, command="auto-update")
    assert outcome.verdict == tx.ROLLED_BACK
    assert (outcome.failed_member, outcome.failure, outcome.phase) == (
        name,
        f"{name} is sick",
        phase,
    )
    assert not journal.exists()
    assert world.link == {"ocid": "ocid.0", "kubelet": "kubelet.1", "agent": "agent.0"}
    assert_consistent(world, ["ocid", "kubelet", "agent"])
    done = node.calls[node.calls.index((step, name)) + 1 :]
    if phase == "staging":  # nothing live changed: only the staged directories go
        assert done == [("restore", "kubelet"), ("restore", "ocid")]
        return
    # stopped in reverse order, pointed back, started again in order on the old versions
    assert done == [
        ("stop", "agent"), ("stop", "kubelet"), ("stop", "ocid"),
        ("restore", "kubelet"), ("restore", "ocid"), ("reload", ""),
        ("start", "ocid"), ("judge", "ocid"),
        ("start", "kubelet"), ("judge", "kubelet"),
        ("start", "agent"), ("judge", "agent"),
    ]  # fmt: skip


def test_a_failing_rollback_step_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    world, members = node_of_three()
    node = Node(
        world,
        {("judge", "kubelet"): SystemdError("unhealthy"), ("stop", "agent"): SystemdError("stuck")},
    )
    outcome = tx.run(Journal(tmp_path), node, members, command="update --node")
    assert outcome.verdict == tx.FAILED
    assert outcome.problems == ("agent: stop: stuck",)
    assert ("restore", "ocid") in node.calls and ("start", "agent") in node.calls


def test_an_interrupt_rolls_back_then_propagates(tmp_path: Path) -> None:
    world, members = node_of_three()
    node = Node(world)
    node.fail[("judge", "kubelet")] = KeyboardInterrupt()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        tx.run(Journal(tmp_path), node, members, command="update --node")
    assert world.link == {"ocid": "ocid.0", "kubelet": "kubelet.1", "agent": "agent.0"}
    assert not Journal(tmp_path).exists()


def test_a_member_that_was_not_running_is_switched_but_not_started(tmp_path: Path) -> None:
    world = World(link={"a": "a.0"}, runs={"a": None})
    node = Node(world)
    outcome = tx.run(
        Journal(tmp_path), node, [Member("a", True, "a.0", False)], command="update --node"
    )
    assert outcome.committed and world.link == {"a": "a.1"} and world.runs == {"a": None}
    assert ("judge", "a") not in node.calls


@pytest.mark.parametrize("failing", [False, True])
def test_killed_at_every_journal_write_the_next_run_ends_consistent(
    tmp_path: Path, failing: bool
) -> None:
    """Each journal write is a point a kill -9 may follow: recovery from the journal and the
    node as they were then commits a committing transaction and rolls back any other."""
    world, members = node_of_three()
    fail = {("judge", "kubelet"): SystemdError("unhealthy")} if failing else {}
    journal = SnapshotJournal(tmp_path / "run", world)
    tx.run(journal, Node(world, fail), members, command="update --node")
    phases = [r.phase for r, _ in journal.snapshots]
    if failing:
        assert phases == ["staging", "starting", "starting", "starting", tx.ROLLING_BACK]
    else:
        assert phases == ["staging", "starting", "starting", "starting", "starting", "judging",
                          "committing"]  # fmt: skip
    for i, (record, then) in enumerate(journal.snapshots):
        again = Journal(tmp_path / f"kill-{i}")
        again.write(record)
        assert Record.from_json(json.loads(again.path.read_text())).to_json() == record.to_json()
        node = Node(copy.deepcopy(then))
        outcome = tx.recover(again, node)
        assert outcome is not None and outcome.recovered
        assert not again.exists()
        assert_consistent(node.world, ["ocid", "kubelet", "agent"])
        if record.phase == "committing":
            assert outcome.verdict == tx.HEALTHY
            assert node.world.link == {"ocid": "ocid.1", "kubelet": "kubelet.0", "agent": "agent.0"}
            assert ("settle", "kubelet") in node.calls and ("stop", "ocid") not in node.calls
        else:
            assert outcome.verdict == tx.ROLLED_BACK
            assert node.world.link == {"ocid": "ocid.0", "kubelet": "kubelet.1", "agent": "agent.0"}
            assert outcome.failure.startswith(f"interrupted in phase {record.phase}")
            full = ("stop", "ocid") in node.calls
            assert full == (record.phase != "staging"), (record.phase, node.calls)
        # recovering twice does nothing more
        assert tx.recover(again, node) is None


def test_killed_during_the_commit_itself_the_commit_is_finished(tmp_path: Path) -> None:
    """The first mover renamed into its slot, the second not yet: both end committed."""
    world, members = node_of_three()
    journal = SnapshotJournal(tmp_path / "run", world)
    tx.run(journal, Node(world), members, command="update --node")
    record, then = journal.snapshots[-1]
    assert record.phase == "committing"
    node = Node(copy.deepcopy(then))
    node.commit(next(m for m in record.members if m.name == "ocid"))  # done before the kill
    again = Journal(tmp_path / "kill")
    again.write(record)
    outcome = tx.recover(again, node)
    assert outcome is not None and outcome.verdict == tx.HEALTHY
    assert node.world.link == {"ocid": "ocid.1", "kubelet": "kubelet.0", "agent": "agent.0"}
    assert_consistent(node.world, ["ocid", "kubelet", "agent"])


def test_a_damaged_journal_is_an_error_not_a_guess(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.path.parent.mkdir(parents=True)
    for text in ("{", '{"version": 1}', '{"version": 9, "phase": "staging"}'):
        journal.path.write_text(text)
        with pytest.raises(BootstrapError, match="damaged node transaction journal"):
            tx.recover(journal, Node(World()))
    record = Record("i", "c", "t", "nowhere", ())
    journal.path.write_text(json.dumps(record.to_json()))
    with pytest.raises(BootstrapError, match="unknown phase"):
        journal.read()


def test_order_and_blame() -> None:
    _, members = node_of_three()
    assert [m.name for m in tx.order(members)] == ["ocid", "kubelet", "agent"]
    by = {m.name: m for m in members}
    # a mover that failed is blamed alone; a dependant's failure blames the movers before it
    assert tx.blame(members, "kubelet") == [by["kubelet"]]
    assert tx.blame(members, "agent") == [by["kubelet"], by["ocid"]]
    assert tx.blame(members, "") == [by["kubelet"], by["ocid"]]
    lone = [Member("x", False, "x.0", True, after=("gone",)), Member("y", True, "y.0", True)]
    assert tx.blame(lone, "x") == [lone[1]]


def test_remembered_failures(tmp_path: Path) -> None:
    from bootstrap.deploy import failures

    assert failures.load(tmp_path) == {} and failures.get(tmp_path, "k") is None
    failures.forget(tmp_path, "k")  # nothing remembered: nothing written
    assert not (tmp_path / "node").exists()
    first = failures.remember(tmp_path, "k", "r/k:1", "sha256:aa", "k: health\\ncheck failed")
    assert first.reason == "k: health\\ncheck failed".replace("\\n", "\\\\n") or first.reason
    failures.remember(tmp_path, "o", "r/o:1", "sha256:bb", "NetworkReady false")
    again = failures.remember(tmp_path, "k", "r/k:1", "sha256:cc", "later")  # replaces
    got = failures.load(tmp_path)
    assert set(got) == {"k", "o"} and got["k"] == again
    assert got["k"].matches("r/k:1", "sha256:cc") and not got["k"].matches("r/k:1", "sha256:aa")
    assert "auto-update leaves it until the tag moves" in got["k"].skip_note()
    failures.forget(tmp_path, "k")
    assert set(failures.load(tmp_path)) == {"o"}
    (tmp_path / "node" / "failed.json").write_text("{damaged")
    assert failures.load(tmp_path) == {}  # advice only: a damaged file is forgotten, logged


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["update", "--node", "ocid"], "NAME cannot be given with --node"),
        (["update", "--node", "--set", "A=1"], "--set cannot be given with --node"),
        (["update"], "NAME or --node is required"),
        (["update", "ocid", "--dry-run"], "--dry-run goes with --node"),
    ],
)
def test_update_node_usage(tmp_path: Path, args: list[str], said: str) -> None:
    from tests.harness.cli import bootstrap

    ran = bootstrap(*args, store=tmp_path / "store", state=tmp_path / "state")
    assert ran.rc == 2 and said in ran.stderr, ran.stderr
    assert not (tmp_path / "state").exists()


def test_update_node_with_nothing_installed(tmp_path: Path) -> None:
    from tests.harness.cli import bootstrap

    for args in (["update", "--node"], ["auto-update"], ["update", "--node", "--dry-run"]):
        ran = bootstrap("--json", *args, store=tmp_path / "store", state=tmp_path / "state")
        assert ran.rc == 0, ran.stderr
        doc = ran.json()
        assert doc["units"] == [] and doc["node"]["verdict"] == "unchanged", doc
    ran = bootstrap("update", "--node", store=tmp_path / "store", state=tmp_path / "state")
    assert ran.stdout.strip() == "no system containers installed"
