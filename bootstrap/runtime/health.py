"""Health checks of running system containers, in two forms:

- ``exec``: a command run inside the container with ``runc exec``, as Podman's
  ``--health-cmd``: exit 0 is healthy;
- ``http``: an ``http://`` or ``https://`` URL fetched with ``GET`` from bootstrap's own network
  namespace, as a kubelet's ``httpGet`` probe: a status from 200 to 399 is healthy (a real
  kubelet's ``http://127.0.0.1:10248/healthz``; a container on the host network serves its
  ``127.0.0.1`` to the host). No proxy is used, an ``https`` certificate is not verified
  (as Kubernetes probes do), redirects are not followed.

:func:`wait_healthy` is how install and update prove a deployment: it returns once the check has
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
    """A health check: ``argv`` run inside the container (``runc exec NAME ARGV...``, exit 0 is
    healthy) or, when ``http`` is set, that URL fetched from the host (status 200-399 is
    healthy); exactly one of the two is set. It is tried every ``interval`` seconds, each try
    given ``timeout``; failures within ``start_period`` seconds of the start do not count, and
    ``retries`` counted failures in a row make the container unhealthy. For a ``Type=notify``
    unit, a non-zero ``start_period`` also bounds the wait for READY=1."""

    argv: tuple[str, ...] = ()
    interval: float = 1.0
    timeout: float = 10.0
    retries: int = 3
    start_period: float = 0.0
    http: str = ""

    def describe(self) -> str:
        """The check in a few words: ``GET URL`` or the command line."""
        return f"GET {self.http}" if self.http else " ".join(self.argv)

    def to_json(self) -> dict[str, Any]:
        what: dict[str, Any] = {"http": self.http} if self.http else {"exec": list(self.argv)}
        return {
            **what,
            "interval": self.interval,
            "timeout": self.timeout,
            "retries": self.retries,
            "start_period": self.start_period,
        }

    @classmethod
    def from_json(cls, doc: Any) -> HealthCheck:
        """The check :meth:`to_json` wrote (a deployment's record). ValueError/TypeError/
        KeyError when malformed."""
        if not isinstance(doc, dict):
            raise TypeError("health: not an object")
        return cls(
            argv=tuple(str(a) for a in doc.get("exec") or ()),
            interval=float(doc["interval"]),
            timeout=float(doc["timeout"]),
            retries=int(doc["retries"]),
            start_period=float(doc["start_period"]),
            http=str(doc.get("http") or ""),
        )


def probe(name: str, check: HealthCheck, runtime: str | None = None) -> tuple[bool, str]:
    """Run the check once against container ``name``: (healthy, what it said or why it
    failed)."""
    if check.http:
        return probe_http(check.http, check.timeout)
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


_session: Any = None


def probe_http(url: str, timeout: float) -> tuple[bool, str]:
    """``GET url`` once (no retries, no proxy, no redirects, ``timeout`` seconds to connect and
    to read): (healthy, ``HTTP 200: ok`` or why not). The body's first 200 characters are
    kept, on one line."""
    global _session
    import warnings

    import requests
    import urllib3

    from bootstrap.http import describe_connect_error, new_session

    if _session is None:
        _session = new_session(retries=0, connect_retries=0, pool_size=2)
        _session.trust_env = False  # never through a proxy: the URL is the node's own
    try:
        with warnings.catch_warnings():  # an unverified https probe is the point, not news
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            with _session.get(
                url, timeout=(timeout, timeout), allow_redirects=False, verify=False, stream=True
            ) as resp:
                body = resp.raw.read(4096, decode_content=True).decode(errors="replace")
                code = int(resp.status_code)
    except requests.Timeout:
        return False, f"no answer within {timeout:g}s"
    except requests.ConnectionError as exc:
        why = describe_connect_error(exc) or "cannot connect"
        return False, f"no answer within {timeout:g}s" if why == "timed out" else why
    except requests.RequestException as exc:
        return False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    text = " ".join(body.split())[:200]
    return 200 <= code < 400, f"HTTP {code}" + (f": {text}" if text else "")


def wait_healthy(
    name: str,
    check: HealthCheck,
    *,
    alive: Callable[[], bool],
    runtime: str | None = None,
    started: float | None = None,
) -> int:
    """Probe ``name`` until it is healthy; return the number of probes it took.

    ``alive()`` is asked before each probe (e.g. is the unit still active); when it says no, or
    after ``check.retries`` failures in a row past ``check.start_period`` (counted from
    ``started``, a ``time.monotonic()`` value; default: now), raises :class:`SystemdError`
    (exit 5) with the last probe's output."""
    started = time.monotonic() if started is None else started
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
            "%s: health check failed (try %d: %s)%s",
            name,
            tries,
            last,
            " within the start period" if in_grace else f", {failures}/{check.retries}",
        )
        if failures >= check.retries:
            hint = (
                f"try it by hand: curl -sS {check.http}"
                if check.http
                else f"run it by hand: runc exec {name} {' '.join(check.argv)}"
            )
            raise SystemdError(
                f"{name}: health check {check.describe()!r} failed {failures} times: {last}",
                hint,
            )
        time.sleep(check.interval)
