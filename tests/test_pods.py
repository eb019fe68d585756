"""A node that runs pods: ``bootstrap up`` with ``pods:`` in a systemd node of its own network.

The node boots in a network namespace of its own (198.51.100.0/24, its 127.0.0.1:PORT relayed
to the registry on the host's loopback). Its manifest installs the CNI plugins image (a
files-only system container whose ``/exports/hostfs`` puts the plugins in /opt/cni/bin), the
CRI daemon (Debian's containerd) and the kubelet stand-in; ``pods:`` gives the CNI config and
the pod images bootstrap pulls (the sandbox image through a registries.conf mirror of
registry.k8s.io) and hands to containerd. The stand-in then runs the node's static pod the way
a kubelet does: its own network (an IP from the CNI config), its log under /var/log/pods, exec,
a hostPath volume under /srv, a hostPort reached from the node.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path

import pytest

from tests.harness import cri
from tests.harness.cli import bootstrap
from tests.harness.node import VENV, Node
from tests.harness.registry import Registry

REPO = Path(__file__).resolve().parents[1]
STATE = "/var/lib/bootstrap"
MANIFEST = "/etc/bootstrap/node.yaml"
STATUS = "/var/lib/kubelet/standin-status.json"
HOST_PATH = "/srv/standin-probe"
HOST_PORT = 18080

CONFLIST = """\
    config:
      cniVersion: 1.0.0
      name: pods
      plugins:
        - type: bridge
          bridge: cni0
          isGateway: true
          ipMasq: true
          ipam:
            type: host-local
            ranges: [[{subnet: 198.51.100.128/25}]]
            routes: [{dst: 0.0.0.0/0}]
        - type: portmap
          capabilities: {portMappings: true}
        - type: loopback
"""


@pytest.fixture(scope="module")
def pod_images(_registry_plain: Registry) -> dict[str, str]:
    reg = _registry_plain
    pushed = {
        "ocid": (cri.cri_daemon_image(), "bootstrap/ocid:containerd"),
        "kubelet": (cri.kubelet_standin_image(), "bootstrap/kubelet:standin"),
        "cni": (cri.cni_plugins_image(), "bootstrap/cni:plugins"),
        "pause": (cri.pause_image(), "pause:3.9"),  # served as registry.k8s.io/pause (mirror)
        "busybox": (cri.pod_image(), "bootstrap/busybox:httpd"),
    }
    for image, path in pushed.values():
        reg.push(image.layout, image.tag, path)
    return {k: f"{reg.host}/{path}" for k, (_, path) in pushed.items()}


def manifest(reg: Registry, images: dict[str, str], extra: str = "") -> str:
    return f"""\
{cri.manifest_head(reg.host)}\
  - name: cni
    image: {images["cni"]}
{cri.ocid_entry(images["ocid"], after="[cni]")}\
  - name: kubelet
    image: {images["kubelet"]}
    definition: {REPO}/images/kubelet
    set:
      CRI_SOCKET: {cri.CRI_SOCKET}
    after: [ocid]
pods:
  network:
{CONFLIST}  images: [registry.k8s.io/pause:3.9, "{images["busybox"]}"]
{extra}"""


def static_pod(image: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "namespace": "probe", "uid": "5f0c1d2e-web"},
            "spec": {
                "terminationGracePeriodSeconds": 5,
                "containers": [
                    {
                        "name": "httpd",
                        "image": image,
                        "command": ["/bin/sh", "-c"],
                        "args": [
                            'echo "hello from $(hostname)"; mkdir -p /www; '
                            "echo served-by-the-pod > /www/index.html; "
                            "trap 'kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; "
                            "wait"
                        ],
                        "ports": [{"containerPort": 8080, "hostPort": HOST_PORT}],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }
                ],
                "volumes": [
                    {"name": "data", "hostPath": {"path": HOST_PATH, "type": "DirectoryOrCreate"}}
                ],
            },
        }
    )


def _active(node: Node, unit: str) -> str:
    return node.systemctl("is-active", unit).stdout.strip()


def _probe(node: Node, after: float, timeout: float = 120) -> dict:
    """The stand-in's status once a probe finished after ``after`` (epoch seconds)."""
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        try:
            doc = json.loads(node.read_file(STATUS))
            if doc.get("time", 0) > after and doc.get("state") in ("ok", "failed"):
                return doc
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(
        f"no finished pod probe: {doc}\n{node.journal('kubelet.service', 40)}\n"
        f"{node.journal('ocid.service', 40)}"
    )


def _chain(result: dict) -> list[str]:
    return [s["what"] for s in result["chain"]]


@pytest.mark.slow
@pytest.mark.node
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_node_runs_pods(
    make_node: object, _registry_plain: Registry, pod_images: dict[str, str]
) -> None:
    reg = _registry_plain
    node: Node = make_node(private_network=True, forward=(reg.port,))  # type: ignore[operator]
    node.run("ln", "-sf", str(VENV / "bin" / "bootstrap"), "/usr/local/bin/bootstrap")
    node.write_file(MANIFEST, manifest(reg, pod_images))
    node.write_file("/etc/kubernetes/manifests/web.json", static_pod(pod_images["busybox"]))

    # first boot
    t0 = time.time()
    started = time.monotonic()
    up = node.bootstrap("--json", "up", MANIFEST, timeout=600)
    took = time.monotonic() - started
    assert up.rc == 0, up.stderr
    result = up.json()
    steps = _chain(result)
    print(f"first boot to NetworkReady and the kubelet: {took:.1f}s")
    print("boot chain:", json.dumps(result["chain"], indent=1))
    assert any(s.startswith("host config: registries written") for s in steps), steps
    assert any("pods.network written" in s for s in steps), steps
    assert any(s.startswith("ocid: imported pod image registry.k8s.io/pause:3.9") for s in steps)
    assert any(s.startswith(f"ocid: imported pod image {pod_images['busybox']}") for s in steps)
    assert "ocid: CRI RuntimeReady and NetworkReady" in steps
    assert steps.index("ocid: CRI RuntimeReady and NetworkReady") < next(
        i for i, s in enumerate(steps) if s.startswith("kubelet:")
    )
    assert _active(node, "cni.service") == "active"  # a oneshot: active (exited)
    assert node.path("/opt/cni/bin/bridge").is_file()  # from the CNI image's /exports/hostfs
    conflist = json.loads(node.read_file("/etc/cni/net.d/10-bootstrap.conflist"))
    assert conflist["name"] == "pods"
    drop_in = node.read_file("/etc/containers/registries.conf.d/50-bootstrap-node.conf")
    assert reg.host in drop_in

    # the stand-in runs the static pod as a kubelet does
    status = _probe(node, t0)
    assert status["state"] == "ok", json.dumps(status, indent=1)
    assert ipaddress.ip_address(status["pod_ip"]) in ipaddress.ip_network("198.51.100.128/25")
    done = {s["step"] for s in status["steps"]}
    for step in ("RunPodSandbox", "log", "ExecSync", "hostPath", "hostPort", "RemovePodSandbox"):
        assert step in done, (step, status["steps"])
    image_step = next(s for s in status["steps"] if s["step"] == "ImageStatus")
    assert "no pull" in image_step["detail"]
    print("pod probe:", [(s["step"], s["seconds"]) for s in status["steps"]])
    health = node.run(
        "python3",
        "-c",
        "import urllib.request as u; "
        "print(u.urlopen('http://127.0.0.1:10248/healthz').read().decode())",
    )
    assert health.stdout.strip() == "ok"

    # up again (marker removed, so it does all its steps): the daemon holds both pod images
    node.run("rm", f"{STATE}/.provisioned")
    again = node.bootstrap("--json", "up", MANIFEST, timeout=300, check=True).json()
    steps = _chain(again)
    assert not any("imported pod image" in s for s in steps), steps
    assert sum("holds pod image" in s for s in steps) == 2, steps

    # reboot: everything comes back by itself; up then imports nothing either
    node.poweroff()
    t1 = time.time()
    node.boot()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _active(node, "kubelet.service") != "active":
        time.sleep(0.5)
    assert _probe(node, t1)["state"] == "ok"
    node.run("rm", f"{STATE}/.provisioned")
    rebooted = node.bootstrap("--json", "up", MANIFEST, timeout=300, check=True).json()
    assert sum("holds pod image" in s for s in _chain(rebooted)) == 2

    # the registry up booted from stays reachable for later commands (insecure, plain HTTP)
    update = node.bootstrap("update", "ocid", timeout=300)
    assert update.rc == 0, update.stderr
    assert "TLS" not in update.stderr

    # uninstalling the CNI image removes its host files and nothing else
    others = node.run("sh", "-c", "ls /etc/cni/net.d /var/log/pods /srv").stdout
    node.bootstrap("uninstall", "cni", check=True)
    assert not node.path("/opt/cni/bin/bridge").exists()
    assert node.path("/opt/cni/bin").is_dir() or not node.path("/opt/cni/bin").exists()
    assert node.run("sh", "-c", "ls /etc/cni/net.d /var/log/pods /srv").stdout == others
    assert _active(node, "ocid.service") == "active"


def test_a_refused_pod_image_stops_up_before_anything_is_handed_over(
    tmp_path: Path, _registry_plain: Registry, pod_images: dict[str, str]
) -> None:
    reg = _registry_plain
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "default": [{"type": "insecureAcceptAnything"}],
                "transports": {"docker": {pod_images["busybox"]: [{"type": "reject"}]}},
            }
        )
    )
    path = tmp_path / "node.yaml"
    text = manifest(reg, pod_images).replace(
        "network:\n  timeout: 30", "network:\n  timeout: 5\n  require_default_route: false"
    )
    path.write_text(text)
    env = {
        "BOOTSTRAP_REGISTRIES_CONF_D": str(tmp_path / "registries.conf.d"),
        "BOOTSTRAP_CNI_CONF_DIR": str(tmp_path / "net.d"),
        "BOOTSTRAP_SIGNATURE_POLICY": str(policy),
    }
    ran = bootstrap(
        "up", str(path), store=tmp_path / "store", state=tmp_path / "state", env=env, timeout=300
    )
    assert ran.rc == 7, ran.stderr
    assert pod_images["busybox"] in ran.stderr.splitlines()[-2]
    assert not (tmp_path / "state" / "containers").exists()  # nothing installed, nothing handed
    assert not (tmp_path / "state" / ".provisioned").exists()
