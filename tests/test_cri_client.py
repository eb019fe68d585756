"""bootstrap/cri/: the generated stubs, their pins, and the client against a gRPC server.

The server here is a real grpcio server on a unix socket serving the generated CRI services
with answers we choose (a NetworkReady false, an image present or not, a late start, a socket
that is not CRI); the client against real containerd is in tests/test_cri_images.py.
"""

from __future__ import annotations

import re
import shutil
import socket as s
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest

from bootstrap.cri import api_pb2, api_pb2_grpc
from bootstrap.cri.client import (
    CriClient,
    CriCondition,
    CriError,
    CriImage,
    CriStatus,
    CriVersion,
    wait_for_cri,
)
from bootstrap.errors import ExitCode, SystemdError

REPO = Path(__file__).resolve().parents[1]
CRI = REPO / "bootstrap" / "cri"
GENERATED = ("api_pb2.py", "api_pb2_grpc.py")

PAUSE_DIGEST = "sha256:" + "ab" * 32


# ---- the stubs and their pins ------------------------------------------------------------------


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "bootstrap" / "cri").mkdir(parents=True)
    shutil.copy(CRI / "api.proto", tmp_path / "bootstrap" / "cri" / "api.proto")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "bootstrap/cri/api.proto",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "bootstrap" / "cri" / name).read_bytes()
        assert fresh == (CRI / name).read_bytes(), f"bootstrap/cri/{name} differs: regenerate it"


def _pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", dep)
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def test_pins_are_the_versions_the_stubs_were_generated_with() -> None:
    pins = _pins()
    grpc_made = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (CRI / GENERATED[1]).read_text())
    proto_made = re.search(
        r"# Protobuf Python Version: ([0-9.]+)", (CRI / GENERATED[0]).read_text()
    )
    assert grpc_made and proto_made
    assert pins["grpcio"] == pins["grpcio-tools"] == grpc_made.group(1)
    assert pins["protobuf"] == proto_made.group(1)
    for name in ("grpcio", "grpcio-tools", "protobuf"):
        assert metadata.version(name) == pins[name], f"{name}: pip install -e '.[dev]'"


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["images"], ["pull", "--help"]])
def test_offline_commands_do_not_import_grpc(tmp_path: Path, argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from bootstrap.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google')"
        " or m.startswith('bootstrap.cri')), file=sys.stderr)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "--store", tmp_path / "s", "--state", tmp_path / "t", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.stderr.strip().splitlines()[-1] == "[]", run.stderr


# ---- a CRI server with chosen answers ----------------------------------------------------------


class Runtime(api_pb2_grpc.RuntimeServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.network = api_pb2.RuntimeCondition(
            type="NetworkReady",
            status=False,
            reason="NetworkPluginNotReady",
            message="Network plugin returns error: cni plugin not initialized",
        )

    def Version(self, request: Any, context: Any) -> Any:
        return api_pb2.VersionResponse(
            version="0.1.0",
            runtime_name="containerd",
            runtime_version="1.6.20",
            runtime_api_version="v1",
        )

    def Status(self, request: Any, context: Any) -> Any:
        return api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(
                conditions=[
                    api_pb2.RuntimeCondition(type="RuntimeReady", status=True),
                    self.network,
                ]
            )
        )


class Images(api_pb2_grpc.ImageServiceServicer):  # type: ignore[misc]
    pause = api_pb2.Image(
        id="sha256:" + "cd" * 32,
        repo_tags=["registry.k8s.io/pause:3.9"],
        repo_digests=[f"registry.k8s.io/pause@{PAUSE_DIGEST}"],
        size=268_000,
    )

    def ImageStatus(self, request: Any, context: Any) -> Any:
        if request.image.image in ("registry.k8s.io/pause:3.9", self.pause.id):
            return api_pb2.ImageStatusResponse(image=self.pause)
        if request.image.image == "not-found":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such image")
        if request.image.image == "broken":
            context.abort(grpc.StatusCode.INTERNAL, "the store is on fire")
        return api_pb2.ImageStatusResponse()

    def ListImages(self, request: Any, context: Any) -> Any:
        return api_pb2.ListImagesResponse(images=[self.pause])


def _serve(path: Path, *, cri: bool = True) -> tuple[grpc.Server, Runtime]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    runtime = Runtime()
    if cri:
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(Images(), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server, runtime


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Runtime]]:
    path = tmp_path / "cri.sock"
    server, runtime = _serve(path)
    yield path, runtime
    server.stop(0)


def test_client_calls(served: tuple[Path, Runtime]) -> None:
    path, _ = served
    with CriClient(path, timeout=5) as client:
        assert client.version() == CriVersion("0.1.0", "containerd", "1.6.20", "v1")
        status = client.status()
        assert status == CriStatus(
            (
                CriCondition("RuntimeReady", True),
                CriCondition(
                    "NetworkReady",
                    False,
                    "NetworkPluginNotReady",
                    "Network plugin returns error: cni plugin not initialized",
                ),
            )
        )
        assert status.runtime_ready and not status.network_ready
        assert status.not_ready(network=False) == ""
        assert status.not_ready(network=True) == (
            "NetworkReady false: Network plugin returns error: cni plugin not initialized"
        )
        image = client.image_status("registry.k8s.io/pause:3.9")
        assert image == CriImage(
            "sha256:" + "cd" * 32,
            ("registry.k8s.io/pause:3.9",),
            (f"registry.k8s.io/pause@{PAUSE_DIGEST}",),
            268_000,
        )
        assert image.holds(PAUSE_DIGEST) and not image.holds("sha256:" + "00" * 32)
        assert client.image_status("registry.k8s.io/pause:3.10") is None
        assert client.image_status("not-found") is None
        with pytest.raises(
            CriError, match=r"CRI ImageStatus on .*: INTERNAL: the store is on fire"
        ):
            client.image_status("broken")
        assert client.list_images() == (image,)


def test_wait_for_cri_runtime_and_network(served: tuple[Path, Runtime]) -> None:
    path, runtime = served
    ready = wait_for_cri(path, timeout=5, network=False, what="ocid")
    assert str(ready) == "containerd 1.6.20 (CRI v1)"
    assert ready.status.runtime_ready
    assert 0 <= ready.answered_after <= ready.ready_after

    with pytest.raises(SystemdError) as err:
        wait_for_cri(path, timeout=0.5, network=True, what="ocid (ocid.service)")
    assert err.value.message == (
        f"ocid (ocid.service) on {path} is not ready after 0.5s: "
        "NetworkReady false: Network plugin returns error: cni plugin not initialized"
    )
    assert "CNI config" in err.value.hint
    assert err.value.exit_code == ExitCode.SYSTEMD

    # the condition turns true while waiting: the wait ends then
    def later() -> None:
        time.sleep(0.5)
        runtime.network = api_pb2.RuntimeCondition(type="NetworkReady", status=True)

    t = threading.Thread(target=later)
    t.start()
    ready = wait_for_cri(path, timeout=20, network=True)
    t.join()
    assert ready.status.network_ready and ready.ready_after >= 0.5


def test_wait_for_cri_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    with pytest.raises(CriError) as call:
        CriClient(path, timeout=1).version()
    assert call.value.message == f"CRI Version on {path}: cannot connect: No such file or directory"
    assert call.value.code == "UNAVAILABLE"
    with pytest.raises(SystemdError) as err:
        wait_for_cri(path, timeout=0.3, network=False)
    assert err.value.message == (
        f"the CRI daemon does not answer CRI Version on {path} after 0.3s: "
        "cannot connect: No such file or directory"
    )
    assert "journal" in err.value.hint


def test_wait_for_cri_sees_a_daemon_that_starts_late(tmp_path: Path) -> None:
    """A fresh channel per attempt: the wait ends soon after the socket appears, not a
    reconnect backoff later."""
    path = tmp_path / "late.sock"
    servers: list[grpc.Server] = []

    def start() -> None:
        time.sleep(1.0)
        servers.append(_serve(path)[0])

    t = threading.Thread(target=start)
    t.start()
    try:
        ready = wait_for_cri(path, timeout=20, network=False, interval=0.1)
        assert ready.answered_after >= 1.0
        print(f"answered {ready.answered_after - 1.0:.2f}s after the server started")
    finally:
        t.join()
        for server in servers:
            server.stop(0)


def test_a_socket_that_is_not_cri(tmp_path: Path) -> None:
    path = tmp_path / "grpc.sock"
    server, _ = _serve(path, cri=False)
    try:
        with pytest.raises(CriError) as err:
            CriClient(path, timeout=2).version()
        assert err.value.code == "UNIMPLEMENTED"
        assert "CRI v1" in err.value.hint
    finally:
        server.stop(0)

    # an HTTP/1.1 server on the socket: a CriError, no grpc exception
    path = tmp_path / "http.sock"
    listener = s.socket(s.AF_UNIX, s.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    stop = threading.Event()

    def answer() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(CriError):
            CriClient(path, timeout=2).version()
        with pytest.raises(SystemdError, match="does not answer CRI Version"):
            wait_for_cri(path, timeout=0.5, network=False)
    finally:
        stop.set()
        t.join()
        listener.close()
