"""The kubelet stand-in's parts that need no CRI daemon: the static pod manifest subset, the
status file and /healthz, and a runtime that never answers. Its pod lifecycle against real
containerd is in tests/test_cri_images.py."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "images" / "demo" / "kubelet-standin" / "main.py"


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("kubelet_standin_main", MAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "probe"},
        "spec": {"containers": [{"name": "c", "image": "localhost/x:1"}], **spec},
    }


def test_manifest_subset(standin: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    path.write_text(
        json.dumps(
            _pod(
                hostNetwork=False,
                terminationGracePeriodSeconds=3,
                containers=[
                    {
                        "name": "httpd",
                        "image": "localhost/bootstrap/busybox:httpd",
                        "command": ["/bin/sh", "-c"],
                        "args": ["exec httpd -f"],
                        "env": [{"name": "A", "value": "1"}],
                        "ports": [{"containerPort": 8080, "hostPort": 18080}],
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/data", "mountPropagation": "None"}
                        ],
                        "resources": {"limits": {"cpu": "1"}},  # ignored
                    }
                ],
                volumes=[{"name": "data", "hostPath": {"path": "/srv/data", "type": "Directory"}}],
            )
        )
    )
    pod = standin.parse_pod(path)
    assert (pod.name, pod.namespace, pod.key, pod.host_network, pod.grace) == (
        "web", "probe", "probe/web", False, 3,
    )  # fmt: skip
    assert len(pod.uid) == 36  # derived from the file when metadata.uid is absent
    assert standin.parse_pod(path).uid == pod.uid
    (c,) = pod.containers
    assert c.command == ("/bin/sh", "-c") and c.args == ("exec httpd -f",)
    assert c.env == (("A", "1"),)
    assert c.ports == (standin.Port(8080, 18080, "TCP", ""),)
    assert c.mounts == (standin.VolumeMount("data", "/data", False, "None"),)
    assert pod.host_paths == {"data": ("/srv/data", "Directory")}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ("{", "not JSON"),
        (_pod(containers=[]), "spec.containers: at least one container"),
        (_pod(containers=[{"name": "c"}]), r"spec.containers\[0\].image: required"),
        (_pod(volumes=[{"name": "v", "emptyDir": {}}]), r"only hostPath volumes"),
        (
            _pod(volumes=[{"name": "v", "hostPath": {"path": "rel"}}]),
            r"hostPath.path: must be absolute",
        ),
        (
            _pod(containers=[{"name": "c", "image": "i", "ports": [{"containerPort": "80"}]}]),
            r"containerPort: must be int",
        ),
        (
            _pod(
                containers=[
                    {"name": "c", "image": "i", "ports": [{"containerPort": 1, "protocol": "X"}]}
                ]
            ),
            r"protocol: 'X' is not TCP, UDP or SCTP",
        ),
        (
            _pod(containers=[{"name": "c", "image": "i", "volumeMounts": [{"name": "nope"}]}]),
            r"no volume 'nope'",
        ),
    ],
)
def test_manifest_errors(standin: ModuleType, tmp_path: Path, doc: Any, error: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ValueError, match=error):
        standin.parse_pod(path)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_status_file_and_healthz(standin: ModuleType, tmp_path: Path) -> None:
    status = tmp_path / "sub" / "status.json"
    report = standin.Report(str(status), "unix:///x.sock")
    report.update(state="probing")
    assert json.loads(status.read_text())["state"] == "probing"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = standin.serve_healthz(report, "127.0.0.1", port)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{port}"
        assert _get(f"{url}/healthz") == (500, "no pod probe has run yet")
        report.set_health(False, "probe/web ImageStatus: image x is not present")
        assert _get(f"{url}/healthz") == (500, "probe/web ImageStatus: image x is not present")
        report.set_health(True, "ok")
        assert _get(f"{url}/healthz") == (200, "ok")
        assert _get(f"{url}/other")[0] == 404
        doc = json.loads(status.read_text())
        assert doc["healthy"] is True and doc["endpoint"] == "unix:///x.sock"
        # a port in use: logged, no server, not fatal
        assert standin.serve_healthz(report, "127.0.0.1", port) is None
    finally:
        server.shutdown()
        server.server_close()


def test_a_runtime_that_never_answers(tmp_path: Path) -> None:
    """Version is retried until --timeout, then exit 1 (the unit's Restart= runs it again)."""
    status = tmp_path / "status.json"
    started = time.monotonic()
    ran = subprocess.run(
        [
            sys.executable,
            str(MAIN),
            f"--container-runtime-endpoint=unix://{tmp_path}/none.sock",
            f"--status-file={status}",
            "--timeout=1",
            "--healthz-port=0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 1, ran.stderr
    assert time.monotonic() - started >= 1
    assert "kubelet-standin: Version failed for 1s: UNAVAILABLE" in ran.stderr
    doc = json.loads(status.read_text())
    assert doc["healthy"] is False and doc["state"] == "starting"


def test_sd_notify(standin: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-in's sd_notify sends one datagram to $NOTIFY_SOCKET (path or abstract), and is
    a no-op without it (not run by a Type=notify unit)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert standin.sd_notify("READY=1") is False
    for name in (str(tmp_path / "notify.sock"), f"@bootstrap-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind("\0" + name[1:] if name.startswith("@") else name)
            server.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", name)
            assert standin.sd_notify("READY=1") is True
            assert server.recv(64) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    assert standin.sd_notify("READY=1") is False  # logged, not fatal
