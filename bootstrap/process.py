"""The one way the tool runs a subprocess."""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
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
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (no shell), capturing stdout and stderr as bytes.

    With ``on_line``, each line of stderr is also handed to it (decoded, without the newline)
    as soon as the command writes it, so a long command's progress can be shown live.

    The argv is logged at debug level. When ``check`` is true and the command exits non-zero, is
    not found, or exceeds ``timeout`` seconds, raises ``error`` whose message names the command
    and carries the last line(s) of its stderr, with ``hint`` as the hint. Returns the completed
    process otherwise (also for a non-zero exit when ``check`` is false).
    """
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    try:
        if on_line is None:
            proc = subprocess.run(
                args,
                input=input,
                capture_output=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        else:
            proc = _run_streaming(args, input, env, cwd, timeout, on_line)
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


def _run_streaming(
    args: list[str],
    input: bytes | None,
    env: Mapping[str, str] | None,
    cwd: str | Path | None,
    timeout: float | None,
    on_line: Callable[[str], None],
) -> subprocess.CompletedProcess[bytes]:
    """:func:`run`'s body when stderr lines are handed to ``on_line`` as they come; raises
    ``subprocess.TimeoutExpired`` (after killing the command) past ``timeout``."""
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    ) as popen:
        assert popen.stdout is not None and popen.stderr is not None
        out: list[bytes] = []
        err: list[bytes] = []
        stdout = popen.stdout
        reader = threading.Thread(target=lambda: out.append(stdout.read()), daemon=True)
        reader.start()
        if input is not None and popen.stdin is not None:
            with popen.stdin:
                popen.stdin.write(input)
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            popen.kill()

        timer = threading.Timer(timeout, kill) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            for raw in popen.stderr:
                err.append(raw)
                on_line(raw.decode(errors="replace").rstrip("\n"))
            popen.wait()
            reader.join()
        finally:
            if timer is not None:
                timer.cancel()
        if expired.is_set():
            raise subprocess.TimeoutExpired(args, timeout or 0.0)
        return subprocess.CompletedProcess(args, popen.returncode, b"".join(out), b"".join(err))
