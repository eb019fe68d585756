"""Process-wide settings resolved once from the command line and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bootstrap.errors import UsageError

DEFAULT_ROOT = Path("/var/lib/bootstrap")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_SIGNATURE_POLICY = Path("/etc/containers/policy.json")
DEFAULT_REGISTRIES_D = Path("/etc/containers/registries.d")


@dataclass(frozen=True)
class Settings:
    """Where the store and deployments live and how to report.

    ``store``: the shared image store root (``$STORE``; the OCI layout is ``store / "oci"``).
    ``state``: deployments root (``$STATE``; system containers under ``state / "containers"``).
    ``json``: results as one JSON document on stdout. ``verbosity``: -1 quiet, 0 normal, 1+ debug.
    ``progress``: draw progress bars (only when stderr is a TTY and not quiet).
    ``signature_policy``: the containers-policy.json(5) file every image brought in is checked
    against; ``registries_d``: the registries.d(5) directory saying where signatures are;
    ``insecure_policy``: skip signature verification altogether.
    """

    store: Path = DEFAULT_ROOT
    state: Path = DEFAULT_ROOT
    json: bool = False
    verbosity: int = 0
    progress: bool = False
    signature_policy: Path = DEFAULT_SIGNATURE_POLICY
    registries_d: Path = DEFAULT_REGISTRIES_D
    insecure_policy: bool = False

    @classmethod
    def resolve(
        cls,
        store: str | None = None,
        state: str | None = None,
        *,
        json: bool = False,
        verbosity: int = 0,
        progress: bool = False,
        signature_policy: str | None = None,
        registries_d: str | None = None,
        insecure_policy: bool = False,
    ) -> Settings:
        """Build settings: explicit arguments win over ``BOOTSTRAP_STORE``/``BOOTSTRAP_STATE``,
        which win over ``/var/lib/bootstrap``; the policy file and registries.d directory
        likewise over ``BOOTSTRAP_SIGNATURE_POLICY``/``BOOTSTRAP_REGISTRIES_D``, then
        ``/etc/containers``. Paths are made absolute. A state path that exists but is not a
        directory: :class:`UsageError` (the store checks its own root)."""
        store_path = Path(store or os.environ.get("BOOTSTRAP_STORE") or DEFAULT_ROOT).absolute()
        state_path = Path(state or os.environ.get("BOOTSTRAP_STATE") or DEFAULT_ROOT).absolute()
        if state_path.exists() and not state_path.is_dir():
            raise UsageError(
                f"the state directory {state_path} is not a directory",
                "point --state (or $BOOTSTRAP_STATE) at a directory, or at a path that does "
                "not exist yet",
            )
        policy = Path(
            signature_policy
            or os.environ.get("BOOTSTRAP_SIGNATURE_POLICY")
            or DEFAULT_SIGNATURE_POLICY
        ).absolute()
        regd = Path(
            registries_d or os.environ.get("BOOTSTRAP_REGISTRIES_D") or DEFAULT_REGISTRIES_D
        ).absolute()
        return cls(store_path, state_path, json, verbosity, progress, policy, regd, insecure_policy)


def seconds_from_env(variable: str, default: float) -> float:
    """Seconds from environment variable ``variable`` (negative ones are 0); ``default`` when it
    is unset, empty or not a number."""
    raw = os.environ.get(variable, "")
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        return default
