"""Health checks of running system containers: a definition's ``health.exec`` run inside the
container with ``runc exec``, as Podman's ``--health-cmd`` is.

:func:`wait_healthy` is how an update proves a new deployment: it returns once the check has
passed, and raises once it has failed ``retries`` times in a row after the start period, or the
container stopped running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bootstrap.errors import BootstrapError, SystemdError
from bootstrap.process import run
from bootstrap.runtime import runc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthCheck:
    """A health check run inside the container (``runc exec NAME ARGV...``), as Podman's
    ``--health-cmd``: exit 0 is healthy. It is tried every ``interval`` seconds, each try
    killed after ``timeout``; failures within ``start_period`` seconds of the start do not
    count, and ``retries`` counted failures in a row make the container unhealthy. For a
    ``Type=notify`` unit, a non-zero ``start_period`` also bounds the wait for READY=1."""

    argv: tuple[str, ...]
    interval: float = 1.0
    timeout: float = 10.0
    retries: int = 3
    start_period: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "exec": list(self.argv),
            "interval": self.interval,
            "timeout": self.timeout,
            "retries": self.retries,
            "start_period": self.start_period,
        }


def probe(name: str, check: HealthCheck, runtime: str | None = None) -> tuple[bool, str]:
    """Run the check once in container ``name``: (healthy, what it said or why it failed)."""
    exe = runtime or runc.runtime_path()
    try:
        proc = run([exe, "exec", name, *check.argv], check=False, timeout=check.timeout)
    except BootstrapError as err:  # timed out, or runc missing
        return False, err.message
    out = (proc.stderr or proc.stdout).decode(errors="replace").strip()
    tail = " ".join(out.split())[-200:]
    if proc.returncode == 0:
        return True, tail
    return False, f"exit {proc.returncode}" + (f": {tail}" if tail else "")


def wait_healthy(
    name: str,
    check: HealthCheck,
    *,
    alive: Callable[[], bool],
    runtime: str | None = None,
) -> int:
    """Probe ``name`` until it is healthy; return the number of probes it took.

    ``alive()`` is asked before each probe (e.g. is the unit still active); when it says no, or
    after ``check.retries`` failures in a row past ``check.start_period``, raises
    :class:`SystemdError` (exit 5) with the last probe's output."""
    started = time.monotonic()
    failures = 0
    tries = 0
    last = ""
    while True:
        if not alive():
            raise SystemdError(
                f"{name}: stopped running while its health check was waited for"
                + (f" (last check: {last})" if last else ""),
                f"journalctl -u {name}.service",
            )
        tries += 1
        ok, last = probe(name, check, runtime)
        if ok:
            log.info("%s: health check passed (try %d)", name, tries)
            return tries
        in_grace = time.monotonic() - started < check.start_period
        if not in_grace:
            failures += 1
        log.info(
            "%s: health check failed (%s)%s",
            name,
            last,
            " within the start period" if in_grace else f", {failures}/{check.retries}",
        )
        if failures >= check.retries:
            raise SystemdError(
                f"{name}: health check {' '.join(check.argv)!r} failed {failures} times: {last}",
                f"run it by hand: runc exec {name} {' '.join(check.argv)}",
            )
        time.sleep(check.interval)
