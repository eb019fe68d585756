"""The shared core: errors and exit codes, the CLI skeleton, run(), flock, atomic writes, HTTP."""

from __future__ import annotations

import fcntl
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bootstrap import __version__
from bootstrap.errors import (
    BootstrapError,
    BusyError,
    ExitCode,
    IntegrityError,
    RegistryError,
    SystemdError,
    UsageError,
)
from bootstrap.fsutil import atomic_writer, remove_tree, write_atomic
from bootstrap.http import new_session
from bootstrap.locks import flocked
from bootstrap.process import run
from tests.harness.cli import bootstrap

# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (BootstrapError, 1),
        (UsageError, 2),
        (RegistryError, 3),
        (IntegrityError, 4),
        (SystemdError, 5),
        (BusyError, 6),
    ],
)
def test_exit_codes(cls: type[BootstrapError], code: int) -> None:
    assert cls("x").exit_code == code


def test_error_is_one_line_and_keeps_context() -> None:
    err = IntegrityError("bad\nline\r\n injected", "do\nthis")
    assert err.message == "bad line injected"
    assert err.hint == "do this"
    ctx = err.with_context("containers[1].image")
    assert isinstance(ctx, IntegrityError)
    assert ctx.message == "containers[1].image: bad line injected"
    assert ctx.hint == "do this"


def test_errors_module_imports_nothing_internal() -> None:
    src = (Path(__file__).parents[1] / "bootstrap" / "errors.py").read_text()
    assert "from bootstrap" not in src
    assert "import bootstrap" not in src


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_version() -> None:
    ran = bootstrap("--version", check=True)
    assert ran.stdout.strip() == f"bootstrap {__version__}"


def test_cli_usage_error_exit_2_one_line_with_hint() -> None:
    ran = bootstrap("no-such-command")
    assert ran.rc == ExitCode.USAGE
    lines = ran.stderr.strip().splitlines()
    assert lines[0].startswith("bootstrap: error: ")
    assert lines[1].startswith("bootstrap: hint: ")
    assert ran.stdout == ""


def test_cli_json_error_document() -> None:
    ran = bootstrap("--json", "no-such-command")
    assert ran.rc == 2
    doc = ran.json()
    assert doc["exit_code"] == 2
    assert doc["error"]
    assert doc["hint"]


def test_cli_unexpected_exception_is_one_line(tmp_path: Path) -> None:
    # A store root that is a regular file makes any store operation fail in an unplanned way at
    # worst; whatever happens, the tool must not print a traceback without -v.
    bogus = tmp_path / "file"
    bogus.write_text("x")
    ran = bootstrap("images", store=bogus)
    assert ran.rc != 0
    assert "Traceback" not in ran.stderr
    assert len(ran.stderr.strip().splitlines()) <= 2


def test_cli_quiet_keeps_the_result(tmp_path: Path) -> None:
    """-q silences progress and logs, not the answer (as podman pull -q prints the ID)."""
    loud = bootstrap("gc", store=tmp_path / "s", check=True)
    quiet = bootstrap("-q", "gc", store=tmp_path / "s", check=True)
    assert quiet.stdout == loud.stdout
    assert quiet.stdout.strip()
    assert quiet.stderr == ""


def test_cli_help_lists_the_contract() -> None:
    ran = bootstrap("--help", check=True)
    for cmd in ("pull", "import", "images", "rmi", "gc", "fsck", "checkout"):
        assert cmd in ran.stdout


# ---- the README's commands ---------------------------------------------------------------------


def _indented_commands(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.startswith("    ") and ln.strip()]


def test_readme_commands_need_no_sudo_as_root_and_ci_runs_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README gives each command as root (a stock Debian 12 has no sudo) and with sudo;
    nothing on the root path calls sudo; .ci/run runs the README's test command."""
    from tests.harness.cli import REPO

    readme = (REPO / "README.md").read_text()
    commands = _indented_commands(readme)
    assert "./install.sh && bootstrap demo" in commands
    assert "sudo ./install.sh && sudo bootstrap demo" in commands
    assert "./install.sh --dev && .venv/bin/python -m pytest" in commands
    assert "`sudo ./install.sh --dev && sudo .venv/bin/python -m pytest`" in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert "  ./install.sh --dev && .venv/bin/python -m pytest -ra --durations=15\n" in ci
    assert "  sudo ./install.sh --dev && sudo .venv/bin/python -m pytest -ra" in ci
    install = (REPO / "install.sh").read_text()
    code = [ln for ln in install.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if re.search(r"(^|[;&|]\s*)sudo ", ln)], "install.sh runs sudo"
    assert "editable_mode=compat" not in install  # setuptools' deprecated mode: 15 lines of warning
    # the demo's refusal without root names both forms
    from bootstrap.demo import demo

    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError) as info:
        demo._require_root()
    assert "as root: bootstrap demo" in info.value.hint and "sudo bootstrap demo" in info.value.hint


def test_install_sh_as_a_user_says_how_to_run_it(tmp_path: Path) -> None:
    from tests.harness.cli import REPO

    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(REPO / "install.sh")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 1
    assert "must run as root: run ./install.sh as root, or sudo ./install.sh" in out.stderr


# ---- run() -------------------------------------------------------------------------------------


def test_run_ok_and_captures() -> None:
    proc = run(["sh", "-c", "echo out; echo err >&2"])
    assert proc.stdout == b"out\n"
    assert proc.stderr == b"err\n"


def test_run_failure_carries_stderr_and_error_class() -> None:
    with pytest.raises(SystemdError) as info:
        run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 3"], error=SystemdError)
    assert "exited 3" in info.value.message
    assert "the reason" in info.value.message
    assert info.value.exit_code == 5


def test_run_missing_command_and_timeout() -> None:
    with pytest.raises(BootstrapError, match="command not found"):
        run(["/nonexistent/cmd"])
    with pytest.raises(BootstrapError, match="timed out"):
        run(["sleep", "5"], timeout=0.2)
    assert run(["false"], check=False).returncode == 1


# ---- locks -------------------------------------------------------------------------------------


def _hold_lock(path: Path, shared: bool, seconds: float) -> subprocess.Popen[bytes]:
    code = (
        "import sys,time\n"
        "from bootstrap.locks import flocked\n"
        f"with flocked({str(path)!r}, shared={shared}):\n"
        "    print('held', flush=True)\n"
        f"    time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"held\n"
    return proc


def test_flock_exclusive_blocks_then_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = tmp_path / "locks" / "x.lock"
    holder = _hold_lock(lock, shared=False, seconds=5)
    tries: list[int] = []
    real_flock = fcntl.flock

    def counted(fd: int, op: int) -> None:
        tries.append(op)
        real_flock(fd, op)

    monkeypatch.setattr("bootstrap.locks.fcntl.flock", counted)
    try:
        with (
            pytest.raises(BusyError, match="thing is locked"),
            flocked(lock, timeout=0.3, what="thing"),
        ):
            pass
        assert len(tries) > 2, tries  # it kept trying until its deadline, then gave up
        tries.clear()
        with pytest.raises(BusyError), flocked(lock, shared=True, timeout=0):
            pass
        assert len(tries) == 1, tries  # timeout 0: one try
    finally:
        holder.kill()
        holder.wait()
    with flocked(lock, timeout=1):  # released when the holder died
        pass


def test_flock_shared_coexist(tmp_path: Path) -> None:
    lock = tmp_path / "s.lock"
    holder = _hold_lock(lock, shared=True, seconds=5)
    try:
        with flocked(lock, shared=True, timeout=0):
            pass
        with pytest.raises(BusyError), flocked(lock, shared=False, timeout=0.1):
            pass
    finally:
        holder.kill()
        holder.wait()


# ---- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_replaces_and_cleans_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, "one", mode=0o600)
    assert target.read_text() == "one"
    assert (target.stat().st_mode & 0o777) == 0o600
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_remove_tree_handles_readonly_dirs(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    os.symlink("/etc", root / "link")
    os.chmod(root / "a" / "b", 0o555)
    os.chmod(root / "a", 0o555)
    remove_tree(root)
    assert not root.exists()
    assert Path("/etc").exists()
    remove_tree(root)  # absent: no error


# ---- HTTP session ------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    script: list[tuple[int, dict[str, str]]] = []
    seen: list[float] = []

    def do_GET(self) -> None:
        _Handler.seen.append(time.monotonic())
        status, headers = _Handler.script.pop(0) if _Handler.script else (200, {})
        body = b"ok" if status == 200 else b"no"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.script = []
    _Handler.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_session_retries_5xx_and_429_with_retry_after(http_server: str) -> None:
    _Handler.script = [(503, {}), (429, {"Retry-After": "1"}), (200, {})]
    session = new_session(backoff=0.01)
    resp = session.get(http_server + "/x")
    assert resp.status_code == 200
    assert len(_Handler.seen) == 3
    assert _Handler.seen[2] - _Handler.seen[1] >= 0.9  # Retry-After honoured


def test_session_does_not_retry_4xx(http_server: str) -> None:
    _Handler.script = [(404, {}), (200, {})]
    resp = new_session(backoff=0.01).get(http_server + "/x")
    assert resp.status_code == 404
    assert len(_Handler.seen) == 1


def test_session_gives_up_after_retries(http_server: str) -> None:
    _Handler.script = [(500, {})] * 10
    resp = new_session(retries=2, backoff=0.01).get(http_server + "/x")
    assert resp.status_code == 500
    assert len(_Handler.seen) == 3


def test_session_connect_error_and_default_timeout() -> None:
    session = new_session(retries=1, backoff=0.01, connect_timeout=1, read_timeout=1)
    with pytest.raises(requests.ConnectionError):
        session.get("http://127.0.0.1:9/")  # discard port: refused
    assert session.headers["User-Agent"].startswith("bootstrap/")


def test_run_hands_stderr_lines_over_as_they_come() -> None:
    seen: list[tuple[str, float]] = []
    start = time.monotonic()
    proc = run(
        ["sh", "-c", "echo one >&2; sleep 1; echo out; echo two >&2"],
        on_line=lambda line: seen.append((line, time.monotonic() - start)),
    )
    assert [line for line, _ in seen] == ["one", "two"]
    assert seen[0][1] < seen[1][1] - 0.5  # the first line arrived before the command ended
    assert proc.stdout == b"out\n" and proc.stderr == b"one\ntwo\n"
    with pytest.raises(BootstrapError, match="timed out"):
        run(["sleep", "5"], timeout=0.3, on_line=lambda line: None)
    with pytest.raises(BootstrapError, match="the reason"):
        run(["sh", "-c", "echo 'the reason' >&2; exit 3"], on_line=lambda line: None)
