"""Run the real ``bootstrap`` command (the venv's console script) as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = Path(sys.executable).parent / "bootstrap"


@dataclass
class Ran:
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def _argv(args: tuple[str | Path, ...], store: Path | None, state: Path | None) -> list[str]:
    argv: list[str] = [str(BOOTSTRAP)]
    if store is not None:
        argv += ["--store", str(store)]
    if state is not None:
        argv += ["--state", str(state)]
    return argv + [str(a) for a in args]


def bootstrap(
    *args: str | Path,
    store: Path | None = None,
    state: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> Ran:
    """Run ``bootstrap [--store S] [--state T] ARGS...``; return exit code and decoded output.
    With ``check``, assert exit 0 and show stderr when not."""
    argv = _argv(args, store, state)
    proc = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )
    ran = Ran(proc.returncode, proc.stdout, proc.stderr)
    if check:
        assert ran.rc == 0, f"{argv} exited {ran.rc}\nstdout: {ran.stdout}\nstderr: {ran.stderr}"
    return ran


def spawn(
    *args: str | Path,
    store: Path | None = None,
    state: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``bootstrap [--store S] [--state T] ARGS...`` in the background, stdout and stderr
    piped (text); collect it with :func:`finish`."""
    return subprocess.Popen(
        _argv(args, store, state),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Wait up to ``timeout`` seconds for a :func:`spawn`-ed command; (exit code, stdout,
    stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err
