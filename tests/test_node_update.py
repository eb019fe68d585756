"""Node updates in a real systemd node: the repair after an interrupted update restarts what
runs the wrong deployment, and the node transaction (``update --node``, ``auto-update``) moves
the CRI daemon and the kubelet together, judged by the node's health, rolled back together.

Which deployment a container runs is read from the kernel, not from bootstrap's records: the
root of its pid 1 (``/proc/PID/root``) is the same file system object as the ``rootfs`` of
exactly one slot (the overlay mounted for it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.harness.imagebuilder import busybox_spec
from tests.harness.node import VENV, Node
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import _ensure_running
from tests.test_deploy import CONTAINERS, active, link_target, registries_env, running_pid

pytestmark = [pytest.mark.slow, pytest.mark.node]

RUNNING_SLOT = """
import json, os, subprocess
name, root = {name!r}, {root!r}
out = subprocess.run(["runc", "state", name], capture_output=True, text=True)
doc = json.loads(out.stdout) if out.returncode == 0 else {{}}
slot = None
if doc.get("status") == "running":
    seen = os.stat(f"/proc/{{doc['pid']}}/root")
    for s in (name + ".0", name + ".1", name + ".new"):
        try:
            st = os.stat(os.path.join(root, s, "rootfs"))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (seen.st_dev, seen.st_ino):
            slot = s
link = os.readlink(os.path.join(root, name))
print(json.dumps({{"slot": slot, "pid": doc.get("pid"), "link": link}}))
"""


def running_slot(node: Node, name: str) -> dict[str, object]:
    """``{"slot": the slot whose rootfs is the root of the container's pid 1 (None when not
    running or none is), "pid": ..., "link": what the NAME symlink points to}``."""
    return json.loads(node.python(RUNNING_SLOT.format(name=name, root=CONTAINERS)))


def assert_runs_its_link(node: Node, name: str) -> None:
    seen = running_slot(node, name)
    assert seen["slot"] == seen["link"], f"{name}: runs {seen['slot']}, link says {seen['link']}"


def start_in_node(node: Node, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        node.nsenter_argv([str(VENV / "bin/bootstrap"), *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=node.exec_env(env),
    )


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> bool:
    """SIGKILL ``proc`` and everything it started as soon as ``ready()``; False when it ended
    (or ``timeout`` passed) first."""
    from bootstrap.demo.machine import descendants

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if ready():
                for pid in [*reversed(descendants(proc.pid)), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.communicate(timeout=30)
                return True
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)
    return False


@pytest.fixture(scope="module")
def apps(_registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.harness.imagebuilder import build_image

    reg = _ensure_running(_registry_plain)
    layout = tmp_path_factory.mktemp("node-update-apps") / "oci"
    refs = {}
    for tag, secs in (("1", "3600"), ("2", "3601")):
        build_image(layout, tag, busybox_spec(cmd=("sleep", secs)))
        reg.push(layout, tag, f"nodeupdate/app:{tag}")
        refs[tag] = f"{reg.host}/nodeupdate/app:{tag}"
    return refs


def test_the_repair_after_an_interrupted_update_restarts_the_unit(
    shared_node: Node, _registry_plain: Registry, apps: dict[str, str]
) -> None:
    """An update killed while the unit runs the staged deployment (the symlink on NAME.new,
    not yet renamed into a slot): the next command points the symlink back at the slot it
    came from, and restarts the unit so that the running container is that slot's, before it
    removes NAME.new."""
    node = shared_node
    env = {
        **registries_env(node, _ensure_running(_registry_plain)),
        "BOOTSTRAP_SETTLE_SECONDS": "5",
    }
    node.bootstrap("install", "rep", apps["1"], env=env, check=True)
    node.bootstrap("pull", apps["2"], env=env, check=True)
    try:
        assert running_slot(node, "rep")["slot"] == "rep.0"
        proc = start_in_node(node, ["update", "rep", apps["2"]], env)
        # killed while it settles: the container runs rep.new, which the link points to
        killed = kill_when(proc, lambda: running_slot(node, "rep")["slot"] == "rep.new", 60)
        assert killed, "the update ended before it ran the staged deployment"
        seen = running_slot(node, "rep")
        assert seen == {**seen, "slot": "rep.new", "link": "rep.new"}, seen

        ran = node.bootstrap("update", "rep", apps["1"], "--no-pull", env=env)
        assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
        assert "an update was interrupted" in ran.stderr
        assert "does not run rep.0, which rep points to; restarting it" in ran.stderr
        after = running_slot(node, "rep")
        assert after["slot"] == after["link"] == "rep.0", after
        assert after["pid"] != seen["pid"]
        assert not node.path(f"{CONTAINERS}/rep.new").exists()
        assert active(node, "rep.service") == "active"
        # nothing to repair: nothing is restarted
        pid = running_pid(node, "rep")
        ran = node.bootstrap("update", "rep", apps["1"], "--no-pull", env=env)
        assert ran.rc == 0 and "restarting" not in ran.stderr, ran.stderr
        assert running_pid(node, "rep") == pid
        assert link_target(node, "rep") == "rep.0"
    finally:
        node.bootstrap("uninstall", "rep", env=env)
