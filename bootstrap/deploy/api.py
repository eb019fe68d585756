"""The deploy stage's facade: the only deploy module the node stage and the CLI import.

Commands: ``install``, ``update``, ``rollback``, ``uninstall``, ``list_containers``,
``status``, ``auto_update``, ``update_node``, ``finish_node_update``, ``node_updates``; each
takes the resolved :class:`~bootstrap.settings.Settings` and plain arguments and returns a
result with ``to_json()`` and ``to_text()``. For ``bootstrap up``: :func:`open_deployer` (one
:class:`~bootstrap.deploy.deployer.Deployer` for a run of installs) with the records it hands
back (:class:`Deployment`, :class:`Options`), and the definition vocabulary a node manifest
checks against (``VAR_NAME``, ``AUTO_UPDATE_POLICIES``). Errors carry their exit code: 2 bad
input (name, reference, definition, ``--set``), 3 registry, 5 systemd or runc (a unit that
does not start; the message holds its last journal lines), 6 another operation holds the
container. The deployer (and systemd's bus) is imported by the calls that act: ``list`` with
nothing installed imports neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bootstrap.deploy.records import (
    ContainerStatus,
    Deployment,
    DeployResult,
    ListResult,
    Options,
    names,
)
from bootstrap.settings import Settings

if TYPE_CHECKING:
    from bootstrap.deploy.definition import AUTO_UPDATE_POLICIES, VAR_NAME
    from bootstrap.deploy.deployer import Deployer
    from bootstrap.deploy.failures import Failed
    from bootstrap.deploy.nodeupdate import NodeReport
    from bootstrap.deploy.transaction import Outcome, Record

__all__ = [
    "AUTO_UPDATE_POLICIES",
    "VAR_NAME",
    "ContainerStatus",
    "DeployResult",
    "Deployer",
    "Deployment",
    "ListResult",
    "NodeUpdates",
    "Options",
]

_LAZY = {
    "AUTO_UPDATE_POLICIES": "bootstrap.deploy.definition",
    "VAR_NAME": "bootstrap.deploy.definition",
    "Deployer": "bootstrap.deploy.deployer",
}


def __getattr__(name: str) -> Any:
    """The re-exports in ``_LAZY``, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def open_deployer(settings: Settings, *, progress: Any = None) -> Deployer:
    """A deployer over ``settings``' state and store: the signature policy is loaded on its
    first pull, systemd is asked on first use, and a node update a killed run left is finished
    before a per-container command."""
    from bootstrap.deploy.deployer import Deployer
    from bootstrap.image.api import open_store

    return Deployer(
        settings.state,
        open_store(settings),
        progress=progress,
        verifier=lambda: _verifier(settings),
        finish_node_update=_finish_interrupted,
    )


@contextmanager
def _deployer(settings: Settings) -> Iterator[Deployer]:
    from bootstrap.progress import make_progress

    with make_progress(settings) as progress:
        yield open_deployer(settings, progress=progress)


def _verifier(settings: Settings) -> object:
    from bootstrap.trust.verify import Verifier

    return Verifier.from_settings(settings)


def _finish_interrupted(deployer: Deployer) -> Outcome | None:
    from bootstrap.deploy.nodeupdate import finish_interrupted

    return finish_interrupted(deployer)


def install(
    settings: Settings,
    name: str,
    ref: str,
    *,
    values: Mapping[str, str] | None = None,
    definition: str | None = None,
    start: bool = True,
    unit_dir: str | None = None,
    auto_update: str | None = None,
) -> DeployResult:
    """``bootstrap install NAME REF [--set K=V]... [--definition DIR] [--no-start]
    [--unit-dir DIR] [--auto-update registry|local|off]``: pull REF if not stored, deploy it
    as NAME.0, write, enable and start NAME.service. The same inputs again change nothing.
    ``auto_update`` None: the definition's default policy, else ``off``."""
    with _deployer(settings) as d:
        return d.install(
            name,
            ref,
            set_values=dict(values or {}),
            definition_dir=definition,
            start=start,
            unit_dir=unit_dir,
            options=Options(auto_update=auto_update),
        )


def update(
    settings: Settings,
    name: str,
    ref: str | None = None,
    *,
    values: Mapping[str, str] | None = None,
    definition: str | None = None,
    pull: bool = True,
    auto_update: str | None = None,
) -> DeployResult:
    """``bootstrap update NAME [REF] [--set K=V]... [--definition DIR] [--no-pull]
    [--auto-update POLICY]``."""
    with _deployer(settings) as d:
        return d.update(
            name,
            ref,
            set_values=dict(values or {}),
            definition_dir=definition,
            pull=pull,
            auto_update=auto_update,
        )


def rollback(settings: Settings, name: str) -> DeployResult:
    """``bootstrap rollback NAME``: make the other deployment active."""
    with _deployer(settings) as d:
        return d.rollback(name)


def uninstall(settings: Settings, name: str) -> DeployResult:
    """``bootstrap uninstall NAME``: stop, disable, remove unit, tmpfiles and deployments."""
    with _deployer(settings) as d:
        return d.uninstall(name)


def list_containers(settings: Settings) -> ListResult:
    """``bootstrap list``: every installed system container and its unit state."""
    if not names(settings.state):
        return ListResult(())
    with _deployer(settings) as d:
        return d.list()


def status(settings: Settings, name: str) -> ContainerStatus:
    """``bootstrap status NAME``: deployments, unit state, runc state."""
    with _deployer(settings) as d:
        return d.status(name)


def auto_update(
    settings: Settings, names: list[str], *, dry_run: bool = False, retry_failed: bool = False
) -> NodeReport:
    """``bootstrap auto-update [--dry-run] [--retry-failed] [NAME...]``: update the containers
    (default: all) whose policy is not off and whose image moved, together with the running
    containers ordered after them, as one node transaction; the report's ``exit_code`` is 5
    when the node rolled back or something failed."""
    from bootstrap.deploy.autoupdate import auto_update as run_pass

    with _deployer(settings) as d:
        return run_pass(d, names, dry_run=dry_run, retry_failed=retry_failed)


def update_node(settings: Settings, *, dry_run: bool = False, pull: bool = True) -> NodeReport:
    """``bootstrap update --node [--dry-run] [--no-pull]``: every container's reference pulled
    again; those that moved are updated together with the running containers ordered after
    them, as one node transaction (see :mod:`bootstrap.deploy.nodeupdate`)."""
    from bootstrap.deploy.nodeupdate import node_update

    with _deployer(settings) as d:
        return node_update(d, command="update --node", dry_run=dry_run, pull=pull)


def finish_node_update(settings: Settings) -> Outcome | None:
    """Finish (commit or roll back) a node update a killed run left; None when there is none
    (neither the deployer nor systemd is imported or asked then)."""
    from bootstrap.deploy.transaction import JOURNAL

    if not settings.state.joinpath(*JOURNAL).exists():
        return None
    with _deployer(settings) as d:
        return _finish_interrupted(d)


@dataclass(frozen=True)
class NodeUpdates:
    """What ``status --node`` shows of node updates, read without changing anything:
    ``pending`` the journal of a node update a killed run left (None: none), ``damaged`` the
    error when that journal is unreadable, ``failed`` the remembered rolled-back digests by
    container name."""

    pending: Record | None
    damaged: str
    failed: Mapping[str, Failed]

    def to_json(self) -> dict[str, Any]:
        return {
            "pending_update": self.pending.to_json() if self.pending else None,
            "pending_update_damaged": self.damaged or None,
            "failed_updates": {n: f.to_json() for n, f in sorted(self.failed.items())},
        }

    def lines(self) -> list[str]:
        """Text lines for ``status --node`` (none when there is nothing to say)."""
        out = []
        if self.pending is not None:
            p = self.pending
            out.append(
                f"interrupted node update {p.id[:12]} ({p.command}, started {p.started}) "
                f"left in phase {p.phase}, members {', '.join(m.name for m in p.members)}: "
                "the next 'bootstrap update --node', 'auto-update', 'up' or a command on a "
                "member " + ("finishes its commit" if p.phase == "committing" else "rolls it back")
            )
        if self.damaged:
            out.append(f"node update journal: {self.damaged}")
        for name, f in sorted(self.failed.items()):
            out.append(f"failed update of {name}: {f.skip_note()}")
        return out


def node_updates(settings: Settings) -> NodeUpdates:
    """The node-update state ``status --node`` shows: a pending (interrupted) transaction and
    the remembered failures. Reads only; neither systemd nor the deployer is asked."""
    from bootstrap.deploy import failures
    from bootstrap.deploy.transaction import Journal
    from bootstrap.errors import BootstrapError

    damaged = ""
    try:
        pending = Journal(settings.state).read()
    except BootstrapError as err:
        pending, damaged = None, f"{err.message} ({err.hint})"
    except OSError as exc:
        pending, damaged = None, f"{exc.filename}: unreadable: {exc.strerror}"
    return NodeUpdates(pending, damaged, failures.load(settings.state))
