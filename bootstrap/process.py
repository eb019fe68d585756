"""The one way the tool runs a subprocess."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from bootstrap.errors import BootstrapError

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str | Path],
    *,
    error: type[BootstrapError] = BootstrapError,
    hint: str = "",
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (no shell), capturing stdout and stderr as bytes.

    The argv is logged at debug level. When ``check`` is true and the command exits non-zero, is
    not found, or exceeds ``timeout`` seconds, raises ``error`` whose message names the command
    and carries the last line(s) of its stderr, with ``hint`` as the hint. Returns the completed
    process otherwise (also for a non-zero exit when ``check`` is false).
    """
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(
            args,
            input=input,
            capture_output=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise error(f"{args[0]}: command not found", hint or f"install {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise error(f"{shlex.join(args)}: timed out after {timeout:g}s", hint) from exc
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace").strip()
        tail = " | ".join(stderr.splitlines()[-3:]) or "no output on stderr"
        raise error(
            f"{args[0]} exited {proc.returncode}: {tail}", hint or f"command: {shlex.join(args)}"
        )
    return proc
