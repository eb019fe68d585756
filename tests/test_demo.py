"""``bootstrap demo`` / ``bootstrap demo --down``: the real command, a real machine.

The end-to-end test runs the console script with ``--state`` pointing at a persistent directory
under ``REPO/.cache/demo-state`` (so the demo's image cache survives between test runs; the
machine rootfs cache is seeded with a hard link to the node harness's cache, which has the same
key, and the image cache with links to tests/harness/cri.py's .debs and image layouts). Whatever
the test leaves behind is torn down with ``demo --down``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.demo import machine as m
from bootstrap.locks import flocked
from tests.harness import cri
from tests.harness.cli import bootstrap
from tests.harness.node import REPO, rootfs_tarball

STATE = REPO / ".cache" / "demo-state"


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _seed_cache(state: Path) -> None:
    cache = state / "demo" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    src = rootfs_tarball()
    dest = cache / src.name
    if not dest.exists():
        _link(src, dest)
    # the demo builds the same CRI images as tests/harness/cri.py (same builders, same keys):
    # start from that cache's .debs and finished layouts rather than fetch and build them again
    images = state / "demo" / "images"
    (images / "debs").mkdir(parents=True, exist_ok=True)
    for deb in cri.CACHE.glob("debs/*.deb"):
        if not (images / "debs" / deb.name).exists():
            _link(deb, images / "debs" / deb.name)
    for layout in [*cri.CACHE.glob("ocid-*"), *cri.CACHE.glob("kubelet-standin-*")]:
        if layout.is_dir() and not (images / layout.name).exists():
            tmp = images / f".{layout.name}.seed"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(layout, tmp, copy_function=_link)
            os.rename(tmp, images / layout.name)


def _record(state: Path) -> dict | None:
    path = state / "demo" / "node.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def demo_state(node_rootfs: Path) -> Iterator[Path]:
    """The persistent demo state dir, seeded, with no machine up before or after the test."""
    if _record(STATE) is not None:
        bootstrap("--state", STATE, "demo", "--down", timeout=300)
    _seed_cache(STATE)
    yield STATE
    if _record(STATE) is not None:
        ran = bootstrap("--state", STATE, "demo", "--down", timeout=300)
        assert ran.rc == 0, ran.stderr


@pytest.mark.slow
@pytest.mark.node
def test_demo_up_again_and_down(demo_state: Path) -> None:
    state = demo_state
    pid1_before = Path("/proc/1/cgroup").read_text()
    ours_before = Path("/proc/self/cgroup").read_text()

    started = time.monotonic()
    up = bootstrap("--state", state, "demo", timeout=1800)
    up_seconds = time.monotonic() - started
    assert up.rc == 0, f"stdout: {up.stdout}\nstderr: {up.stderr}"
    # progress on stderr, one line per step
    for n in range(1, 7):
        assert f"demo: [{n}/6]" in up.stderr, up.stderr
    doc = _record(state)
    assert doc is not None and doc["provisioned"] is True
    containers = doc["containers"]
    assert containers
    # list/status from inside the machine, on stdout
    assert "$ bootstrap list" in up.stdout
    for name in containers:
        assert f"$ bootstrap status {name}" in up.stdout
        line = next(ln for ln in up.stdout.splitlines() if ln.startswith(f"{name} "))
        assert " active " in line, up.stdout
    assert "nsenter --target=" in up.stdout and "system_bus_socket" in up.stdout
    # the teardown hint names the --state given, so it works as printed
    assert f"bootstrap --state {state} demo --down" in up.stdout
    # the node's output is relayed once per line
    relayed = [ln for ln in up.stderr.splitlines() if ln.startswith("demo:   ")]
    assert len(relayed) == len(set(relayed)), up.stderr
    assert sum("provisioned from" in ln for ln in relayed) == 1, up.stderr
    if "ocid" in containers:  # the node manifest's workload: pulled from the demo's registry
        assert "from docker-registry on 127.0.0.1:5000" in up.stderr, up.stderr
        assert "demo:   up: pulled 127.0.0.1:5000/bootstrap/ocid:containerd" in up.stderr
        assert "demo:   up: pulled 127.0.0.1:5000/bootstrap/kubelet:standin" in up.stderr

    machine = m.Machine.from_record(doc["machine"])
    assert machine.running
    assert all(d.is_dir() for d in machine.cgroups)
    assert machine.rootfs.is_dir()
    # the machine is detached: it outlived the demo command
    assert m.alive(machine.nspawn_pid) and m.alive(machine.pid)

    # demo again: idempotent, says so, shows status; --json gives one document
    again = bootstrap("--state", state, "--json", "demo", timeout=300)
    assert again.rc == 0, again.stderr
    result = again.json()
    assert result["action"] == "already-up"
    assert result["node"]["pid"] == machine.pid
    assert {c["name"] for c in result["list"]} >= set(containers)
    assert all(c["active_state"] == "active" for c in result["list"] if c["name"] in containers)
    assert _record(state)["machine"]["pid"] == machine.pid  # type: ignore[index]

    if "ocid" in containers:
        _suggested_update_then_rollback(machine, up.stdout)

    # a second command while one runs: exit 6 at once
    with flocked(state / "demo" / "demo.lock"):
        busy = bootstrap("--state", state, "demo", "--down", timeout=60)
    assert busy.rc == 6, busy.stderr
    assert "locked" in busy.stderr
    assert machine.running

    # down: no machine process, cgroups, rootfs or record left; the host's cgroups unchanged
    started = time.monotonic()
    down = bootstrap("--state", state, "demo", "--down", timeout=300)
    down_seconds = time.monotonic() - started
    assert down.rc == 0, down.stderr
    assert "powered off and removed" in down.stdout
    assert not m.alive(machine.nspawn_pid) and not m.alive(machine.pid)
    assert not any(d.exists() for d in machine.cgroups), "cgroups left behind"
    assert not machine.workdir.exists()
    assert not (m.NSPAWN_PROPAGATE / machine.name).exists()
    assert _record(state) is None
    assert Path("/proc/1/cgroup").read_text() == pid1_before
    assert Path("/proc/self/cgroup").read_text() == ours_before
    assert (state / "demo" / "cache").is_dir()  # caches stay for the next run

    again = bootstrap("--state", state, "demo", "--down", timeout=60)
    assert again.rc == 0 and "nothing to do" in again.stdout
    print(f"demo: up {up_seconds:.1f}s ({doc['workload']}), down {down_seconds:.1f}s")


def _suggested_update_then_rollback(machine: m.Machine, printed: str) -> None:
    """The printed update, run as printed inside the machine, changes something (the CRI
    daemon restarts at debug: its journal and ``status`` show it) and the printed rollback
    takes it back; no warning about a --set the definition does not use."""

    def inside(cmd: str) -> str:
        out = machine.run(["sh", "-c", cmd + " 2>&1"], timeout=300, check=False)
        text = out.stdout.decode(errors="replace")
        assert out.returncode == 0, f"{cmd}: {text}"
        return text

    lines = printed.splitlines()
    i = next(i for i, ln in enumerate(lines) if "change, then undo:" in ln)
    update = lines[i].split("change, then undo:", 1)[1].split("   (", 1)[0].strip()
    rollback = lines[i + 1].split("   (", 1)[0].strip()
    assert update == "bootstrap update --no-pull --set LOG_LEVEL=debug ocid", update
    assert rollback == "bootstrap rollback ocid", rollback
    out = inside(update)
    assert "updated to" in out and "not used by the definition" not in out, out
    status = inside("bootstrap status ocid")
    assert "LOG_LEVEL=debug" in status and "  rollback: " in status, status
    # containerd now logs at debug: its journal has debug lines since that restart
    deadline = time.monotonic() + 30
    while "level=debug" not in inside("journalctl -u ocid -n 200 --no-pager"):
        assert time.monotonic() < deadline, "no debug line from ocid after the update"
        time.sleep(0.5)
    out = inside(rollback)
    status = inside("bootstrap status ocid")
    assert "LOG_LEVEL=debug" not in status and "active (running)" in status, status


def test_demo_busy_exits_6_and_changes_nothing(tmp_path: Path) -> None:
    with flocked(tmp_path / "demo" / "demo.lock"):
        ran = bootstrap("--state", tmp_path, "demo", timeout=60)
    assert ran.rc == 6, ran.stderr
    assert "bootstrap: error:" in ran.stderr and "bootstrap: hint:" in ran.stderr
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.lock"]


def test_demo_down_without_a_machine(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ran = bootstrap("--state", tmp_path, "demo", "--down", timeout=60)
    assert ran.rc == 0, ran.stderr
    assert "nothing to do" in ran.stdout


def test_demo_damaged_record_exits_2(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "node.json").write_text("{not json")
    for args in (("demo",), ("demo", "--down")):
        ran = bootstrap("--state", tmp_path, *args, timeout=60)
        assert ran.rc == 2, ran.stderr
        assert "node.json" in ran.stderr and "bootstrap: hint:" in ran.stderr
    assert (tmp_path / "demo" / "node.json").read_text() == "{not json"


def test_machine_record_rejects_foreign_cgroups() -> None:
    """A record can only name cgroups of its own machine: --down never kills elsewhere."""
    doc = {
        "version": 1,
        "name": "bsdemo-abcdef",
        "workdir": "/dev/shm/x",
        "nspawn_pid": 1,
        "pid": 1,
        "binds": [],
        "ro_binds": [],
        "exec_cgroup": "demo",
        "cgroups": ["/sys/fs/cgroup/memory"],
        "controllers": ["memory"],
        "mountpoints": ["/sys/fs/cgroup/memory"],
        "exec_cgroups": [],
    }
    with pytest.raises(m.MachineError, match="outside the machine's"):
        m.Machine.from_record(doc)
    doc["cgroups"] = ["/sys/fs/cgroup/memory/bsdemo-abcdef"]
    machine = m.Machine.from_record(doc)
    assert not machine.running  # pid 1 is not this machine's systemd-nspawn


def test_product_code_does_not_import_tests() -> None:
    for path in (REPO / "bootstrap").rglob("*.py"):
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text, path


def test_demo_needs_an_editable_install(tmp_path: Path) -> None:
    """A copy of the package outside a source checkout cannot run the demo: exit 2 + hint,
    nothing written."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    site = tmp_path / "site"
    shutil.copytree(
        REPO / "bootstrap", site / "bootstrap", ignore=shutil.ignore_patterns("__pycache__")
    )
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "from bootstrap.cli import main\n"
        f"sys.exit(main(['--state', {str(tmp_path / 'state')!r}, 'demo']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "editable" in proc.stderr and "pip install -e" in proc.stderr
    assert not (tmp_path / "state" / "demo" / "node.json").exists()


def test_demo_registry_refuses_an_address_in_use(tmp_path: Path) -> None:
    import socket

    from bootstrap.demo.registry import DemoRegistry
    from bootstrap.errors import UsageError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        reg = DemoRegistry(tmp_path / "r", addr, os.getpid())
        with pytest.raises(UsageError, match=f"{addr} is in use"):
            reg.start()
    assert not (tmp_path / "r").exists()
