"""Prompt stops, reaped zombies and bounded starts, in the test systemd node.

A busybox ``sleep`` as the container's pid 1 ignores SIGTERM (no handler; the kernel drops the
signal for a namespace's pid 1): with the default ``init: auto`` it runs behind catatonit and a
restart takes well under a second; with ``init: never`` the stop waits ``stopTimeout``. A
process that ignores SIGTERM itself is still bounded by ``stopTimeout``. A ``Type=notify``
container that never sends READY=1 fails after ``startTimeout``; an update to one rolls back.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.harness.imagebuilder import busybox_spec
from tests.harness.node import Node
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import _ensure_running
from tests.test_deploy import running_pid

pytestmark = [pytest.mark.slow, pytest.mark.node]

CONTAINERS = "/var/lib/bootstrap/containers"
REGISTRIES_CONF = "/etc/bootstrap-test/registries.conf"
DEFS = "/etc/bootstrap-test/init-defs"

#: Orphans a child (the subshell exits, its ``sleep 0.2`` goes to pid 1), then execs ``sleep``:
#: without an init nothing reaps the orphan once it exits.
ZOMBIE_SH = "(sleep 0.2 &); exec sleep 3600"
#: Ignores SIGTERM itself, so even behind the init only ``stopTimeout``'s KILL stops it.
STUBBORN_SH = "trap '' TERM; while :; do sleep 1; done"
NOTIFY_PY = (
    "import os, socket, time\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.connect(os.environ['NOTIFY_SOCKET'])\n"
    "s.send(b'READY=1')\n"
    "time.sleep(3600)\n"
)


@pytest.fixture(scope="module")
def images(_registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tests.harness.imagebuilder import build_image

    reg = _ensure_running(_registry_plain)
    layout = tmp_path_factory.mktemp("init-images") / "oci"
    specs = {
        "sleeper:1": busybox_spec(cmd=("sleep", "3600")),
        "zombies:1": busybox_spec(cmd=("sh", "-c", ZOMBIE_SH)),
        "stubborn:1": busybox_spec(cmd=("sh", "-c", STUBBORN_SH)),
    }
    refs = {}
    for name, spec in specs.items():
        tag = name.replace(":", "-")
        build_image(layout, tag, spec)
        reg.push(layout, tag, f"init/{name}")
        refs[name] = f"{reg.host}/init/{name}"
    return refs


@pytest.fixture
def env(shared_node: Node, registry: Registry) -> dict[str, str]:
    shared_node.write_file(
        REGISTRIES_CONF, f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    return {"REGISTRIES_CONFIG_PATH": REGISTRIES_CONF, "BOOTSTRAP_SETTLE_SECONDS": "1"}


def definition(node: Node, name: str, manifest: dict[str, object], config: object = None) -> str:
    d = f"{DEFS}/{name}"
    node.write_file(f"{d}/manifest.json", json.dumps(manifest))
    if config is not None:
        node.write_file(f"{d}/config.json.template", json.dumps(config))
    return d


def timed(node: Node, *systemctl: str) -> float:
    """Seconds ``systemctl ARGS`` takes, measured inside the node (no harness overhead)."""
    out = node.run(
        "sh", "-c", 'a=$(date +%s%N); systemctl "$@"; b=$(date +%s%N); echo $((b - a))',
        "sh", *systemctl,
    ).stdout  # fmt: skip
    return int(out.strip().splitlines()[-1]) / 1e9


def entrypoint_started(node: Node, name: str, timeout: float = 10) -> None:
    """Wait until container ``name``'s init (its pid 1) has started the entrypoint: the init
    blocks every signal before it forks, so from then on a SIGTERM reaches the entrypoint.
    (A ``Type=simple`` unit is active as soon as ``runc run`` forks; a stop in the first
    instants after a start can find a pid 1 that drops the SIGTERM and waits the grace.)"""
    pid = running_pid(node, name, timeout=timeout)
    deadline = time.monotonic() + timeout
    children = f"/proc/{pid}/task/{pid}/children"
    while not node.run("cat", children, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"{name}: its init started no entrypoint"
        time.sleep(0.05)


def restart_times(node: Node, unit: str, n: int = 3, *, init: bool = False) -> list[float]:
    """Seconds each of ``n`` restarts of ``unit`` takes; with ``init``, each restart stops a
    container whose init has started the entrypoint (:func:`entrypoint_started`)."""
    times = []
    for _ in range(n):
        if init:
            entrypoint_started(node, unit.removesuffix(".service"))
        times.append(timed(node, "restart", unit))
        assert node.systemctl("is-active", unit).stdout.strip() == "active"
    return times


def config_args(node: Node, name: str) -> list[str]:
    doc = json.loads(node.path(f"{CONTAINERS}/{name}/config.json").read_text())
    return list(doc["process"]["args"])


def uninstall(node: Node, name: str, env: dict[str, str]) -> None:
    ran = node.bootstrap("uninstall", name, env=env)
    assert ran.rc == 0, ran.stderr


def test_sigterm_ignoring_pid1_restarts_fast_with_init_and_slow_without(
    shared_node: Node, images: dict[str, str], env: dict[str, str]
) -> None:
    node = shared_node
    d = definition(node, "sleeper", {"stopTimeout": 2})
    ran = node.bootstrap("install", "fast", images["sleeper:1"], "--definition", d, env=env)
    assert ran.rc == 0, ran.stderr
    assert config_args(node, "fast")[:2] == ["/run/.bootstrap-init", "--"]
    fast = restart_times(node, "fast.service", init=True)
    entrypoint_started(node, "fast")
    stop = timed(node, "stop", "fast.service")
    assert node.systemctl("is-active", "fast.service").stdout.strip() == "inactive"
    assert node.systemctl("show", "-p", "Result", "fast.service").stdout.strip() == "Result=success"
    # the bound the issue asks for; the best of three so one scheduling hiccup cannot fail it
    assert min(fast) < 1.0 and stop < 1.0, f"restarts {fast}, stop {stop}"

    ran = node.bootstrap(
        "install", "slow", images["sleeper:1"], "--definition", d, "--init", "never", env=env
    )
    assert ran.rc == 0, ran.stderr
    assert config_args(node, "slow") == ["sleep", "3600"]
    slow = restart_times(node, "slow.service", n=1)
    assert slow[0] >= 2.0, f"without an init the stop waits stopTimeout: {slow}"
    print(f"\nrestart with init: {fast} s; without: {slow} s; stop with init: {stop:.3f} s")
    for name in ("fast", "slow"):
        uninstall(node, name, env)


def test_stop_timeout_still_bounds_a_process_ignoring_sigterm(
    shared_node: Node, images: dict[str, str], env: dict[str, str]
) -> None:
    node = shared_node
    d = definition(node, "stubborn", {"stopTimeout": 2})
    ran = node.bootstrap("install", "stubborn", images["stubborn:1"], "--definition", d, env=env)
    assert ran.rc == 0, ran.stderr
    assert config_args(node, "stubborn")[0] == "/run/.bootstrap-init"
    took = timed(node, "stop", "stubborn.service")
    assert 2.0 <= took < 2.0 + 30, took  # stopTimeout, well before TimeoutStopSec
    assert node.systemctl("is-active", "stubborn.service").stdout.strip() == "inactive"
    uninstall(node, "stubborn", env)


def zombies_of(node: Node, name: str) -> list[str]:
    state = json.loads(node.run("runc", "state", name).stdout)
    pid = str(state["pid"])
    out = node.run("ps", "-e", "-o", "stat=,ppid=,pid=,comm=").stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    pids = {pid} | {r[2] for r in rows if r[1] == pid}  # pid 1 and its children
    return [" ".join(r) for r in rows if r[0].startswith("Z") and r[1] in pids]


def test_zombies_left_by_the_entrypoint_are_reaped(
    shared_node: Node, images: dict[str, str], env: dict[str, str]
) -> None:
    node = shared_node
    ran = node.bootstrap("install", "reaped", images["zombies:1"], env=env)
    assert ran.rc == 0, ran.stderr
    ran = node.bootstrap("install", "unreaped", images["zombies:1"], "--init", "never", env=env)
    assert ran.rc == 0, ran.stderr
    deadline = time.monotonic() + 30
    while not zombies_of(node, "unreaped"):  # the control case's orphan has exited
        assert time.monotonic() < deadline, "the control case leaves a zombie without an init"
        time.sleep(0.1)
    assert zombies_of(node, "reaped") == []  # installed first: its orphan exited before
    for name in ("reaped", "unreaped"):
        uninstall(node, name, env)


def notify_config(args: list[str]) -> dict[str, object]:
    ro = ["rbind", "ro"]
    return {
        "process": {"args": args},
        "mounts": [
            {"destination": p, "type": "bind", "source": p, "options": ro}
            for p in ("/usr", "/lib", "/lib64")
        ],
    }


def test_never_ready_notify_unit_fails_in_start_timeout_and_update_rolls_back(
    shared_node: Node, images: dict[str, str], env: dict[str, str]
) -> None:
    node = shared_node
    never = definition(node, "never", {"readiness": "notify", "startTimeout": 3})
    started = time.monotonic()
    ran = node.bootstrap("install", "mute", images["sleeper:1"], "--definition", never, env=env)
    took = time.monotonic() - started
    assert ran.rc == 5, ran.stderr
    assert "mute.service" in ran.stderr and "timeout" in ran.stderr, ran.stderr
    assert "raise startTimeout" in ran.stderr, ran.stderr
    assert 3.0 <= took < 3.0 + 30, took
    assert not node.path(f"{CONTAINERS}/mute").exists()
    assert node.systemctl("is-enabled", "mute.service").stdout.strip() in ("", "not-found")

    ready = definition(
        node,
        "ready",
        {"readiness": "notify", "startTimeout": 3},
        notify_config(["/usr/bin/python3", "-c", NOTIFY_PY]),
    )
    ran = node.bootstrap("install", "talker", images["sleeper:1"], "--definition", ready, env=env)
    assert ran.rc == 0, ran.stderr
    ran = node.bootstrap("update", "talker", "--definition", never, "--no-pull", env=env)
    assert ran.rc == 5, ran.stderr
    assert "rolled back" in ran.stderr and "timeout" in ran.stderr, ran.stderr
    assert node.systemctl("is-active", "talker.service").stdout.strip() == "active"
    assert json.loads(node.path(f"{CONTAINERS}/talker/info.json").read_text())["set"] == {}
    assert os.readlink(node.path(f"{CONTAINERS}/talker")) == "talker.0"
    uninstall(node, "talker", env)
