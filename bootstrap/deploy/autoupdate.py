"""Unattended updates: ``bootstrap auto-update [--dry-run] [--retry-failed] [NAME...]``.

Every installed container (or those named) whose auto-update policy is not ``off`` (see
:class:`~bootstrap.deploy.records.Options`) is asked for the digest its image reference names
now — ``registry``: one ``HEAD`` of the manifest (with the registries' auth and mirrors);
``local``: the tag in the store — and compared with the deployed image's source digest (what
``pull`` printed when it was pulled). The containers whose digest moved are updated together,
with the running containers ordered after them, as one node transaction
(:mod:`bootstrap.deploy.nodeupdate`): staged, started in dependency order, judged by the node's
health, committed all or rolled back all. A digest that was rolled back before is skipped until
the tag moves again (``--retry-failed`` tries it anyway). Containers with policy ``off`` are
never touched, but are restarted as dependants of one that moved.
"""

from __future__ import annotations

from collections.abc import Sequence

from bootstrap.deploy.deployer import Deployer
from bootstrap.deploy.nodeupdate import NodeReport, node_update, order
from bootstrap.image import api

__all__ = ["NodeReport", "auto_update", "order"]


def auto_update(
    deployer: Deployer,
    names: Sequence[str] = (),
    *,
    dry_run: bool = False,
    retry_failed: bool = False,
    remote: api.Remote | None = None,
) -> NodeReport:
    """Run one auto-update pass over ``names`` (default: every installed container); see
    :func:`~bootstrap.deploy.nodeupdate.node_update` for what is returned and raised.
    ``remote``: where registry digests are looked up (default: one of this pass)."""
    return node_update(
        deployer,
        command="auto-update",
        names=names,
        dry_run=dry_run,
        retry_failed=retry_failed,
        remote=remote,
    )
