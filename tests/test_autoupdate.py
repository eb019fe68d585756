"""``bootstrap auto-update`` end to end in a systemd node against the real registry: a moving
tag re-pushed with skopeo, health-checked rollback, policy off, dry run, the tool's own timer
and service units, and a CRI daemon update that restarts its dependants once it answers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.harness.imagebuilder import File, Layer, busybox_spec
from tests.harness.node import VENV, Node
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import _ensure_running
from tests.test_deploy import CONTAINERS, active, link_target, registries_env, running_pid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _health(argv: list[str]) -> Layer:
    manifest = {"health": {"exec": argv, "interval": 0.2, "timeout": 5, "retries": 2}}
    return Layer([File("exports/manifest.json", json.dumps(manifest).encode())])


@pytest.fixture(scope="module")
def layout(_registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with the images the moving tag is pointed at: svc-1 and svc-2 (sleep;
    svc-2 with a health check that passes), broken (exits at once), unhealthy (runs, but its
    health check fails)."""
    from tests.harness.imagebuilder import build_image

    path = tmp_path_factory.mktemp("autoupdate") / "oci"
    build_image(path, "svc-1", busybox_spec(cmd=("sleep", "3600")))
    build_image(path, "svc-2", busybox_spec(cmd=("sleep", "3601"), extra=[_health(["true"])]))
    build_image(path, "broken", busybox_spec(cmd=("false",)))
    build_image(path, "unhealthy", busybox_spec(cmd=("sleep", "3602"), extra=[_health(["false"])]))
    return path


def _cmdline(node: Node, name: str) -> str:
    return node.run("cat", f"/proc/{running_pid(node, name)}/cmdline").stdout


def _by_name(doc: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(o["name"]): o for o in doc}


@pytest.mark.node
def test_auto_update_moving_tag_rollback_policy_off_and_units(
    shared_node: Node, _registry_plain: Registry, layout: Path
) -> None:
    node = shared_node
    reg = _ensure_running(_registry_plain)
    env = registries_env(node, reg)
    live, frozen = f"{reg.host}/au/svc:live", f"{reg.host}/au/frozen:live"
    reg.push(layout, "svc-1", "au/svc:live")
    reg.push(layout, "svc-1", "au/frozen:live")
    node.bootstrap("install", "--auto-update", "registry", "au1", live, env=env, check=True)
    node.bootstrap("install", "au-off", frozen, env=env, check=True)
    # a Docker v2s2 manifest (stored converted to OCI) and a multi-platform index (stored as
    # the host's manifest): the source digest, not the stored one, is what HEAD answers
    from tests.harness.imagebuilder import build_image, build_index

    odd = layout.parent / "odd"
    build_image(odd, "dk", busybox_spec(cmd=("sleep", "3603")), docker=True)
    other = "arm64" if busybox_spec().architecture != "arm64" else "amd64"
    arm = busybox_spec(cmd=("sleep", "3604"), architecture=other)
    build_index(odd, "ix", [busybox_spec(cmd=("sleep", "3604")), arm])
    for tag in ("dk", "ix"):
        reg.push_layout(odd, tag, f"au/{tag}:live")
        ref = f"{reg.host}/au/{tag}:live"
        node.bootstrap(
            "install", "--auto-update", "registry", f"au-{tag}", ref, env=env, check=True
        )
        info = json.loads(node.path(f"{CONTAINERS}/au-{tag}.0/info.json").read_text())
        assert info["source_digest"] != info["digest"], info
    listed = _by_name(node.bootstrap("--json", "list", env=env, check=True).json())
    assert listed["au1"]["auto_update"] == "registry" and listed["au-off"]["auto_update"] == "off"
    assert "registry (install)" in node.bootstrap("status", "au1", env=env, check=True).stdout

    # nothing moved: unchanged, exit 0
    ran = node.bootstrap("--json", "auto-update", env=env)
    assert ran.rc == 0, ran.stderr
    out = _by_name(ran.json()["units"])
    assert out["au1"]["result"] == "unchanged" and out["au1"]["from"] == out["au1"]["to"]
    assert out["au-off"]["result"] == "unchanged" and out["au-off"]["to"] is None
    assert out["au-dk"]["result"] == out["au-ix"]["result"] == "unchanged", out
    assert set(ran.json()["units"][0]) >= {"name", "image", "policy", "from", "to", "result"}

    # the tags move to svc-2; a dry run reports it and changes nothing
    reg.push(layout, "svc-2", "au/svc:live")
    reg.push(layout, "svc-2", "au/frozen:live")
    ran = node.bootstrap("--json", "auto-update", "--dry-run", env=env)
    assert ran.rc == 0, ran.stderr
    out = _by_name(ran.json()["units"])
    assert out["au1"]["result"] == "pending" and out["au1"]["from"] != out["au1"]["to"]
    assert link_target(node, "au1") == "au1.0" and "3600" in _cmdline(node, "au1")

    # the update: au1 runs svc-2 (its health check passed), au-off is never touched
    ran = node.bootstrap("--json", "auto-update", env=env)
    assert ran.rc == 0, ran.stderr
    out = _by_name(ran.json()["units"])
    assert out["au1"]["result"] == "updated", out
    assert out["au-off"]["result"] == "unchanged" and out["au-off"]["policy"] == "off"
    assert link_target(node, "au1") == "au1.1" and "3601" in _cmdline(node, "au1")
    assert "health check passed" in ran.stderr
    assert link_target(node, "au-off") == "au-off.0" and "3600" in _cmdline(node, "au-off")
    info = json.loads(node.path(f"{CONTAINERS}/au1.1/info.json").read_text())
    assert info["source_digest"] == out["au1"]["to"] and info["auto_update"] == "registry"
    ran = node.bootstrap("--json", "auto-update", "au1", env=env)
    assert ran.rc == 0 and ran.json()["units"][0]["result"] == "unchanged", ran.stderr

    # a broken image: rolled back, svc-2 still running, exit 5
    reg.push(layout, "broken", "au/svc:live")
    ran = node.bootstrap("--json", "auto-update", "au1", env=env)
    assert ran.rc == 5, ran.stderr
    assert ran.json()["units"][0]["result"] == "rolled-back"
    assert link_target(node, "au1") == "au1.1" and "3601" in _cmdline(node, "au1")
    assert active(node, "au1.service") == "active"

    # an image whose health check fails: rolled back too, the table says so
    reg.push(layout, "unhealthy", "au/svc:live")
    ran = node.bootstrap("auto-update", "au1", env=env)
    assert ran.rc == 5, ran.stderr
    assert "rolled-back" in ran.stdout and "health check" in ran.stdout
    assert link_target(node, "au1") == "au1.1" and "3601" in _cmdline(node, "au1")
    assert not node.path(f"{CONTAINERS}/au1.new").exists()

    # the tool's units verify clean, and the service tells the story in the journal
    node.run("ln", "-sf", str(VENV / "bin" / "bootstrap"), "/usr/local/bin/bootstrap")
    for unit in ("bootstrap-auto-update.service", "bootstrap-auto-update.timer"):
        node.copy_in(REPO / "units" / unit, f"/etc/systemd/system/{unit}")
    out = node.run(
        "systemd-analyze",
        "verify",
        "/etc/systemd/system/bootstrap-auto-update.service",
        "/etc/systemd/system/bootstrap-auto-update.timer",
        check=False,
    )
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if "cgroup-rw" not in ln]
    assert out.returncode == 0 and not [p for p in problems if p.strip()], problems
    reg.push(layout, "svc-1", "au/svc:live")
    drop_in = "/etc/systemd/system/bootstrap-auto-update.service.d/test.conf"
    node.write_file(
        drop_in, "[Service]\n" + "".join(f"Environment={k}={v}\n" for k, v in env.items())
    )
    node.write_file("/var/lib/bootstrap/.provisioned", "{}")
    try:
        node.run("systemctl", "daemon-reload")
        node.systemctl("start", "bootstrap-auto-update.service")
        journal = node.journal("bootstrap-auto-update.service", 40)
        assert "auto-update: au1: updated" in journal, journal
        assert "auto-update: au-off: unchanged" in journal, journal
        assert "3600" in _cmdline(node, "au1")
        assert node.systemctl("enable", "--now", "bootstrap-auto-update.timer").returncode == 0
        assert active(node, "bootstrap-auto-update.timer") == "active"
        # update --auto-update off only records the policy; the tag moving is then ignored
        ran = node.bootstrap("--json", "update", "--auto-update", "off", "au1", env=env)
        assert ran.rc == 0 and ran.json()["changed"] is True, ran.stderr
        assert ran.json()["deployment"]["auto_update"] == "off"
        reg.push(layout, "svc-2", "au/svc:live")
        ran = node.bootstrap("--json", "auto-update", "au1", env=env)
        assert ran.rc == 0 and ran.json()["units"][0]["result"] == "unchanged", ran.stdout
        assert "3600" in _cmdline(node, "au1")
    finally:
        node.systemctl("disable", "--now", "bootstrap-auto-update.timer")
        for name in ("au1", "au-off", "au-dk", "au-ix"):
            node.bootstrap("uninstall", name, env=env)
        node.run("rm", "-f", "/var/lib/bootstrap/.provisioned", drop_in)


@pytest.fixture(scope="module")
def standin_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kubelet stand-in image (Python 3.11 with grpcio) as tags v1 and v2, differing only
    in the environment variable ``CRI_V``."""
    import shutil
    import subprocess

    from tests.harness.cri import kubelet_standin_image

    standin = kubelet_standin_image()
    layout = tmp_path_factory.mktemp("standin") / "oci"
    shutil.copytree(standin.layout, layout)
    for v in ("1", "2"):
        subprocess.run(
            [
                *("umoci", "config", "--image", f"{layout}:{standin.tag}"),
                *("--tag", f"v{v}", "--config.env", f"CRI_V={v}"),
            ],
            check=True,
            capture_output=True,
        )
    return layout


NOTIFIER = """
import os, socket, time
if os.environ.get("CRI_V") == "1":  # v1 says READY=1, v2 never does
    path = os.environ["NOTIFY_SOCKET"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.connect("\\0" + path[1:] if path.startswith("@") else path)
    s.send(b"READY=1")
time.sleep(3600)
"""


@pytest.mark.node
def test_notify_unit_must_be_ready_within_the_start_period(
    shared_node: Node, _registry_plain: Registry, standin_layout: Path
) -> None:
    """A ``Type=notify`` container with a health check whose start period is 3 s: an image
    that never sends READY=1 is rolled back after about that, not after the unit's start
    timeout."""
    import time

    node = shared_node
    reg = _ensure_running(_registry_plain)
    env = registries_env(node, reg)
    reg.push(standin_layout, "v1", "au/notify:live")
    d = "/etc/bootstrap-test/def-aunotify"
    health = {"exec": ["/usr/bin/python3.11", "-c", "pass"], "start_period": 3}
    node.write_file(f"{d}/manifest.json", json.dumps({"readiness": "notify", "health": health}))
    template = {"process": {"args": ["/usr/bin/python3.11", "-u", "-c", NOTIFIER]}}
    node.write_file(f"{d}/config.json.template", json.dumps(template).replace("$", "$$"))
    ref = f"{reg.host}/au/notify:live"
    try:
        node.bootstrap(
            "install", "--auto-update", "registry", "--definition", d, "aunotify", ref,
            env=env, check=True,
        )  # fmt: skip
        assert active(node, "aunotify.service") == "active"
        reg.push(standin_layout, "v2", "au/notify:live")
        started = time.monotonic()
        ran = node.bootstrap("--json", "auto-update", "aunotify", env=env)
        took = time.monotonic() - started
        assert ran.rc == 5, ran.stderr
        assert ran.json()["units"][0]["result"] == "rolled-back", ran.stdout
        assert "timeout" in ran.json()["units"][0]["message"], ran.stdout
        assert took < 60, f"rolled back after {took:.1f}s"  # the job timeout is 120 s
        assert active(node, "aunotify.service") == "active"
        assert link_target(node, "aunotify") == "aunotify.0"
    finally:
        node.bootstrap("uninstall", "aunotify", env=env)


CRI_SERVER = """
import os, sys, time
sys.path.insert(0, "/usr/local/lib/kubelet-standin")
from concurrent import futures
import grpc
from bootstrap.cri import api_pb2, api_pb2_grpc

class Runtime(api_pb2_grpc.RuntimeServiceServicer):
    def Version(self, request, context):
        return api_pb2.VersionResponse(
            version="0.1.0", runtime_name="standin-cri",
            runtime_version=os.environ.get("CRI_V", "?"), runtime_api_version="v1")

    def Status(self, request, context):
        ready = api_pb2.RuntimeCondition(type="RuntimeReady", status=True)
        return api_pb2.StatusResponse(status=api_pb2.RuntimeStatus(conditions=[ready]))

time.sleep(1)  # like a real daemon, it answers a moment after it started
server = grpc.server(futures.ThreadPoolExecutor(2))
api_pb2_grpc.add_RuntimeServiceServicer_to_server(Runtime(), server)
if os.path.exists("/cri/cri.sock"):
    os.unlink("/cri/cri.sock")
server.add_insecure_port("unix:///cri/cri.sock")
server.start()
server.wait_for_termination()
"""


@pytest.mark.node
def test_cri_daemon_update_restarts_its_dependants_once_it_answers(
    shared_node: Node, _registry_plain: Registry, standin_layout: Path, tmp_path: Path
) -> None:
    """A stand-in CRI daemon (gRPC Version on a unix socket) and a container ordered after it,
    provisioned by ``up`` (which enables the auto-update timer); the daemon's tag moves:
    auto-update updates it, waits until the socket answers again, then restarts the
    dependant."""
    from tests.harness.cri import cri_version
    from tests.harness.imagebuilder import build_image

    node = shared_node
    reg = _ensure_running(_registry_plain)
    env = registries_env(node, reg)
    layout = standin_layout
    reg.push(layout, "v1", "au/cri:live")
    build_image(tmp_path / "kl", "kl", busybox_spec(cmd=("sleep", "3700")))
    reg.push(tmp_path / "kl", "kl", "au/kl:1")
    d = "/etc/bootstrap-test/def-aucri"
    template = {
        "process": {"args": ["/usr/bin/python3.11", "-u", "-c", CRI_SERVER]},
        "mounts": [
            {
                "destination": "/cri",
                "type": "bind",
                "source": "/run/au-cri",
                "options": ["rbind", "rw"],
            }
        ],
    }
    node.write_file(f"{d}/config.json.template", json.dumps(template).replace("$", "$$"))
    node.write_file(f"{d}/tmpfiles.template", "d /run/au-cri 0755 root root -\n")
    for unit in ("bootstrap-auto-update.service", "bootstrap-auto-update.timer"):
        node.copy_in(REPO / "units" / unit, f"/etc/systemd/system/{unit}")
    node.run("systemctl", "daemon-reload")
    manifest = f"""
auto_update: {{timer: true}}
network: {{require_default_route: false, timeout: 5}}
registries: {{insecure: ["{reg.host}"]}}
containers:
  - name: aucri
    image: {reg.host}/au/cri:live
    definition: {d}
    auto_update: registry
    ready: {{cri_socket: /run/au-cri/cri.sock, timeout: 60}}
  - name: aukl
    image: {reg.host}/au/kl:1
    after: [aucri]
"""
    node.write_file("/etc/bootstrap-test/au-node.yaml", manifest)
    try:
        node.bootstrap("up", "/etc/bootstrap-test/au-node.yaml", env=env, check=True)
        assert active(node, "bootstrap-auto-update.timer") == "active"
        enabled = node.systemctl("is-enabled", "bootstrap-auto-update.timer").stdout.strip()
        assert enabled == "enabled"
        assert cri_version(node.path("/run/au-cri/cri.sock"))["runtime_version"] == "1"
        kl_pid = running_pid(node, "aukl")

        reg.push(layout, "v2", "au/cri:live")
        ran = node.bootstrap("--json", "auto-update", env=env)
        assert ran.rc == 0, ran.stderr
        out = _by_name(ran.json()["units"])
        assert out["aucri"]["result"] == "updated", out
        # the dependant moved with it: restarted (its policy is off, its image the same)
        assert out["aukl"]["result"] == "restarted" and out["aukl"]["policy"] == "off"
        assert out["aukl"]["updated"] == "false" and ran.json()["node"]["verdict"] == "healthy"
        assert [o["name"] for o in ran.json()["units"]] == ["aucri", "aukl"]  # dependencies first
        err = ran.stderr
        waited = err.find("aucri: waiting for CRI Status RuntimeReady")
        restarted = err.find("aukl: (re)starting aukl.service")
        assert 0 <= waited < restarted, err
        assert cri_version(node.path("/run/au-cri/cri.sock"))["runtime_version"] == "2"
        assert running_pid(node, "aukl", other_than=kl_pid) != kl_pid
        assert active(node, "aukl.service") == "active"
    finally:
        node.systemctl("disable", "--now", "bootstrap-auto-update.timer")
        for name in ("aukl", "aucri"):
            node.bootstrap("uninstall", name, env=env)
        node.run("rm", "-f", "/var/lib/bootstrap/.provisioned")


def _deployment(state: Path, name: str, image: str, source: str, policy: str) -> None:
    """A deployment record as install writes it (no rootfs: nothing here starts it)."""
    slot = state / "containers" / f"{name}.0"
    slot.mkdir(parents=True)
    info = {
        "name": name,
        "image": image,
        "digest": source,
        "source_digest": source,
        "image_id": "sha256:" + "0" * 64,
        "values": {},
        "set": {},
        "definition": {"source": "builtin", "origin": "builtin", "digest": "sha256:" + "0" * 64},
        "installed": "2026-01-01T00:00:00Z",
        "unit_dir": str(state / "units"),
        "auto_update": policy,
        "auto_update_from": "install",
        "after": [],
    }
    (slot / "info.json").write_text(json.dumps(info))
    (state / "containers" / name).symlink_to(f"{name}.0")


def test_local_policy_dry_run_lock_and_bad_names(_registry_plain: Registry, tmp_path: Path) -> None:
    """On the host, without systemd: ``local`` compares with the store's tag, a dry run reports
    ``pending``, policy off is not looked up, a held container lock makes the run wait and exit
    6, an unknown name is exit 2."""
    from bootstrap.locks import flocked
    from tests.harness.cli import bootstrap
    from tests.harness.crashloop import registries_env as host_env
    from tests.harness.imagebuilder import build_image

    reg = _ensure_running(_registry_plain)
    build_image(tmp_path / "oci", "t", busybox_spec(cmd=("sleep", "1")))
    reg.push(tmp_path / "oci", "t", "au/local:1")
    env = {**host_env(tmp_path, reg.host), "BOOTSTRAP_LOCK_TIMEOUT": "0.5"}
    store, state = tmp_path / "store", tmp_path / "state"
    ref = f"{reg.host}/au/local:1"
    stored = bootstrap("--json", "pull", ref, store=store, env=env, check=True).json()["digest"]
    old = "sha256:" + "1" * 64
    _deployment(state, "loc", ref, old, "local")
    _deployment(state, "gone", f"{reg.host}/au/nothing:1", old, "off")  # never looked up

    ran = bootstrap("--json", "auto-update", "--dry-run", store=store, state=state, env=env)
    assert ran.rc == 0, ran.stderr
    out = _by_name(ran.json()["units"])
    assert out["loc"]["result"] == "pending"
    assert (out["loc"]["from"], out["loc"]["to"]) == (old, stored)
    assert out["gone"]["result"] == "unchanged" and out["gone"]["to"] is None
    assert os.readlink(state / "containers" / "loc") == "loc.0"

    with flocked(state / "locks" / "containers" / "loc.lock"):
        ran = bootstrap("auto-update", "loc", store=store, state=state, env=env)
    assert ran.rc == 6, ran.stderr
    ran = bootstrap("auto-update", "nope", store=store, state=state, env=env)
    assert ran.rc == 2 and "not installed" in ran.stderr
    ran = bootstrap("auto-update", "../x", store=store, state=state, env=env)
    assert ran.rc == 2, ran.stderr


def test_order_dependencies_first_then_by_name(tmp_path: Path) -> None:
    from bootstrap.deploy.autoupdate import order
    from bootstrap.deploy.records import Deployment

    def dep(name: str, *after: str) -> Deployment:
        return Deployment(
            name, tmp_path, "img", "d", "i", {}, {}, "builtin", "builtin", "d", "t", "u",
            after=after,
        )  # fmt: skip

    got = order([dep("kubelet", "ocid"), dep("ocid"), dep("agent", "kubelet"), dep("zz")])
    assert [d.name for d in got] == ["ocid", "kubelet", "agent", "zz"]
    # a dependency not among those looked at is ignored; a cycle falls back to name order
    assert [d.name for d in order([dep("b", "gone"), dep("a")])] == ["a", "b"]
    assert [d.name for d in order([dep("b", "a"), dep("a", "b")])] == ["a", "b"]
