"""The one way the tool runs a subprocess."""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

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
    feed: Callable[[IO[bytes]], object] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (no shell), capturing stdout and stderr as bytes.

    With ``feed``, the command's stdin is a pipe that ``feed(pipe)`` writes to (a stream of any
    size, never held in memory; the pipe is closed after it returns). When ``feed`` raises,
    the command is killed and the exception propagates; when the command exits early (``feed``
    then sees a broken pipe), the command's own failure is reported as below.

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
        if feed is not None:
            proc = _run_fed(args, feed, env, cwd, timeout)
        elif on_line is None:
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


def _run_fed(
    args: list[str],
    feed: Callable[[IO[bytes]], object],
    env: Mapping[str, str] | None,
    cwd: str | Path | None,
    timeout: float | None,
) -> subprocess.CompletedProcess[bytes]:
    """:func:`run`'s body with ``feed`` writing the command's stdin; raises
    ``subprocess.TimeoutExpired`` (after killing the command) past ``timeout``."""
    with subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    ) as popen:
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [
            threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
            for s, b in ((popen.stdout, out), (popen.stderr, err))
        ]
        for r in readers:
            r.start()
        with _deadline(popen, args, timeout):
            try:
                feed(popen.stdin)
            except BaseException as exc:
                if not _broken_pipe(exc):
                    popen.kill()
                    raise
                try:  # the command stopped reading: its exit status and stderr say why
                    popen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    raise exc from None
                if popen.returncode == 0:
                    raise
            finally:
                with contextlib.suppress(BrokenPipeError):
                    popen.stdin.close()
            popen.wait()
            for r in readers:
                r.join()
        return subprocess.CompletedProcess(args, popen.returncode, b"".join(out), b"".join(err))


@contextlib.contextmanager
def _deadline(
    popen: subprocess.Popen[bytes], args: list[str], timeout: float | None
) -> Iterator[None]:
    """Kill ``popen`` once ``timeout`` seconds pass while the block runs; the block then ends
    (its waits return) and ``subprocess.TimeoutExpired`` is raised."""
    expired = threading.Event()

    def kill() -> None:
        expired.set()
        popen.kill()

    timer = threading.Timer(timeout, kill) if timeout is not None else None
    if timer is not None:
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(args, timeout or 0.0)


def _broken_pipe(exc: BaseException | None) -> bool:
    """True when ``exc`` is, or was caused by, a write to a pipe whose reader went away."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, BrokenPipeError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


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
        with _deadline(popen, args, timeout):
            for raw in popen.stderr:
                err.append(raw)
                on_line(raw.decode(errors="replace").rstrip("\n"))
            popen.wait()
            reader.join()
        return subprocess.CompletedProcess(args, popen.returncode, b"".join(out), b"".join(err))
