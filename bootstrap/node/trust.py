"""Writing a node manifest's ``trust:`` section before the first pull.

Key files first, then the registries.d files, then the policy last (each temp + fsync +
rename), so a run killed midway never leaves a policy naming a key that is not there yet.
The policy goes to the policy file in effect (``--signature-policy``, default
``/etc/containers/policy.json``) and registries.d files into the registries.d directory in
effect, so later ``bootstrap update`` runs (and skopeo, Podman, CRI-O) enforce the same policy.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from bootstrap.fsutil import make_dirs, write_atomic
from bootstrap.node.manifest import Trust
from bootstrap.settings import Settings

log = logging.getLogger(__name__)


def write_trust(settings: Settings, trust: Trust) -> Settings:
    """Write ``trust`` (see the module docstring); return the settings to pull with (the same
    paths, with ``--insecure-policy`` cleared: a node manifest asking for trust gets it)."""
    for f in trust.files:
        make_dirs(f.path.parent, 0o755)  # whatever the umask: nobody else may add keys
        write_atomic(f.path, f.data)
    if trust.registries_d:
        make_dirs(settings.registries_d, 0o755)
    for name, text in trust.registries_d:
        write_atomic(settings.registries_d / name, text)
    make_dirs(settings.signature_policy.parent, 0o755)
    write_atomic(settings.signature_policy, trust.policy)
    log.info(
        "up: trust: wrote %s, %d key files, %d registries.d files",
        settings.signature_policy,
        len(trust.files),
        len(trust.registries_d),
    )
    return replace(settings, insecure_policy=False)
