"""Process-wide settings resolved once from the command line and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/var/lib/bootstrap")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")


@dataclass(frozen=True)
class Settings:
    """Where the store and deployments live and how to report.

    ``store``: the shared image store root (``$STORE``; the OCI layout is ``store / "oci"``).
    ``state``: deployments root (``$STATE``; system containers under ``state / "containers"``).
    ``json``: results as one JSON document on stdout. ``verbosity``: -1 quiet, 0 normal, 1+ debug.
    ``progress``: draw progress bars (only when stderr is a TTY and not quiet).
    """

    store: Path = DEFAULT_ROOT
    state: Path = DEFAULT_ROOT
    json: bool = False
    verbosity: int = 0
    progress: bool = False

    @classmethod
    def resolve(
        cls,
        store: str | None = None,
        state: str | None = None,
        *,
        json: bool = False,
        verbosity: int = 0,
        progress: bool = False,
    ) -> Settings:
        """Build settings: explicit arguments win over ``BOOTSTRAP_STORE``/``BOOTSTRAP_STATE``,
        which win over ``/var/lib/bootstrap``. Paths are made absolute."""
        store_path = Path(store or os.environ.get("BOOTSTRAP_STORE") or DEFAULT_ROOT).absolute()
        state_path = Path(state or os.environ.get("BOOTSTRAP_STATE") or DEFAULT_ROOT).absolute()
        return cls(store_path, state_path, json, verbosity, progress)
