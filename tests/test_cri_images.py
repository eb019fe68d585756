"""The offline node images: the containerd CRI daemon and the kubelet stand-in.

The CRI daemon runs here as a plain ``runc run`` bundle on the host (cgroupfs, no systemd) with
RECIPES' runtime config, and is called over its socket from the host with the stand-in's CRI
stubs. The in-node system-container test is in tests/test_up.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import cri

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc needs root"),
]


def _unpack(image: cri.CachedImage, dest: Path) -> Path:
    subprocess.run(
        ["umoci", "unpack", "--image", f"{image.layout}:{image.tag}", str(dest)],
        check=True,
        capture_output=True,
    )
    return dest / "rootfs"


def _wait(what: str, timeout: float, probe) -> object:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return probe()
        except Exception as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s: {last}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The CRI daemon image running as ``runc run -d`` on the host; yields (socket, log)."""
    image = cri.cri_daemon_image()
    bundle = tmp_path / "b"
    rootfs = _unpack(image, bundle)
    dirs = {}
    for dest in ("/var/lib/containerd", "/run/containerd", "/var/log/pods"):
        host = tmp_path / dest.strip("/").replace("/", "-")
        host.mkdir()
        dirs[dest] = host
    config = json.loads((bundle / "config.json").read_text())
    args = config["process"]["args"]
    assert args == ["/usr/bin/tini-static", "-s", "-g", "--", "/usr/local/bin/ocid-start"]
    (bundle / "config.json").write_text(json.dumps(cri.host_daemon_config(rootfs, dirs, args)))
    cid = f"bs-cri-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        subprocess.run(
            ["runc", "run", "-d", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            check=True,
            timeout=60,
        )
    try:
        yield dirs["/run/containerd"] / "containerd.sock", log
    finally:
        subprocess.run(["runc", "kill", cid, "TERM"], capture_output=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            state = subprocess.run(["runc", "state", cid], capture_output=True, text=True)
            if state.returncode != 0 or '"stopped"' in state.stdout:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["runc", "kill", cid, "KILL"], capture_output=True)
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
        shutil.rmtree(bundle, ignore_errors=True)


def test_cri_daemon_image_is_cached_and_reproducible(tmp_path: Path) -> None:
    first = cri.cri_daemon_image()
    again = cri.cri_daemon_image()
    assert first == again
    # built again from scratch, byte for byte the same image
    _, build = cri.cri_daemon_builder()
    build(tmp_path / "oci")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [first.manifest_digest]
    index = json.loads((first.layout / "index.json").read_text())
    assert len(index["manifests"]) == 1
    manifest = json.loads(
        (first.layout / "blobs" / "sha256" / first.manifest_digest[7:]).read_text()
    )
    # one layer per .deb plus ours
    assert len(manifest["layers"]) == len(cri.DAEMON_DEBS) + 1


def test_containerd_answers_cri_from_the_host(daemon: tuple[Path, Path]) -> None:
    import grpc

    api_pb2, api_pb2_grpc = cri.stubs()

    socket, log = daemon
    started = time.monotonic()
    version = _wait(
        f"containerd answering Version (log: {log})",
        60,
        lambda: cri.cri_version(socket, timeout=1),
    )
    elapsed = time.monotonic() - started
    assert isinstance(version, dict)
    assert version["runtime_name"] == "containerd"
    assert version["runtime_api_version"] == "v1"
    assert version["runtime_version"].startswith("1.6")
    print(f"first CRI Version after {elapsed:.2f}s: {version}")

    # bootstrap's CRI client (what `bootstrap up` waits with)
    from bootstrap.cri.client import CriClient, CriVersion, wait_for_cri

    ready = wait_for_cri(socket, timeout=10, network=False)
    assert ready.version == CriVersion(**version)
    assert ready.status.runtime_ready
    # no CNI config in this daemon: NetworkReady false, and a wait for it says so
    assert ready.status.not_ready(network=True).startswith("NetworkReady false: ")
    with CriClient(socket) as client:
        assert client.image_status("registry.k8s.io/pause:3.10") is None

    # a host-network pod sandbox from the offline pause image, stopped and removed
    with grpc.insecure_channel(f"unix://{socket}") as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        status = rt.Status(api_pb2.StatusRequest(), timeout=5)
        conditions = {c.type: c.status for c in status.status.conditions}
        assert conditions["RuntimeReady"] is True
        uid = uuid.uuid4().hex
        parent = f"/bs-test-{uid[:8]}"  # removed below; the default parent would stay behind
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="probe", uid=uid, namespace="test"),
            # no hostname: a host-network sandbox shares the host's UTS namespace
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
                ),
            ),
        )
        sandbox = _wait(
            f"RunPodSandbox (log: {log})",
            20,
            lambda: rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=30),
        )
        sid = sandbox.pod_sandbox_id  # type: ignore[attr-defined]
        st = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10)
        assert st.status.state == api_pb2.SANDBOX_READY
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        listed = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)
        assert sid not in [p.id for p in listed.items]
    _rmdir_cgroup(parent)


CGROUP_PARENT = f"/bs-standin-{uuid.uuid4().hex[:8]}"


def _rmdir_cgroup(parent: str) -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        d = hierarchy / parent.lstrip("/")
        if d.is_dir():
            d.rmdir()


def _standin_config(rootfs: Path, run_dir: Path, kubelet_dir: Path, socket: str) -> dict:
    """runc config for the stand-in: host network, the daemon's /run/containerd and a
    /var/lib/kubelet bound in, runc's default capabilities."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_KILL"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": [
                cri.STANDIN_KUBELET,
                f"--container-runtime-endpoint=unix://{socket}",
                "--interval=0.5",
                f"--pod-cgroup-parent={CGROUP_PARENT}",
                "--kubeconfig=/etc/kubernetes/kubelet.conf",
            ],
            "env": [
                "PATH=/usr/bin:/bin",
                "PYTHONPATH=/usr/lib/python3/dist-packages:/opt/standin",
                "PYTHONDONTWRITEBYTECODE=1",
            ],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
            {
                "destination": "/run/containerd",
                "type": "bind",
                "source": str(run_dir),
                "options": ["rbind", "rw"],
            },
            {
                "destination": "/var/lib/kubelet",
                "type": "bind",
                "source": str(kubelet_dir),
                "options": ["rbind", "rw"],
            },
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]},
    }


def test_kubelet_standin_speaks_cri_from_its_container(
    daemon: tuple[Path, Path], tmp_path: Path
) -> None:
    socket, daemon_log = daemon
    _wait("containerd answering", 60, lambda: cri.cri_version(socket, timeout=1))
    image = cri.kubelet_standin_image()
    bundle = tmp_path / "standin"
    rootfs = _unpack(image, bundle)
    kubelet_dir = tmp_path / "kubelet"
    kubelet_dir.mkdir()
    config = _standin_config(rootfs, socket.parent, kubelet_dir, cri.CRI_SOCKET)
    (bundle / "config.json").write_text(json.dumps(config))
    cid = f"bs-standin-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "standin.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["runc", "run", "--bundle", str(bundle), cid],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        status_file = kubelet_dir / "standin-status.json"
        _wait(
            f"stand-in status file (log: {log}, daemon log: {daemon_log})",
            60,
            lambda: json.loads(status_file.read_text()),
        )
        status = json.loads(status_file.read_text())
        assert status["runtime_name"] == "containerd"
        assert status["runtime_api_version"] == "v1"
        assert status["conditions"]["RuntimeReady"] is True
        text = log.read_text()
        assert "kubelet-standin: CRI version: containerd 1.6" in text
        assert "stopped and removed" in text
        assert "ignoring kubelet flags: --kubeconfig" in text
        assert proc.poll() is None, "the stand-in must stay running"
        # SIGTERM ends it promptly with exit 0
        subprocess.run(["runc", "kill", cid, "TERM"], check=True)
        assert proc.wait(timeout=15) == 0
        assert "kubelet-standin: stopping" in log.read_text()
    finally:
        if proc.poll() is None:
            subprocess.run(["runc", "kill", cid, "KILL"], capture_output=True)
            proc.wait(timeout=15)
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
        _rmdir_cgroup(CGROUP_PARENT)
