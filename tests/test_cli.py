"""The command line as an operator meets it: global options anywhere, one-line errors, help with
examples, and messages for empty results. Error cases assert the exact number of stderr lines."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.cli import build_parser, verbosity
from bootstrap.errors import ExitCode, UsageError
from tests.harness.cli import bootstrap


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_global_options_after_the_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    after = bootstrap("list", "--json", "--state", str(state), check=True)
    before = bootstrap("--json", "--state", str(state), "list", check=True)
    assert after.json() == before.json() == []
    store = tmp_path / "store"
    ran = bootstrap("images", "--store", str(store), "--json", check=True)
    assert ran.json() == []
    assert bootstrap("gc", "-q", "--store", str(store), check=True).stderr == ""


def test_option_before_the_command_survives_its_absence_after() -> None:
    args = build_parser().parse_args(["--store", "/s", "--json", "-v", "images"])
    assert (args.store, args.json, verbosity(args)) == ("/s", True, 1)
    args = build_parser().parse_args(["-v", "pull", "-v", "x"])
    assert verbosity(args) == 2
    args = build_parser().parse_args(["images", "-q"])
    assert verbosity(args) == -1
    with pytest.raises(UsageError, match="exclude each other"):
        verbosity(build_parser().parse_args(["-q", "images", "-v"]))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pull"], "bootstrap: error: pull: the following arguments are required: REF"),
        (["no-such-command"], "bootstrap: error: argument COMMAND: invalid choice"),
        (["images", "--bogus"], "bootstrap: error: unrecognized arguments: --bogus"),
        (["checkout", "x"], "bootstrap: error: checkout: the following arguments are required"),
    ],
)
def test_argparse_errors_are_one_line_without_a_doubled_prefix(
    argv: list[str], message: str
) -> None:
    ran = bootstrap(*argv)
    assert ran.rc == ExitCode.USAGE
    lines = ran.stderr.splitlines()
    assert len(lines) == 2, ran.stderr
    assert lines[0].startswith(message), lines[0]
    assert "bootstrap: error: bootstrap" not in ran.stderr
    assert lines[1].startswith("bootstrap: hint: see 'bootstrap")
    assert ran.stdout == ""


def test_every_command_describes_its_positionals_and_shows_an_example() -> None:
    for name, parser in _subparsers().items():
        text = parser.format_help()
        assert "example" in text and f"  bootstrap {name}" in text, name
        for action in parser._actions:
            if not action.option_strings:
                assert action.help, f"{name} {action.metavar}: no help"
        assert parser.description, name


def test_command_help_runs() -> None:
    ran = bootstrap("checkout", "--help", check=True)
    assert "DEST" in ran.stdout and "must not exist" in ran.stdout
    assert "bootstrap checkout " in ran.stdout


def test_empty_images_says_so(tmp_path: Path) -> None:
    ran = bootstrap("images", store=tmp_path / "s", check=True)
    assert "no images" in ran.stdout
    assert bootstrap("--json", "images", store=tmp_path / "s", check=True).json() == []


def test_rmi_of_what_is_not_stored_points_at_images_not_pull(tmp_path: Path) -> None:
    ran = bootstrap("rmi", "localhost:5400/demo/nope:1", store=tmp_path / "s")
    _two_lines(ran, ExitCode.USAGE, "image localhost:5400/demo/nope:1 is not in the store")
    assert ran.stderr.splitlines()[1] == (
        "bootstrap: hint: 'bootstrap images' lists the stored references"
    )


def test_counts_are_singular_for_one(tmp_path: Path) -> None:
    from bootstrap.progress import counted

    assert (counted(1, "layer"), counted(0, "layer"), counted(3, "entry", "entries")) == (
        "1 layer",
        "0 layers",
        "3 entries",
    )
    store = tmp_path / "s"
    bootstrap("import", "--name", "a/b:1", _rootfs_tar(tmp_path), store=store, check=True)
    ran = bootstrap("checkout", "a/b:1", tmp_path / "co", store=store, check=True)
    assert "(1 layer, " in ran.stdout, ran.stdout


# ---- retries: one error line and one hint; retry lines only with -v, a status line on a TTY --


def _refused_ref() -> str:
    return "127.0.0.1:1/foo/bar:1"  # port 1: connection refused at once


def test_unreachable_registry_retries_said_once_then_two_lines(tmp_path: Path) -> None:
    """On a pipe at default verbosity the wait is said once (a pull that seems to hang for
    seconds says why); with -q only the error and the hint."""
    for flags, said in (([], 1), (["-q"], 0)):
        ran = bootstrap(*flags, "pull", _refused_ref(), store=tmp_path / "s")
        assert ran.rc == ExitCode.REGISTRY
        lines = ran.stderr.splitlines()
        assert len(lines) == 2 + said, ran.stderr
        if said:
            assert lines[0] == "127.0.0.1:1: connection refused; retrying (-v shows each retry)"
        assert lines[-2].startswith("bootstrap: error: 127.0.0.1:1: cannot reach")
        assert lines[-1].startswith("bootstrap: hint: ")
        assert "Retrying" not in ran.stderr and "urllib3" not in ran.stderr


def test_an_insecure_registry_unreachable_names_both_schemes_tried(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nlocation = "127.0.0.1:1"\ninsecure = true\n')
    ran = bootstrap(
        "pull", _refused_ref(), store=tmp_path / "s", env={"REGISTRIES_CONFIG_PATH": str(conf)}
    )
    assert ran.rc == ExitCode.REGISTRY
    assert ran.stderr.splitlines()[-2] == (
        "bootstrap: error: 127.0.0.1:1: cannot reach https://127.0.0.1:1/v2/ nor "
        "http://127.0.0.1:1/v2/: [Errno 111] Connection refused"
    )
    ran = bootstrap("-v", "pull", _refused_ref(), store=tmp_path / "s")
    lines = ran.stderr.splitlines()
    retries = [line for line in lines if line.startswith("127.0.0.1:1: connection refused; retry")]
    assert len(retries) == len(lines) - 2 >= 1, ran.stderr
    assert lines[-2].startswith("bootstrap: error: ") and lines[-1].startswith("bootstrap: hint:")
    assert "Retrying" not in ran.stderr and "Traceback" not in ran.stderr


def test_pull_jitter_waits_then_pulls(tmp_path: Path) -> None:
    ran = bootstrap("-v", "pull", "--jitter", "0.3", _refused_ref(), store=tmp_path / "s")
    assert ran.rc == ExitCode.REGISTRY
    waits = [line for line in ran.stderr.splitlines() if "(--jitter 0.3) before pulling" in line]
    assert len(waits) == 1 and 0 <= float(waits[0].split()[1].rstrip("s")) <= 0.3, ran.stderr
    for bad in ("-1", "soon", "4000"):
        ran = bootstrap("pull", "--jitter", bad, _refused_ref(), store=tmp_path / "s")
        assert ran.rc == ExitCode.USAGE and "--jitter" in ran.stderr


def test_retries_draw_one_status_line_on_a_tty(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.harness.cli import BOOTSTRAP

    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [str(BOOTSTRAP), "--store", str(tmp_path / "s"), "pull", _refused_ref()],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=60) == ExitCode.REGISTRY
    finally:
        os.close(master)
    out = b"".join(chunks).decode()
    assert out.count("\r\x1b[K127.0.0.1:1: connection refused; retry") >= 2
    # what stays on screen once the status line is erased: the error and the hint
    rows = out.replace("\r\n", "\n").split("\n")  # a terminal keeps what follows the last CR
    screen = [row.rsplit("\r", 1)[-1].removeprefix("\x1b[K") for row in rows]
    screen = [row for row in screen if row]
    assert len(screen) == 2, screen
    assert screen[0].startswith("bootstrap: error: ") and screen[1].startswith("bootstrap: hint:")


# ---- stores that cannot be used as they are -------------------------------------------------


def _rootfs_tar(tmp_path: Path) -> Path:
    import tarfile

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "hello").write_text("hi\n")
    tar = tmp_path / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tree, arcname=".")
    return tar


def _two_lines(ran: object, rc: int, *words: str) -> None:
    from tests.harness.cli import Ran

    assert isinstance(ran, Ran)
    assert ran.rc == rc, (ran.rc, ran.stderr)
    lines = ran.stderr.splitlines()
    assert len(lines) == 2, ran.stderr
    assert lines[0].startswith("bootstrap: error: ") and lines[1].startswith("bootstrap: hint: ")
    for word in words:
        assert word in ran.stderr, (word, ran.stderr)


@pytest.mark.parametrize(
    "argv",
    [["images"], ["fsck"], ["gc"], ["rmi", "a/b:1"], ["pull", "127.0.0.1:1/a:1"], ["list"]],
)
def test_store_naming_a_file(tmp_path: Path, argv: list[str]) -> None:
    bogus = tmp_path / "file"
    bogus.write_text("x")
    env = {"BOOTSTRAP_STATE": str(tmp_path / "state")} if argv != ["list"] else {}
    if argv == ["list"]:  # the state directory gets the same treatment
        ran = bootstrap("--state", str(bogus), "list")
        _two_lines(ran, ExitCode.USAGE, f"the state directory {bogus} is not a directory")
        return
    ran = bootstrap(*argv, store=bogus, env=env)
    _two_lines(ran, ExitCode.USAGE, f"the store {bogus} is not a directory", "--store")
    ran = bootstrap("--json", *argv, store=bogus / "below", env=env)
    _two_lines(ran, ExitCode.USAGE, "is not a directory")
    assert ran.json()["exit_code"] == ExitCode.USAGE
    assert bogus.read_text() == "x"


def test_read_only_commands_create_no_store(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()  # e.g. /var/lib/bootstrap holding deployments only
    for argv in (["images"], ["fsck"], ["--json", "fsck"], ["list"], ["gc"]):
        bootstrap(*argv, store=empty, state=empty, check=True)
        bootstrap(*argv, store=tmp_path / "none", state=tmp_path / "none2", check=True)
    assert list(empty.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.fixture
def read_only_store(tmp_path: Path) -> Iterator[Path]:
    """A store holding one image (a/b:1), bind-mounted read-only onto itself."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount read-only")
    root = tmp_path / "ro"
    store = root / "store"
    bootstrap("import", "--name", "a/b:1", _rootfs_tar(tmp_path), store=store, check=True)
    subprocess.run(["mount", "--bind", root, root], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
        yield store
    finally:
        subprocess.run(["umount", root], check=True)


def test_read_only_store(read_only_store: Path, tmp_path: Path) -> None:
    store = read_only_store
    state = store.parent / "state"  # on the same read-only filesystem, never created
    ran = bootstrap("images", store=store, state=state, check=True)
    assert "docker.io/a/b:1" in ran.stdout and ran.stderr == ""
    assert bootstrap("--json", "images", store=store, check=True).json()[0]["name"] == (
        "docker.io/a/b:1"
    )
    assert bootstrap("fsck", store=store, check=True).stdout.startswith("checked 3 blobs")
    assert bootstrap("fsck", "--json", store=store, check=True).json()["ok"] is True
    assert bootstrap("list", store=store, state=state, check=True).stderr == ""
    _two_lines(bootstrap("status", "x", store=store, state=state), ExitCode.USAGE)
    for argv in (
        ["gc"],
        ["rmi", "a/b:1"],
        ["pull", "127.0.0.1:1/a:1"],
        ["import", "--name", "c/d:1", _rootfs_tar(tmp_path)],
        ["checkout", "a/b:1", tmp_path / "co"],
    ):
        ran = bootstrap(*argv, store=store, state=state)
        # the store given cannot be used for this: a usage error (exit 2), as documented
        _two_lines(ran, ExitCode.USAGE, f"the store {store} is on a read-only filesystem")
        ran = bootstrap("--json", *argv, store=store, state=state)
        assert ran.json()["exit_code"] == ExitCode.USAGE
    ran = bootstrap("images", store=store.parent / "new")
    assert ran.rc == 0 and "no images" in ran.stdout
    assert bootstrap("fsck", "--json", store=store.parent / "new", check=True).json()["ok"]
    assert not (tmp_path / "co").exists()


# ---- arguments naming the wrong kind of path ------------------------------------------------


def test_import_of_a_directory_and_checkout_below_a_missing_parent(tmp_path: Path) -> None:
    store = tmp_path / "s"
    ran = bootstrap("import", tmp_path, store=store)
    _two_lines(ran, ExitCode.USAGE, f"{tmp_path} is a directory")
    _two_lines(bootstrap("import", tmp_path / "nope.tar", store=store), 2, "no such file")
    bootstrap("import", "--name", "a/b:1", _rootfs_tar(tmp_path), store=store, check=True)
    dest = tmp_path / "missing" / "root"
    ran = bootstrap("checkout", "a/b:1", dest, store=store)
    _two_lines(ran, ExitCode.USAGE, f"the parent directory {dest.parent} does not exist")
    assert not dest.parent.exists()
    bootstrap("checkout", "a/b:1", tmp_path / "root", store=store, check=True)
    assert (tmp_path / "root" / "etc" / "hello").read_text() == "hi\n"


def test_demo_suggestions_carry_the_state_given() -> None:
    from bootstrap.demo.demo import demo_command
    from bootstrap.settings import Settings

    assert demo_command(Settings()) == "bootstrap demo"
    other = Settings(state=Path("/srv/my state"))
    assert demo_command(other, "--down") == "bootstrap --state '/srv/my state' demo --down"


# ---- output to a pipe whose reader is gone ----------------------------------------------------


def _closed_pipe_run(argv: list[str], store: Path) -> tuple[int, str]:
    """Run bootstrap with stdout a pipe whose read end is already closed; (status, stderr)."""
    import os
    import subprocess

    from tests.harness.cli import BOOTSTRAP

    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [str(BOOTSTRAP), "--store", str(store), *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    return proc.returncode, proc.stderr


def test_output_to_a_closed_pipe_ends_quietly_as_git_does(tmp_path: Path) -> None:
    import signal
    import subprocess

    store = tmp_path / "s"
    bootstrap("import", "--name", "a/b:1", _rootfs_tar(tmp_path), store=store, check=True)
    for argv in (["images"], ["images", "--json"], ["fsck", "--json"]):
        rc, err = _closed_pipe_run(argv, store)
        assert (rc, err) == (-signal.SIGPIPE, ""), (argv, rc, err)
    # an error's --json document on a closed stdout: the error line is said, then the end
    rc, err = _closed_pipe_run(["--json", "rmi", "c/d:1"], store)
    assert rc == -signal.SIGPIPE and "Traceback" not in err
    assert err.splitlines()[0].startswith("bootstrap: error: image docker.io/c/d:1")
    # what the shell shows, with a reader that leaves at once: 141 (or 0 when the output fit
    # into the pipe before it left), never an error line
    from tests.harness.cli import BOOTSTRAP

    script = f'"$0" --store {store} images | true; echo "${{PIPESTATUS[0]}}"'
    ran = subprocess.run(
        ["bash", "-c", script, str(BOOTSTRAP)], capture_output=True, text=True, check=True
    )
    assert ran.stdout.strip() in ("141", "0") and ran.stderr == "", ran


def test_closed_pipe_in_process_is_status_141(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from bootstrap.cli import SIGPIPE_STATUS, main

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["--store", str(tmp_path / "s"), "images"]) == SIGPIPE_STATUS == 141
