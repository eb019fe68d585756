"""A kubelet stand-in: speak CRI v1 to the CRI daemon like a starting kubelet, then stay up.

``main.py --container-runtime-endpoint unix:///run/containerd/containerd.sock [--status-file F]``

1. ``Version`` until it answers (a fresh channel per attempt: a gRPC channel whose first connect
   failed backs off for a second or more), logging ``CRI version: <name> <version> (API <v>)``,
   then sends ``READY=1`` to ``$NOTIFY_SOCKET`` when set (sd_notify, as the kubelet does: a
   ``Type=notify`` unit's start ends here);
2. ``Status``: logs RuntimeReady/NetworkReady (NetworkReady is false without a CNI config);
3. ``RunPodSandbox`` with the host network, ``StopPodSandbox``, ``RemovePodSandbox`` (retried for
   a while: the runtime may still be importing its sandbox image);
4. writes the status file (JSON, atomically) and logs ``ready``; then calls ``Version`` every
   10 s until SIGTERM/SIGINT, and exits 0.

Any step failing past ``--timeout`` exits 1 (the unit's Restart=on-failure runs it again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

import grpc

from bootstrap.cri import api_pb2, api_pb2_grpc

stop = threading.Event()


def log(message: str) -> None:
    print(f"kubelet-standin: {message}", file=sys.stderr, flush=True)


def channel(endpoint: str) -> grpc.Channel:
    return grpc.insecure_channel(
        endpoint,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        ],
    )


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET`` as sd_notify(3) does: one
    datagram on a unix socket (a leading ``@`` names an abstract one). False when the variable is
    unset (not started by a notify unit); an unreachable socket is logged, not fatal."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log(f"sd_notify {state} to {path}: {exc}")
        return False
    return True


def retry(what: str, timeout: float, call: Any) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while not stop.is_set():
        try:
            return call()
        except grpc.RpcError as exc:
            last = exc
            if time.monotonic() >= deadline:
                break
            stop.wait(0.2)
    raise SystemExit(f"kubelet-standin: {what} failed: {last}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--container-runtime-endpoint", required=True)
    p.add_argument("--status-file", default="/var/lib/kubelet/standin-status.json")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--pod-cgroup-parent", default="", help="cgroup_parent of the probe sandbox")
    args, unknown = p.parse_known_args()
    if unknown:
        log(f"ignoring kubelet flags: {' '.join(unknown)}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    endpoint = args.container_runtime_endpoint

    def version() -> Any:
        with channel(endpoint) as ch:
            return api_pb2_grpc.RuntimeServiceStub(ch).Version(
                api_pb2.VersionRequest(version="v1"), timeout=2
            )

    started = time.monotonic()
    v = retry("Version", args.timeout, version)
    log(
        f"CRI version: {v.runtime_name} {v.runtime_version} (API {v.runtime_api_version}) "
        f"after {time.monotonic() - started:.2f}s"
    )
    if sd_notify("READY=1"):
        log("sent READY=1")
    with channel(endpoint) as ch:
        rt = api_pb2_grpc.RuntimeServiceStub(ch)
        status = retry(
            "Status", args.timeout, lambda: rt.Status(api_pb2.StatusRequest(), timeout=5)
        )
        conditions = {c.type: c.status for c in status.status.conditions}
        log(f"runtime status: {conditions}")
        uid = uuid.uuid4().hex
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name="standin-probe", uid=uid, namespace="bootstrap", attempt=0
            ),
            # no hostname: a host-network sandbox shares the node's UTS namespace
            log_directory=f"/var/log/pods/bootstrap_standin-probe_{uid}",
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=args.pod_cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
                ),
            ),
        )
        sandbox = retry(
            "RunPodSandbox",
            args.timeout,
            lambda: rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config), timeout=60),
        )
        sid = sandbox.pod_sandbox_id
        log(f"pod sandbox {sid[:12]} running (host network)")
        rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        log(f"pod sandbox {sid[:12]} stopped and removed")
    doc = {
        "endpoint": endpoint,
        "runtime_name": v.runtime_name,
        "runtime_version": v.runtime_version,
        "runtime_api_version": v.runtime_api_version,
        "conditions": conditions,
        "sandbox": sid,
        "pid": os.getpid(),
        "time": time.time(),
    }
    if args.status_file:
        os.makedirs(os.path.dirname(args.status_file), exist_ok=True)
        tmp = f"{args.status_file}.tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, args.status_file)
    log("ready")
    while not stop.wait(args.interval):
        try:
            version()
        except grpc.RpcError as exc:
            log(f"Version failed: {exc.code()}")
    log("stopping")
    return 0


if __name__ == "__main__":
    sys.exit(main())
