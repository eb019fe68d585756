"""The systemd node fixture itself: it boots, D-Bus works from inside and from the host, a unit
running ``runc`` starts and stops promptly over D-Bus, the host's cgroups are left untouched, and
a node reboots from the same rootfs.

Waiting for systemd jobs (:class:`tests.harness.node.JobWaiter`): connect to ``JobRemoved``,
call ``Subscribe()``, then iterate the default GLib main context (a 100 ms ``GLib.timeout_add``
tick bounds each step) until the job we started is reported; signals that arrive before we know
the job path are kept, so none is missed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.node import REPO, JobWaiter, Node, NodeError, hierarchies, reap_stale_nodes

pytestmark = [pytest.mark.node, pytest.mark.slow]

BUNDLE = "/var/lib/testbundle"
CONTAINER = "testbusybox"
UNIT = f"{CONTAINER}.service"

BUSYBOX_UNIT = f"""\
[Unit]
Description=busybox under runc (harness test)

[Service]
ExecStartPre=-/usr/sbin/runc delete --force {CONTAINER}
ExecStart=/usr/sbin/runc run --bundle {BUNDLE} {CONTAINER}
# busybox sleep as pid 1 ignores SIGTERM: stop it explicitly.
ExecStop=/usr/sbin/runc kill {CONTAINER} KILL
ExecStopPost=-/usr/sbin/runc delete --force {CONTAINER}
SuccessExitStatus=137 143
KillMode=mixed
Delegate=yes
"""


def make_busybox_bundle(node: Node) -> None:
    """A runc bundle at BUNDLE in the node: host busybox-static + ``runc spec``, no terminal,
    ``sleep 3600``, cgroupfs (no cgroupsPath, so runc derives it from its own cgroup)."""
    busybox = shutil.which("busybox")
    assert busybox, "needs busybox-static on the host"
    node.copy_in(Path(busybox), f"{BUNDLE}/rootfs/bin/busybox")
    for applet in ("sh", "sleep"):
        node.path(f"{BUNDLE}/rootfs/bin/{applet}").symlink_to("busybox")
    node.run("runc", "spec", "--bundle", BUNDLE)
    config = json.loads(node.read_file(f"{BUNDLE}/config.json"))
    config["process"]["terminal"] = False
    config["process"]["args"] = ["sleep", "3600"]
    node.write_file(f"{BUNDLE}/config.json", json.dumps(config, indent=2))


def runc_state(node: Node) -> dict[str, str]:
    listed = node.run("runc", "list", "--format", "json").stdout.strip()
    return {c["id"]: c["status"] for c in json.loads(listed or "null") or []}


def test_boots_and_answers_dbus_inside_and_from_host(node: Node) -> None:
    assert node.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
    assert node.run("cat", "/etc/hostname").stdout.strip() == node.name

    inside = node.python(
        "import pydbus\n"
        "units = pydbus.SystemBus().get('.systemd1').ListUnits()\n"
        "print('\\n'.join(u[0] for u in units))\n"
    ).split()
    assert "dbus.service" in inside
    assert "cgroup-rw.service" in inside

    units = node.bus().get(".systemd1").ListUnits()
    by_name = {u[0]: u for u in units}
    assert by_name["dbus.service"][3] == "active"
    assert by_name["cgroup-rw.service"][3] == "active"

    # The project's venv runs inside (bound at the same path).
    assert node.bootstrap("--help").rc == 0


def test_run_joins_a_cgroup_inside_the_node(shared_node: Node) -> None:
    lines = shared_node.run("cat", "/proc/self/cgroup").stdout.splitlines()
    assert lines and all(line.endswith(":/harness") for line in lines), lines


def test_run_env_input_check_timeout(shared_node: Node) -> None:
    n = shared_node
    assert n.run("sh", "-c", "echo $FOO", env={"FOO": "bar"}).stdout == "bar\n"
    assert n.run("cat", input=b"from stdin").stdout == "from stdin"
    assert n.run("sh", "-c", "exit 3", check=False).returncode == 3
    with pytest.raises(subprocess.CalledProcessError, match="exited 3"):
        n.run("sh", "-c", "echo oops >&2; exit 3")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        n.run("sh", "-c", "echo $$ > /run/slow.pid; exec sleep 60", timeout=1)
    assert time.monotonic() - started < 10
    slow = n.read_file("/run/slow.pid").strip()
    status = n.run("sh", "-c", f"grep State: /proc/{slow}/status || echo gone").stdout
    assert "gone" in status or "zombie" in status, f"timed-out command survived: {status}"
    # A process left running with our pipes open does not make run() wait for it.
    started = time.monotonic()
    n.run("sh", "-c", "sleep 30 & echo started")
    assert time.monotonic() - started < 10


def test_runc_unit_starts_and_stops_over_dbus(node: Node) -> None:
    make_busybox_bundle(node)
    node.write_file(f"/etc/systemd/system/{UNIT}", BUSYBOX_UNIT)

    systemd = node.bus().get(".systemd1")
    jobs = JobWaiter(systemd)
    systemd.Reload()

    started = time.monotonic()
    assert jobs.wait(systemd.StartUnit(UNIT, "replace")) == "done", node.journal(UNIT)
    deadline = time.monotonic() + 10
    while runc_state(node).get(CONTAINER) != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runc_state(node).get(CONTAINER) == "running", node.journal(UNIT)
    start_seconds = time.monotonic() - started

    # The container's cgroups are inside the node's own tree in every hierarchy (a path outside
    # the node's cgroup namespace would show as "/.."), below the unit's in the systemd one.
    pid = json.loads(node.run("runc", "state", CONTAINER).stdout)["pid"]
    lines = node.run("cat", f"/proc/{pid}/cgroup").stdout.splitlines()
    assert lines and not any(":/.." in line for line in lines), lines
    assert any(":name=systemd:" in line and f"/system.slice/{UNIT}" in line for line in lines), (
        lines
    )

    stopped = time.monotonic()
    assert jobs.wait(systemd.StopUnit(UNIT, "replace")) == "done", node.journal(UNIT)
    stop_seconds = time.monotonic() - stopped
    assert CONTAINER not in runc_state(node)
    unit = node.bus().get(".systemd1", systemd.LoadUnit(UNIT))
    assert unit.ActiveState == "inactive", node.journal(UNIT)
    # a stop that waited out DefaultTimeoutStopSec (15 s in the node) leaves Result=timeout
    result = node.run("systemctl", "show", "-p", "Result", "--value", UNIT).stdout.strip()
    assert result == "success", node.journal(UNIT)
    assert "busybox under runc" in node.journal(UNIT)
    print(f"runc unit: start {start_seconds:.2f}s, stop {stop_seconds:.2f}s")


def test_host_pid1_cgroup_unchanged_and_nothing_left(node_rootfs: Path) -> None:
    before = Path("/proc/1/cgroup").read_text()
    ours = Path("/proc/self/cgroup").read_text()
    n = Node.start()
    try:
        name, workdir, cgroups = n.name, n.workdir, list(n._cgroups)
        assert all(d.is_dir() for d in cgroups)
        assert Path("/proc/1/cgroup").read_text() == before
    finally:
        n.close()
    assert Path("/proc/1/cgroup").read_text() == before
    assert Path("/proc/self/cgroup").read_text() == ours
    assert not any(d.exists() for d in cgroups), f"cgroups of {name} left behind"
    assert not workdir.exists()


def test_reboot_same_rootfs(node: Node) -> None:
    first_pid = node.pid
    machine_id = node.read_file("/etc/machine-id")
    node.write_file("/var/lib/survives-reboot", "yes\n")
    node.write_file("/run/gone-after-reboot", "yes\n")

    node.poweroff()
    assert not node.running
    node.boot()

    assert node.pid != first_pid
    assert node.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
    assert node.read_file("/etc/machine-id") == machine_id
    assert node.read_file("/var/lib/survives-reboot") == "yes\n"
    assert not node.path("/run/gone-after-reboot").exists()
    assert node.bus().get(".systemd1").ListUnits()
    print(f"boots: {[round(s, 2) for s in node.boot_seconds]} s")


def test_nodes_of_a_killed_test_process_are_reaped(node_rootfs: Path) -> None:
    code = (
        "import os, sys, time\n"
        "from tests.harness.node import Node\n"
        "n = Node.start()\n"
        "print(n.name, n.workdir, flush=True)\n"
        "time.sleep(600)\n"
    )
    orphan = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert orphan.stdout is not None
        name, workdir = orphan.stdout.readline().split()
    finally:
        orphan.kill()  # SIGKILL: no teardown runs
        orphan.wait()
    left = [h.dir(h.own) / name for h in hierarchies()]
    assert all(d.is_dir() for d in left) and Path(workdir).is_dir()

    assert name in reap_stale_nodes()
    assert not any(d.exists() for d in left)
    assert not Path(workdir).exists()


def test_boot_timeout_reports_state_and_cleans_up(node_rootfs: Path) -> None:
    n = Node(boot_timeout=3)
    try:
        n.extract(node_rootfs)
        # A start job that never finishes keeps the system "starting".
        n.write_file(
            "/etc/systemd/system/hang.service",
            "[Service]\nType=oneshot\nExecStart=/bin/sleep 600\n",
        )
        n.path("/etc/systemd/system/multi-user.target.wants/hang.service").symlink_to(
            "/etc/systemd/system/hang.service"
        )
        with pytest.raises(NodeError, match="did not come up within 3") as err:
            n.boot()
        assert "'starting'" in str(err.value)
        assert "console:" in str(err.value)
        assert "hang.service" in str(err.value)  # the job that holds the boot
    finally:
        n.close()
    assert not n.workdir.exists()
    assert not any(d.exists() for d in n._cgroups)


def test_make_node_with_extra_binds(make_node: Callable[..., Node], tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("from the host\n")
    n = make_node(binds=[(tmp_path, "/mnt/rw")], ro_binds=[tmp_path])
    assert n.run("cat", "/mnt/rw/hello").stdout == "from the host\n"
    n.run("sh", "-c", "echo back > /mnt/rw/answer")
    assert (tmp_path / "answer").read_text() == "back\n"
    assert n.run("touch", f"{tmp_path}/nope", check=False).returncode != 0  # read-only
