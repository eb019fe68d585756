"""The offline node images (containerd CRI daemon, CNI plugins, pause, busybox pod image, kubelet
stand-in) and a real pod lifecycle through them.

The CRI daemon runs here as a plain ``runc run`` bundle on the host (cgroupfs, no systemd) with
RECIPES' runtime config, inside a network namespace the test makes (198.51.100.0/24 only, never
the machine's own), with the CNI plugins from the CNI image and a bridge + host-local + portmap
+ loopback conflist; pod images are handed to it with ``ctr -n k8s.io images import`` as
bootstrap's preload does. The stand-in runs its probe against it, as a plain process in that
namespace and from its own image. The in-node system-container tests are in tests/test_up.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import cri

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="runc and network namespaces need root"),
]

REPO = Path(__file__).resolve().parents[1]
STANDIN_MAIN = REPO / "images" / "demo" / "kubelet-standin" / "main.py"
VENV_PYTHON = Path(sys.executable)


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


def _rmdir_cgroup(parent: str) -> None:
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        d = hierarchy / parent.lstrip("/")
        if d.is_dir():
            for child in sorted(d.rglob("*"), reverse=True):
                if child.is_dir():
                    child.rmdir()
            d.rmdir()


# ---- the images --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(cri.BUILDERS))
def test_image_is_cached_and_reproducible(kind: str, tmp_path: Path) -> None:
    first = cri.CACHED[kind]()
    assert cri.CACHED[kind]() == first
    # built again from scratch, byte for byte the same image
    _, build = cri.BUILDERS[kind]()
    build(tmp_path / "oci")
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [first.manifest_digest]
    manifest = json.loads(
        (first.layout / "blobs" / "sha256" / first.manifest_digest[7:]).read_text()
    )
    size = sum(layer["size"] for layer in manifest["layers"])
    print(f"{kind}: {len(manifest['layers'])} layers, {size / 1e6:.1f} MB compressed")
    if kind == "ocid":  # one layer per .deb plus ours
        assert len(manifest["layers"]) == len(cri.DAEMON_DEBS) + 1


def test_cache_key_covers_the_content_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed, added or removed file under images/demo/KIND/ gives the image a new cache key
    (so it is built again); an untouched one the same key."""
    from bootstrap.demo import images

    content = tmp_path / "demo"
    shutil.copytree(images.CONTENT, content)
    monkeypatch.setattr(images, "CONTENT", content)
    key, _ = images.builder("busybox", tmp_path / "cache")
    assert images.builder("busybox", tmp_path / "cache")[0] == key
    hello = content / "busybox" / "hello"
    hello.write_text(hello.read_text() + "# changed\n")
    changed, _ = images.builder("busybox", tmp_path / "cache")
    (content / "busybox" / "extra").write_text("x")
    added, _ = images.builder("busybox", tmp_path / "cache")
    assert len({key, changed, added}) == 3


@pytest.fixture(scope="module")
def cni_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _unpack(cri.cni_plugins_image(), tmp_path_factory.mktemp("cni") / "b")


def test_image_contents(tmp_path: Path, cni_rootfs: Path) -> None:
    daemon = _unpack(cri.cri_daemon_image(), tmp_path / "ocid")
    config = (daemon / "etc/containerd/config.toml").read_text()
    assert (daemon / "exports/hostfs/etc/containerd/config.toml").read_text() == config
    assert 'sandbox_image = "registry.k8s.io/pause:3.9"' in config
    assert 'bin_dir = "/opt/cni/bin"' in config and 'conf_dir = "/etc/cni/net.d"' in config
    assert "restrict_oom_score_adj = true" in config
    for name in ("iptables", "iptables-save", "iptables-restore", "ip6tables"):
        assert os.readlink(daemon / "usr/sbin" / name) == "xtables-nft-multi"
    assert not list(daemon.rglob("pause.tar"))
    assert os.readlink(daemon / "var/run") == "../run"

    pause = _unpack(cri.pause_image(), tmp_path / "pause")
    spec = json.loads((tmp_path / "pause" / "config.json").read_text())
    assert spec["process"]["args"] == ["/usr/bin/catatonit", "-P"]
    assert (pause / "usr/bin/catatonit").is_file()

    pod = _unpack(cri.pod_image(), tmp_path / "pod")
    assert os.readlink(pod / "bin/httpd") == "busybox"

    definition = json.loads((cni_rootfs / "exports/manifest.json").read_text())
    assert definition["type"] == "oneshot"
    plugins = sorted(p.name for p in (cni_rootfs / "exports/hostfs/opt/cni/bin").iterdir())
    assert {"bridge", "host-local", "portmap", "loopback"} <= set(plugins)
    # its command, the self-check: every plugin answers CNI_COMMAND=VERSION with the image's libc
    # (run chrooted in a private mount namespace with the host's /dev, as a container has one)
    spec = json.loads((cni_rootfs.parent / "config.json").read_text())
    script = 'mount --bind /dev "$0/dev" && exec chroot "$0" "$@"'
    check = subprocess.run(
        ["unshare", "--mount", "/bin/sh", "-c", script, str(cni_rootfs), *spec["process"]["args"]],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == f"cni: {len(plugins)} plugins answer VERSION"


def _config_digest(image: cri.CachedImage) -> str:
    blob = image.layout / "blobs" / "sha256" / image.manifest_digest[7:]
    return str(json.loads(blob.read_text())["config"]["digest"])


# ---- containerd in a network namespace ---------------------------------------------------------


@dataclass
class Daemon:
    cid: str
    socket: Path
    log: Path
    netns: str
    shared: Path
    """A host directory bound at the same path inside the daemon (pod logs, hostPath)."""
    started: float

    def exec(self, *argv: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["runc", "exec", self.cid, *argv],
            input=input,
            capture_output=True,
            timeout=120,
        )

    def ctr_import(self, image: cri.CachedImage, name: str, tmp: Path) -> float:
        """``ctr -n k8s.io images import -`` of ``image`` named ``name``; the seconds taken."""
        archive = cri.ctr_archive(image, name, tmp / f"{uuid.uuid4().hex}.tar")
        started = time.monotonic()
        ran = self.exec(
            "ctr", "--address", cri.CRI_SOCKET, "-n", "k8s.io", "images", "import", "-",
            input=archive.read_bytes(),
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr.decode()
        archive.unlink()
        return time.monotonic() - started


@contextmanager
def _run_daemon(tmp_path: Path, netns: str, cni_bin: Path) -> Iterator[Daemon]:
    image = cri.cri_daemon_image()
    bundle = tmp_path / "b"
    rootfs = _unpack(image, bundle)
    dirs: dict[str, Path] = {}
    for dest in ("/var/lib/containerd", "/run/containerd", "/var/lib/cni", "/etc/cni/net.d"):
        host = tmp_path / dest.strip("/").replace("/", "-")
        host.mkdir()
        dirs[dest] = host
    (dirs["/etc/cni/net.d"] / "10-bootstrap.conflist").write_text(json.dumps(cri.cni_conflist()))
    shared = tmp_path / "shared"
    shared.mkdir()
    dirs[str(shared)] = shared
    config = json.loads((bundle / "config.json").read_text())
    args = config["process"]["args"]
    assert args == ["/usr/bin/tini-static", "-s", "-g", "--", "/usr/local/bin/ocid-start"]
    runc_config = cri.host_daemon_config(
        rootfs, dirs, args, netns=netns, ro={"/opt/cni/bin": cni_bin}
    )
    (bundle / "config.json").write_text(json.dumps(runc_config))
    cid = f"bs-cri-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "daemon.log"
    started = time.monotonic()
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
        yield Daemon(cid, dirs["/run/containerd"] / "containerd.sock", log, netns, shared, started)
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


@pytest.fixture
def daemon(tmp_path: Path, cni_rootfs: Path) -> Iterator[Daemon]:
    """containerd from its image in a fresh node network namespace, with the CNI plugins and
    config; nothing imported yet."""
    with (
        cri.node_netns() as netns,
        _run_daemon(tmp_path, netns, cni_rootfs / "exports/hostfs/opt/cni/bin") as d,
    ):
        yield d


def test_containerd_in_a_node_netns(daemon: Daemon, tmp_path: Path) -> None:
    import grpc

    from bootstrap.cri.client import CriClient, CriVersion, wait_for_cri

    api_pb2, api_pb2_grpc = cri.stubs()
    version = _wait(
        f"containerd answering Version (log: {daemon.log})",
        60,
        lambda: cri.cri_version(daemon.socket, timeout=1),
    )
    assert isinstance(version, dict)
    assert version["runtime_name"] == "containerd"
    assert version["runtime_api_version"] == "v1"
    assert version["runtime_version"].startswith("1.6")

    # bootstrap's CRI client: RuntimeReady and NetworkReady (the CNI config is there)
    ready = wait_for_cri(daemon.socket, timeout=30, network=True)
    network_ready = time.monotonic() - daemon.started
    assert ready.version == CriVersion(**version)
    assert ready.status.runtime_ready and ready.status.network_ready
    print(f"containerd start -> NetworkReady: {network_ready:.2f}s")

    # the image's iptables runs inside the daemon, with the nft backend
    ran = daemon.exec("iptables", "--version")
    assert ran.returncode == 0 and b"nf_tables" in ran.stdout, ran

    # the sandbox image handed over offline, then found by ImageStatus (name and digest)
    pause = cri.pause_image()
    with CriClient(daemon.socket) as client:
        assert client.image_status(cri.PAUSE_IMAGE) is None
        seconds = daemon.ctr_import(pause, cri.PAUSE_IMAGE, tmp_path)
        print(f"ctr import of the pause image: {seconds:.2f}s")
        held = client.image_status(cri.PAUSE_IMAGE)
        # containerd's CRI image id is the config digest; an imported image has no repo digest
        # (containerd records one only for its own pulls)
        assert held is not None and held.id == _config_digest(pause), held
        assert held.repo_tags == (cri.PAUSE_IMAGE,) and held.repo_digests == ()
        assert client.image_status(held.id) == held

    # a host-network pod sandbox (the daemon's network namespace), stopped and removed
    with grpc.insecure_channel(f"unix://{daemon.socket}") as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        uid = uuid.uuid4().hex
        parent = f"/bs-test-{uid[:8]}"  # removed below; the default parent would stay behind
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="probe", uid=uid, namespace="test"),
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
                ),
            ),
        )
        sid = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60)
        sid = sid.pod_sandbox_id
        st = rt.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10)
        assert st.status.state == api_pb2.SANDBOX_READY
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=30)
        listed = rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10)
        assert sid not in [p.id for p in listed.items]
    _rmdir_cgroup(parent)


# ---- the kubelet stand-in ----------------------------------------------------------------------


def _healthz(netns: str, port: int = 10248) -> tuple[int, str]:
    """GET /healthz on 127.0.0.1:PORT inside ``netns``: (status, body)."""
    code = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{port}/healthz', timeout=5)\n"
        "    print(r.status, r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    ran = subprocess.run(
        ["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 0, ran.stderr
    status, _, body = ran.stdout.strip().partition(" ")
    return int(status), body


def _pod_manifest(shared: Path, host_port: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "probe", "uid": str(uuid.uuid4())},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "httpd",
                    "image": cri.POD_IMAGE,
                    "command": ["/bin/sh", "-c"],
                    "args": [
                        'echo "hello from $(hostname)"; mkdir -p /www; '
                        "echo served-by-the-pod > /www/index.html; "
                        "trap 'kill $pid; exit 0' TERM; httpd -f -p 8080 -h /www & pid=$!; wait"
                    ],
                    "ports": [{"containerPort": 8080, "hostPort": host_port}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [
                {
                    "name": "data",
                    "hostPath": {"path": str(shared / "data"), "type": "DirectoryOrCreate"},
                }
            ],
        },
    }


def _status(path: Path) -> dict:
    return json.loads(path.read_text())


def test_kubelet_standin_runs_a_pod(daemon: Daemon, tmp_path: Path) -> None:
    """The stand-in's pod probe against containerd with a pod network: an image not preloaded
    fails it by name (no pull) and keeps it unhealthy; once imported, the next attempt passes:
    own network namespace with an IP from the CNI config, log, exec, hostPath, hostPort."""
    _wait("containerd answering", 60, lambda: cri.cri_version(daemon.socket, timeout=1))
    daemon.ctr_import(cri.pause_image(), cri.PAUSE_IMAGE, tmp_path)
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    host_port = 18080
    (manifests / "web.json").write_text(json.dumps(_pod_manifest(daemon.shared, host_port)))
    status_file = tmp_path / "status.json"
    parent = f"/bs-standin-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "standin.log"
    argv = [
        "ip", "netns", "exec", daemon.netns, str(VENV_PYTHON), "-u", str(STANDIN_MAIN),
        f"--container-runtime-endpoint=unix://{daemon.socket}",
        f"--status-file={status_file}",
        f"--pod-manifest-path={manifests}",
        f"--pod-logs-dir={daemon.shared / 'pods'}",
        f"--pod-cgroup-parent={parent}",
        "--interval=0.5",
        "--timeout=60",
        "--kubeconfig=/etc/kubernetes/kubelet.conf",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        # no busybox in the daemon: the probe fails at ImageStatus, naming the image
        def failed() -> dict:
            doc = _status(status_file)
            assert doc["state"] == "failed", doc["state"]
            return doc

        doc = _wait(f"a failed probe (log: {log})", 60, failed)
        assert isinstance(doc, dict)
        assert doc["failure"]["step"] == "ImageStatus"
        assert f"image {cri.POD_IMAGE} is not present" in doc["failure"]["error"]
        assert doc["failure"]["pod"] == "probe/web"
        code, body = _healthz(daemon.netns)
        assert code == 500 and "ImageStatus" in body and cri.POD_IMAGE in body
        assert proc.poll() is None, "the stand-in keeps running after a failed probe"

        # preloaded now: the next attempt passes
        daemon.ctr_import(cri.pod_image(), cri.POD_IMAGE, tmp_path)

        def passed() -> dict:
            doc = _status(status_file)
            assert doc["state"] == "ok", doc["state"]
            return doc

        doc = _wait(f"a passed probe (log: {log}, daemon: {daemon.log})", 120, passed)
        assert isinstance(doc, dict)
        assert doc["healthy"] is True and doc["failure"] is None
        assert doc["runtime_name"] == "containerd" and doc["conditions"]["NetworkReady"] is True
        assert ipaddress.ip_address(doc["pod_ip"]) in ipaddress.ip_network(cri.POD_SUBNET)
        pod = doc["pods"][0]
        assert pod["key"] == "probe/web" and pod["pod_ip"] == doc["pod_ip"]
        steps = [s["step"] for s in pod["steps"]]
        assert steps == [
            "Status", "ImageStatus", "volumes", "RunPodSandbox", "PodSandboxStatus",
            "CreateContainer", "StartContainer", "log", "ExecSync", "hostPath", "hostPort",
            "StopContainer", "RemoveContainer", "StopPodSandbox", "RemovePodSandbox",
        ], steps  # fmt: skip
        assert all(isinstance(s["seconds"], float) for s in pod["steps"])
        assert pod["logs"]["httpd"] == "hello from web"
        by_step = {s["step"]: s for s in pod["steps"]}
        assert "served-by" not in by_step["hostPort"]["detail"]  # the status line, not the body
        assert f"{cri.NODE_IP}:{host_port}" in by_step["hostPort"]["detail"]
        assert "200" in by_step["hostPort"]["detail"]
        assert _healthz(daemon.netns) == (200, "ok")
        timings = {s["step"]: s["seconds"] for s in pod["steps"]}
        print("pod lifecycle steps (s):", json.dumps(timings))
        print(log.read_text())
        print(json.dumps({**doc, "steps": doc["steps"][:2]}, indent=1))

        text = log.read_text()
        assert "kubelet-standin: CRI version: containerd 1.6" in text
        assert "ignoring kubelet flags: --kubeconfig" in text
        assert "kubelet-standin: probe/web: RunPodSandbox" in text
        assert "pod probe passed" in text
        # nothing left behind: no sandbox, no log directory, no probe file
        import grpc

        api_pb2, api_pb2_grpc = cri.stubs()
        with grpc.insecure_channel(f"unix://{daemon.socket}") as ch:
            rt = api_pb2_grpc.RuntimeServiceStub(ch)
            assert not rt.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=10).items
            assert not rt.ListContainers(api_pb2.ListContainersRequest(), timeout=10).containers
        assert not list((daemon.shared / "pods").iterdir())
        assert not list((daemon.shared / "data").iterdir())

        # SIGTERM ends it promptly with exit 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "kubelet-standin: stopping" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)
        _rmdir_cgroup(parent)


def _standin_config(
    rootfs: Path, run_dir: Path, kubelet_dir: Path, socket: str, netns: str, parent: str
) -> dict:
    """runc config for the stand-in: the node's network namespace, the daemon's
    /run/containerd and a /var/lib/kubelet bound in, runc's default capabilities."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_KILL"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": [
                cri.STANDIN_KUBELET,
                f"--container-runtime-endpoint=unix://{socket}",
                "--interval=0.5",
                f"--pod-cgroup-parent={parent}",
                "--kubeconfig=/etc/kubernetes/kubelet.conf",
            ],
            "env": [
                "PATH=/usr/bin:/bin",
                "PYTHONPATH=/usr/lib/python3/dist-packages:/usr/local/lib/kubelet-standin",
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
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "mount"},
                {"type": "network", "path": f"/run/netns/{netns}"},
            ]
        },
    }


def test_kubelet_standin_speaks_cri_from_its_container(daemon: Daemon, tmp_path: Path) -> None:
    """The stand-in's image (its Python, grpcio, the product's stubs) with no static pod
    manifest: the host-network sandbox probe."""
    _wait("containerd answering", 60, lambda: cri.cri_version(daemon.socket, timeout=1))
    daemon.ctr_import(cri.pause_image(), cri.PAUSE_IMAGE, tmp_path)
    image = cri.kubelet_standin_image()
    bundle = tmp_path / "standin"
    rootfs = _unpack(image, bundle)
    kubelet_dir = tmp_path / "kubelet"
    kubelet_dir.mkdir()
    parent = f"/bs-standin-{uuid.uuid4().hex[:8]}"
    config = _standin_config(
        rootfs, daemon.socket.parent, kubelet_dir, cri.CRI_SOCKET, daemon.netns, parent
    )
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

        def passed() -> dict:
            doc = _status(status_file)
            assert doc["state"] == "ok", doc
            return doc

        status = _wait(f"a passed probe (log: {log}, daemon log: {daemon.log})", 60, passed)
        assert isinstance(status, dict)
        assert status["runtime_name"] == "containerd"
        assert status["runtime_api_version"] == "v1"
        assert status["conditions"]["RuntimeReady"] is True
        assert [s["step"] for s in status["steps"]] == [
            "Status", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox",
        ]  # fmt: skip
        assert _healthz(daemon.netns) == (200, "ok")
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
        _rmdir_cgroup(parent)
