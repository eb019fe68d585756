"""Static checks run as tests: ruff lint, ruff format, mypy --strict, the import contracts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"


def test_ruff_check() -> None:
    _run(str(BIN / "ruff"), "check", ".")


def test_ruff_format() -> None:
    _run(str(BIN / "ruff"), "format", "--check", ".")


STANDIN = "images/demo/kubelet-standin/main.py"
"""The kubelet stand-in: Python the repository ships outside the package (it runs in its image),
checked as strictly."""


@pytest.mark.slow
def test_mypy_strict() -> None:
    _run(str(BIN / "mypy"), "--strict", "bootstrap", STANDIN)


def test_import_contracts() -> None:
    """The allowed imports between stages and inside image/ ([tool.importlinter] in
    pyproject.toml): a new arrow against the flow fails here."""
    _run(str(BIN / "lint-imports"), "--no-cache")
