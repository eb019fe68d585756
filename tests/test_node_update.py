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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness.imagebuilder import busybox_spec
from tests.harness.node import VENV, Node
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import _ensure_running
from tests.test_deploy import CONTAINERS, active, link_target, registries_env, running_pid

REPO = Path(__file__).resolve().parents[1]

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


# ---- the node transaction: the CRI daemon and the kubelet stand-in in a node of its own network --

STATE = "/var/lib/bootstrap"
JOURNAL = f"{STATE}/node/transaction.json"
MANIFEST = "/etc/bootstrap/node.yaml"
KUBELET_DEF = "/etc/bootstrap-test/kubelet-def"
HOST_CONFIG = "/etc/containerd/config.toml"
MISSING_POD = "/etc/kubernetes/manifests/zz-missing.json"
NODE_ENV = {"BOOTSTRAP_SETTLE_SECONDS": "1"}
VERSIONS = 14  # ocid:v1.. and kubelet:v1.. (labels only), plus ocid:bad and kubelet:bad


@dataclass
class PodNode:
    node: Node
    reg: Registry
    layout: dict[str, Path]
    digests: dict[str, str] = field(default_factory=dict)  # "ocid:v2" -> pushed digest

    def move(self, ocid: str, kubelet: str) -> None:
        """Point the node's moving tags at these variants."""
        for name, tag in (("ocid", ocid), ("kubelet", kubelet)):
            path = f"bootstrap/{name}:live"
            self.digests[f"{name}:{tag}"] = _push(self.reg, self.layout[name], tag, path)

    def bootstrap(self, *args: str, timeout: float = 600) -> Any:
        return self.node.bootstrap(*args, env=NODE_ENV, timeout=timeout)


def _push(reg: Registry, layout: Path, tag: str, path: str) -> str:
    reg.push(layout, tag, path)
    index = json.loads((layout / "index.json").read_text())
    return next(
        str(m["digest"])
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )


def _pod_manifest(reg: Registry, images: dict[str, str]) -> str:
    from tests.harness import cri
    from tests.test_pods import CONFLIST

    ocid = cri.ocid_entry(
        f"{reg.host}/bootstrap/ocid:live", after="[cni]", auto_update="registry", ready_timeout=30
    )
    return f"""\
{cri.manifest_head(reg.host)}\
  - name: cni
    image: {images["cni"]}
{ocid}\
  - name: kubelet
    image: {reg.host}/bootstrap/kubelet:live
    definition: {KUBELET_DEF}
    auto_update: registry
    set:
      CRI_SOCKET: {cri.CRI_SOCKET}
    after: [ocid]
pods:
  network:
{CONFLIST}  images: [registry.k8s.io/pause:3.9, "{images["busybox"]}"]
"""


@contextlib.contextmanager
def provisioned_pod_node(reg: Registry, work: Path) -> Iterator[PodNode]:
    """A node of its own network provisioned by ``up`` with the CNI plugins, the containerd CRI
    daemon (``ocid``) and the kubelet stand-in, both from moving tags (``bootstrap/ocid:live``,
    ``bootstrap/kubelet:live``) with auto-update policy registry, at ``v1``. Variants pushed
    to the layouts in ``work``: ``v1``.. (a label apart), ``ocid:bad`` (its /exports/hostfs
    containerd config points the CNI conf_dir at an empty directory: the daemon starts,
    NetworkReady stays false), ``kubelet:bad`` (its /exports/hostfs adds a static pod whose
    image the runtime does not hold: the stand-in's pod probe, so its /healthz, never passes).
    The kubelet's definition is images/kubelet/ with a 20 s health start period instead of
    60 s. Powered off and removed at the end."""
    from tests.harness import cri
    from tests.test_pods import static_pod

    layout = {"ocid": work / "ocid", "kubelet": work / "kubelet"}
    daemon, standin = cri.cri_daemon_image(), cri.kubelet_standin_image()
    for v in range(1, VERSIONS + 1):
        cri.image_variant(daemon, layout["ocid"], f"v{v}", label=f"ocid-{v}")
        cri.image_variant(standin, layout["kubelet"], f"v{v}", label=f"kubelet-{v}")
    bad_config = cri.CONTAINERD_CONFIG.replace(
        'conf_dir = "/etc/cni/net.d"', 'conf_dir = "/run/ocid-no-cni"'
    )
    assert bad_config != cri.CONTAINERD_CONFIG
    cri.image_variant(
        daemon, layout["ocid"], "bad", label="ocid-bad",
        files={f"exports/hostfs/{HOST_CONFIG[1:]}": bad_config.encode()},
    )  # fmt: skip
    missing = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "missing", "namespace": "probe", "uid": "5f0c1d2e-missing"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/nothing:1"}]},
    }
    cri.image_variant(
        standin, layout["kubelet"], "bad", label="kubelet-bad",
        files={f"exports/hostfs/{MISSING_POD[1:]}": json.dumps(missing).encode()},
    )  # fmt: skip
    images = {}
    for kind, image, path in (
        ("cni", cri.cni_plugins_image(), "bootstrap/cni:plugins"),
        ("pause", cri.pause_image(), "pause:3.9"),
        ("busybox", cri.pod_image(), "bootstrap/busybox:httpd"),
    ):
        reg.push(image.layout, image.tag, path)
        images[kind] = f"{reg.host}/{path}"
    node = Node.start(private_network=True, forward=(reg.port,))
    try:
        pods = PodNode(node, reg, layout)
        pods.move("v1", "v1")
        node.run("ln", "-sf", str(VENV / "bin" / "bootstrap"), "/usr/local/bin/bootstrap")
        definition = json.loads((REPO / "images/kubelet/manifest.json").read_text())
        definition["health"]["start_period"] = "20s"
        node.write_file(f"{KUBELET_DEF}/manifest.json", json.dumps(definition))
        for f in ("config.json.template", "service.template", "tmpfiles.template"):
            node.write_file(f"{KUBELET_DEF}/{f}", (REPO / "images/kubelet" / f).read_text())
        node.write_file(MANIFEST, _pod_manifest(reg, images))
        node.write_file("/etc/kubernetes/manifests/web.json", static_pod(images["busybox"]))
        up = node.bootstrap("up", MANIFEST, env=NODE_ENV, timeout=600)
        assert up.rc == 0, up.stderr
        yield pods
    finally:
        node.close()


@pytest.fixture(scope="module")
def pod_node(
    _registry_plain: Registry, node_rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodNode]:
    """:func:`provisioned_pod_node`, one for the module."""
    with provisioned_pod_node(
        _ensure_running(_registry_plain), tmp_path_factory.mktemp("pod-node")
    ) as pods:
        yield pods


def _links(node: Node) -> dict[str, str]:
    return {n: link_target(node, n) for n in ("ocid", "kubelet")}


def _digests(node: Node) -> dict[str, str]:
    out = {}
    for n in ("ocid", "kubelet"):
        info = json.loads(node.path(f"{CONTAINERS}/{n}/info.json").read_text())
        out[n] = info["source_digest"]
    return out


def assert_consistent(node: Node) -> None:
    """No journal, no staged deployment; both units active and running what their links
    name; the host's containerd config is that of the ocid slot the link names."""
    assert not node.path(JOURNAL).exists(), node.read_file(JOURNAL)
    for name in ("ocid", "kubelet"):
        assert not node.path(f"{CONTAINERS}/{name}.new").exists(), name
        assert active(node, f"{name}.service") == "active", node.journal(f"{name}.service", 30)
        assert_runs_its_link(node, name)
    shipped = node.path(f"{CONTAINERS}/ocid/lower/exports/hostfs/{HOST_CONFIG[1:]}")
    if not shipped.exists():
        shipped = node.path(f"{CONTAINERS}/ocid/rootfs/exports/hostfs/{HOST_CONFIG[1:]}")
    assert node.read_file(HOST_CONFIG) == shipped.read_text()


def _probe_ok_after(node: Node, after: float) -> None:
    from tests.test_pods import _probe

    status = _probe(node, after)
    assert status["state"] == "ok", json.dumps(status, indent=1)


def _network_ready(node: Node) -> bool:
    from bootstrap.cri.client import CriClient
    from tests.harness import cri

    with CriClient(node.path(cri.CRI_SOCKET)) as client:
        return client.status().network_ready


def _units(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {u["container"]: u for u in doc["units"]}


def test_a_good_node_update_moves_both_and_the_pod_probe_passes(pod_node: PodNode) -> None:
    node = pod_node.node
    before = _links(node)
    pod_node.move("v2", "v2")
    dry = pod_node.bootstrap("--json", "update", "--node", "--dry-run")
    assert dry.rc == 0, dry.stderr
    units = _units(dry.json())
    assert units["ocid"]["updated"] == units["kubelet"]["updated"] == "pending", units
    assert units["cni"]["updated"] == "false" and dry.json()["node"]["verdict"] == "pending"
    assert _links(node) == before

    t0 = time.time()
    ran = pod_node.bootstrap("--json", "update", "--node")
    assert ran.rc == 0, ran.stderr
    doc = ran.json()
    units = _units(doc)
    assert units["ocid"]["updated"] == units["kubelet"]["updated"] == "true", units
    assert units["cni"]["updated"] == "false"
    assert doc["node"]["verdict"] == "healthy", doc["node"]
    checks = " ".join(doc["node"]["checks"])
    assert "CRI RuntimeReady and NetworkReady" in checks, checks
    assert "healthy (GET http://127.0.0.1:10248/healthz)" in checks, checks
    assert {"lookup", "stage", "start", "judge", "commit"} <= set(doc["phases"])  # pulled in lookup
    print("good node update, phases:", doc["phases"], "elapsed", doc["elapsed"])
    after = _links(node)
    assert after["ocid"] != before["ocid"] and after["kubelet"] != before["kubelet"]
    assert _digests(node) == {n: pod_node.digests[f"{n}:v2"] for n in ("ocid", "kubelet")}
    assert_consistent(node)
    _probe_ok_after(node, t0)  # the stand-in's pod probe passes on the new pair
    # the order: the daemon was judged ready before the kubelet started on it
    err = ran.stderr
    assert 0 <= err.find("ocid: waiting for CRI Status") < err.find("kubelet: (re)starting")

    again = pod_node.bootstrap("update", "--node")
    assert again.rc == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0].split() == ["UNIT", "CONTAINER", "IMAGE", "POLICY", "UPDATED"]
    assert "node: unchanged (nothing to update)" in lines
    assert _links(node) == after


def test_a_cri_daemon_without_network_rolls_back_both(pod_node: PodNode) -> None:
    """The new daemon starts and answers, but NetworkReady stays false (its shipped config
    points the CNI conf_dir at an empty directory): both roll back, the old daemon's config is
    back on the host, the old kubelet runs against the old daemon and its probe passes."""
    node = pod_node.node
    pod_node.move("v2", "v2")
    assert pod_node.bootstrap("update", "--node").rc == 0
    before, digests = _links(node), _digests(node)
    pod_node.move("bad", "v3")
    t0 = time.time()
    ran = pod_node.bootstrap("--json", "update", "--node")
    assert ran.rc == 5, ran.stderr
    doc = ran.json()
    node_says = doc["node"]
    assert node_says["verdict"] == "rolled-back" and node_says["failed_member"] == "ocid"
    assert "NetworkReady false" in node_says["failure"], node_says
    units = _units(doc)
    assert units["ocid"]["updated"] == units["kubelet"]["updated"] == "rolled back", units
    assert "rollback" in doc["phases"]
    print("rolled back (daemon without network), phases:", doc["phases"])
    assert _links(node) == before and _digests(node) == digests
    assert_consistent(node)
    assert "/run/ocid-no-cni" not in node.read_file(HOST_CONFIG)
    assert _network_ready(node)
    _probe_ok_after(node, t0)
    # the bad daemon's digest is remembered (ocid is to blame), not the kubelet's
    remembered = json.loads(node.read_file(f"{STATE}/node/failed.json"))["containers"]
    assert set(remembered) == {"ocid"}
    assert remembered["ocid"]["digest"] == pod_node.digests["ocid:bad"]


def test_an_unhealthy_kubelet_rolls_back_both_and_auto_update_skips_it_after(
    pod_node: PodNode,
) -> None:
    """auto-update: a new daemon (good) and a kubelet whose /healthz never answers ok: both
    roll back (its static pod file is gone from the host again). The kubelet's digest is
    remembered: the next runs skip it and take the daemon alone (the kubelet restarted after
    it), until the kubelet's tag moves to a good one."""
    node = pod_node.node
    pod_node.move("v3", "v3")
    assert pod_node.bootstrap("update", "--node").rc == 0
    before, digests = _links(node), _digests(node)
    pod_node.move("v4", "bad")
    t0 = time.time()
    ran = pod_node.bootstrap("--json", "auto-update")
    assert ran.rc == 5, ran.stderr
    doc = ran.json()
    assert doc["node"]["verdict"] == "rolled-back" and doc["node"]["failed_member"] == "kubelet"
    assert "health check 'GET http://127.0.0.1:10248/healthz' failed" in doc["node"]["failure"]
    units = _units(doc)
    assert units["ocid"]["updated"] == units["kubelet"]["updated"] == "rolled back", units
    print("rolled back (unhealthy kubelet), phases:", doc["phases"])
    assert _links(node) == before and _digests(node) == digests
    assert not node.path(MISSING_POD).exists()
    assert_consistent(node)
    _probe_ok_after(node, t0)

    dry = pod_node.bootstrap("--json", "auto-update", "--dry-run")
    assert dry.rc == 0, dry.stderr
    units = _units(dry.json())
    assert units["kubelet"]["updated"] == "skipped", units
    assert "auto-update leaves it until the tag moves" in units["kubelet"]["message"]
    assert units["ocid"]["updated"] == "pending"
    status = pod_node.bootstrap("status", "kubelet")
    assert "skipped:" in status.stdout and pod_node.digests["kubelet:bad"][:19] in status.stdout

    kubelet_pid = running_pid(node, "kubelet")
    ran = pod_node.bootstrap("--json", "auto-update")
    assert ran.rc == 0, ran.stderr
    units = _units(ran.json())
    assert units["ocid"]["updated"] == "true" and units["kubelet"]["result"] == "restarted"
    assert "its update was skipped" in units["kubelet"]["message"]
    assert _digests(node) == {"ocid": pod_node.digests["ocid:v4"], "kubelet": digests["kubelet"]}
    assert running_pid(node, "kubelet") != kubelet_pid
    assert_consistent(node)

    pod_node.move("v4", "v5")  # the tag moves on: tried, taken, forgotten
    ran = pod_node.bootstrap("--json", "auto-update")
    assert ran.rc == 0, ran.stderr
    assert _units(ran.json())["kubelet"]["updated"] == "true"
    remembered = json.loads(node.read_file(f"{STATE}/node/failed.json"))["containers"]
    assert "kubelet" not in remembered
    assert_consistent(node)


#: Where a run is killed: a test on the journal (phase, started members).
KILL_POINTS = {
    "staging": lambda j: j["phase"] == "staging",
    "staged": lambda j: j["phase"] == "starting" and j["started_members"] == [],
    "daemon started": lambda j: j["phase"] == "starting" and j["started_members"] == ["ocid"],
    "kubelet started": lambda j: (
        j["phase"] == "starting" and j["started_members"] == ["ocid", "kubelet"]
    ),
    "committing": lambda j: j["phase"] == "committing",
}
#: The command that finds the journal first: any per-container command, up, update --node.
RECOVERED_BY = {
    "staging": ("update", "cni", "--no-pull"),
    "staged": ("update", "cni", "--no-pull"),
    "daemon started": ("up", MANIFEST),
    "kubelet started": ("install", "cni", "{reg}/bootstrap/cni:plugins"),  # the same: no change
    "committing": ("update", "--node"),
}


def _journal(node: Node) -> dict[str, Any] | None:
    try:
        return json.loads(node.path(JOURNAL).read_text())
    except (OSError, ValueError):
        return None


def test_killed_at_each_phase_the_next_command_ends_with_a_consistent_node(
    pod_node: PodNode,
) -> None:
    node = pod_node.node
    assert pod_node.bootstrap("update", "--node").rc == 0
    version = 5
    for point, reached in KILL_POINTS.items():
        for attempt in range(3):
            version += 1
            assert version <= VERSIONS, "out of image variants"
            before, digests = _links(node), _digests(node)
            pod_node.move(f"v{version}", f"v{version}")
            proc = start_in_node(node, ["update", "--node"], NODE_ENV)
            killed = kill_when(
                proc, lambda r=reached: bool(r(_journal(node) or {"phase": ""})), 300
            )
            left = _journal(node)
            if killed and left is not None and reached(left):
                break
            print(f"{point}: attempt {attempt}: the kill came late ({left}); again")
            assert pod_node.bootstrap("update", "--node").rc == 0
        else:
            raise AssertionError(f"never killed at {point}")
        print(f"killed at {point}: links {_links(node)}")
        pids = {n: running_pid(node, n) for n in ("ocid", "kubelet")}
        ran = pod_node.bootstrap(*(a.format(reg=pod_node.reg.host) for a in RECOVERED_BY[point]))
        assert ran.rc == 0, ran.stderr
        assert "was interrupted in phase" in ran.stderr, ran.stderr
        assert not node.path(JOURNAL).exists()
        if point == "committing":
            want = {n: pod_node.digests[f"{n}:v{version}"] for n in ("ocid", "kubelet")}
            assert _digests(node) == want
            assert _links(node) != before
        else:
            assert _links(node) == before and _digests(node) == digests, point
            if point == "staging":  # nothing live had changed: nothing is restarted
                assert {n: running_pid(node, n) for n in ("ocid", "kubelet")} == pids
            # ...and a node update then does the job
            again = pod_node.bootstrap("update", "--node")
            assert again.rc == 0, again.stderr
        assert_consistent(node)
    t0 = time.time()
    node.run("systemctl", "restart", "kubelet.service")
    _probe_ok_after(node, t0)
