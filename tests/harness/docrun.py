"""Run a page's shell commands as written, in a sandbox that looks like the machine.

:func:`sh_blocks` takes the fenced ```` ```sh ```` blocks of one section of a Markdown page;
:func:`run_sandboxed` runs a script in new mount, network and pid namespaces
(``unshare --mount --net --pid``): ``/etc``, ``/root``, ``/srv``, ``/var/lib`` and ``/tmp``
are overlays over the machine's own (a page may write ``/etc/containers/...`` or
``/srv/sigstore`` exactly as it says, and nothing reaches the machine), the network is a
loopback of its own (servers listen on the names and ports the page uses, ``/etc/hosts`` maps
those names), and every process the script leaves running dies with it. The repository's venv
comes first on PATH, so ``bootstrap`` is this checkout's. Needs root.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

OVERLAID = ("/etc", "/root", "/srv", "/var/lib", "/tmp")
VENV_BIN = Path(sys.executable).parent


def sh_blocks(page: Path, heading: str) -> list[str]:
    """The ```` ```sh ```` blocks under the Markdown heading whose text is ``heading``, up to
    the next heading of the same or a higher level, in order."""
    lines = page.read_text().splitlines()
    start = level = None
    for i, line in enumerate(lines):
        m = re.match(r"(#+) (.*)", line)
        if m and m.group(2).strip() == heading:
            start, level = i + 1, len(m.group(1))
            break
    if start is None or level is None:
        raise AssertionError(f"{page}: no heading {heading!r}")
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines[start:]:
        m = re.match(r"(#+) ", line)
        if current is None and m and len(m.group(1)) <= level:
            break
        if current is None and line.strip() == "```sh":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def run_sandboxed(
    script: str,
    *,
    setup: str = "",
    hosts: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``setup`` (the test's own preparation: servers, files a page assumes) then
    ``script`` (the page's commands, unchanged) with ``bash -euo pipefail`` in the sandbox of
    the module docstring; ``hosts`` maps names to loopback addresses in its ``/etc/hosts``.
    Returns the completed process (output as text); the sandbox's changes are gone after."""
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="docrun-") as base:
        lines = [
            "set -euo pipefail",
            "mount --make-rprivate /",
            "ip link set lo up",
        ]
        for d in OVERLAID:
            n = d.strip("/").replace("/", "_")
            up, work = f"{base}/{n}/upper", f"{base}/{n}/work"
            lines += [
                f"mkdir -p {up} {work}",
                f"mount -t overlay overlay -o lowerdir={d},upperdir={up},workdir={work} {d}",
            ]
        for name, addr in (hosts or {}).items():
            lines.append(f"echo {shlex.quote(f'{addr} {name}')} >> /etc/hosts")
        lines.append(f"cd {shlex.quote(str(cwd))}")
        outer = (
            "\n".join(lines) + "\n" + setup + "\n" + 'exec bash -euo pipefail -c "$DOC_SCRIPT"\n'
        )
        full_env = {
            **os.environ,
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": "/root",
            **(env or {}),
            "DOC_SCRIPT": script,
        }
        argv: Sequence[str] = [
            "unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc",
            "bash", "-c", outer,
        ]  # fmt: skip
        return subprocess.run(
            argv, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
        )
