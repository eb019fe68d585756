"""Unit text: quoting per systemd.syntax, the generated unit, name validation. Whether systemd
reads the units back as intended is checked with systemd-analyze in the node tests
(tests/test_deploy.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bootstrap.errors import UsageError
from bootstrap.systemd import units


@pytest.mark.parametrize(
    ("word", "quoted"),
    [
        ("/usr/sbin/runc", "/usr/sbin/runc"),
        ("--bundle", "--bundle"),
        ("a b", '"a b"'),
        ("", '""'),
        ("100%", "100%%"),
        ("$HOME", "$$HOME"),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("two\nlines", '"two\\nlines"'),
        (";", '";"'),
        ("it's", '"it\'s"'),
    ],
)
def test_quote_word(word: str, quoted: str) -> None:
    assert units.quote_word(word) == quoted


def test_exec_command_prefix_and_absolute() -> None:
    assert units.exec_command(["/bin/runc", "delete", "x"], prefix="-") == "-/bin/runc delete x"
    with pytest.raises(ValueError):
        units.exec_command(["runc"])
    with pytest.raises(ValueError):
        units.exec_command(["/bin/x"], prefix="x")


@pytest.mark.parametrize("name", ["a", "ocid", "kube-let_2", "A" * 64])
def test_good_names(name: str) -> None:
    assert units.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", "a.b", "a/b", "a b", "x" * 65, "../x", "a\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        units.check_name(name)


def test_default_template_variants() -> None:
    plain = units.default_service_template(host_network=False, notify=False)
    assert "network-online.target" not in plain
    assert "Type=simple" in plain
    for line in (
        "ExecStartPre=$EXEC_START_PRE",
        "ExecStart=$EXEC_START",
        "ExecStop=$EXEC_STOP",
        "ExecStopPost=$EXEC_STOP_POST",
        "KillMode=mixed",
        "Delegate=yes",
        "Restart=on-failure",
        "SuccessExitStatus=137 143",
    ):
        assert line in plain.splitlines()
    net = units.default_service_template(host_network=True, notify=True)
    assert "After=network-online.target" in net and "Wants=network-online.target" in net
    assert "Type=notify" in net
    one = units.default_service_template(host_network=False, notify=False, oneshot=True)
    lines = one.splitlines()
    assert "Type=oneshot" in lines and "RemainAfterExit=yes" in lines
    assert "Type=simple" not in lines
    assert not [x for x in lines if x.startswith(("Restart", "SuccessExitStatus="))]
    assert "ExecStart=$EXEC_START" in lines and "ExecStopPost=$EXEC_STOP_POST" in lines


def test_stop_script_kills_a_term_ignoring_process_within_grace(tmp_path: Path) -> None:
    """The stop script against a fake runc: TERM first, then poll, then KILL --all."""
    log = tmp_path / "log"
    fake = tmp_path / "runc"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        # signal 0 always succeeds: the container ignores TERM
        "exit 0\n"
    )
    fake.chmod(0o755)
    argv = units.stop_script(str(fake), "c1", 1)
    subprocess.run(argv, check=True, timeout=10)
    calls = log.read_text().splitlines()
    assert calls[0] == "kill c1 TERM"
    assert calls[-1] == "kill --all c1 KILL"
    assert 5 <= calls.count("kill c1 0") <= 10
