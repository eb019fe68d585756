"""The documentation's commands, run as written: each page's ```sh blocks are executed unchanged
in a sandbox (tests/harness/docrun.py: overlays over /etc, /root, /srv and /var/lib, a
loopback network of its own where the page's host names resolve), with only what the page
says the reader already has provided by the test (an image archive, a registry to copy
from). A page whose commands stop working fails here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.harness.cli import REPO
from tests.harness.docrun import run_sandboxed, sh_blocks
from tests.harness.imagebuilder import busybox_spec, save_docker_archive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (namespaces, mounts)"),
]

DOCS = REPO / "docs"


def test_registries_md_seeding_a_site_registry(tmp_path: Path) -> None:
    blocks = sh_blocks(DOCS / "registries.md", "Seeding a site registry: `bootstrap push`")
    assert len(blocks) == 2, blocks
    save_docker_archive(busybox_spec(), tmp_path / "ocid.tar", None)
    ran = run_sandboxed(
        "\n".join(blocks), hosts={"registry.site.example": "127.0.0.1"}, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    imported, pushed = (line.split()[-1] for line in ran.stdout.splitlines()[:2])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pushed) and imported == pushed
    inspected = ran.stdout[ran.stdout.index("{") :]
    assert f'"Digest": "{pushed}"' in inspected
    assert '"Name": "registry.site.example:5000/k8s/ocid"' in inspected
