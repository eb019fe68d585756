"""The command line as an operator meets it: global options anywhere, one-line errors, help with
examples, and messages for empty results. Error cases assert the exact number of stderr lines."""

from __future__ import annotations

import argparse
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
