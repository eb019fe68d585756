"""A kubelet stand-in: do over CRI v1 what a kubelet does for a static pod, then stay up.

``main.py --container-runtime-endpoint unix:///run/containerd/containerd.sock [flags]``

1. ``Version`` until it answers (a fresh channel per attempt: a gRPC channel whose first connect
   failed backs off for a second or more), logging ``CRI version: <name> <version> (API <v>)``,
   then ``READY=1`` to ``$NOTIFY_SOCKET`` when set (sd_notify, as the kubelet does: a
   ``Type=notify`` unit's start ends here); past ``--timeout`` it exits 1.
2. The pod probe, for each static pod manifest ``--pod-manifest-path/*.json`` (JSON Pod objects,
   the subset below), in name order:
   ``Status`` (RuntimeReady; NetworkReady too for a pod with its own network, waited for up to
   ``--timeout``); ``ImageStatus`` of every container image and **no pull** (imagePullPolicy
   Never: an image the runtime does not hold fails the probe, naming it); hostPath volumes
   checked or created by their ``type``; ``RunPodSandbox`` (own network namespace unless
   ``hostNetwork``, port mappings from the containers' ``hostPort``\\s, log directory
   ``--pod-logs-dir/NAMESPACE_NAME_UID/``); ``PodSandboxStatus`` (the pod IP);
   ``CreateContainer`` (log ``CONTAINER/0.log``, hostPath mounts) and ``StartContainer`` for each
   container; the log file has output; ``ExecSync`` in the first container (``sh -c``: writes a
   token into its first hostPath directory mount); that file is visible at the hostPath on this
   side; every TCP ``hostPort`` answers from the node (``--node-ip``, else the source address
   of the default route); then ``StopContainer``/``RemoveContainer``/``StopPodSandbox``/
   ``RemovePodSandbox`` and the log directory removed (also after a failure).
   Without a manifest: a host-network sandbox run, stopped and removed.
3. Each step is logged (``kubelet-standin: STEP ... (0.12s)``) and the status file
   (``--status-file``, JSON, written atomically after every step) says: ``state``
   (``probing``/``ok``/``failed``), the runtime's version and conditions, ``pods`` (each with
   ``name``, ``namespace``, ``uid``, ``pod_ip``, ``sandbox``, ``steps``, ``failure``), ``pod_ip``
   (the first pod's), ``steps`` (every step: ``pod``, ``step``, ``seconds``, ``detail``),
   ``failure`` (``{"pod", "step", "error"}`` or null), ``attempt``, ``healthy``, ``pid``, ``time``.
4. ``http://127.0.0.1:10248/healthz`` (``--healthz-bind-address``, ``--healthz-port``; 0
   disables): 200 ``ok`` once the probe passed, else 500 with what failed. A failed probe is
   retried every ``--interval`` seconds; after a pass, ``Version`` is called every
   ``--interval`` seconds (a failure makes it unhealthy and the probe runs again once the
   runtime answers). SIGTERM/SIGINT end it with exit 0; it never exits over a failed probe.

Manifest subset: ``metadata`` (``name``, ``namespace`` default ``default``, ``uid`` default a
hash of the file); ``spec.hostNetwork``; ``spec.terminationGracePeriodSeconds`` (default 30:
StopContainer's timeout); ``spec.containers[]`` with ``name``, ``image``,
``command``, ``args``, ``workingDir``, ``env[]`` (``name``/``value``), ``ports[]``
(``containerPort``, ``hostPort``, ``protocol`` TCP/UDP/SCTP, ``hostIP``), ``volumeMounts[]``
(``name``, ``mountPath``, ``readOnly``, ``mountPropagation``); ``spec.volumes[]`` with
``hostPath`` (``path``, ``type``: "", DirectoryOrCreate, Directory, FileOrCreate, File, Socket,
CharDevice, BlockDevice). Anything else is ignored; a malformed manifest fails the probe at step
``manifest``.

Stdlib and grpc only: it runs in its own image beside the product's CRI stubs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bootstrap.cri import api_pb2, api_pb2_grpc

stop = threading.Event()

STATUS_FILE = "/var/lib/kubelet/standin-status.json"
MANIFESTS = "/etc/kubernetes/manifests"
POD_LOGS = "/var/log/pods"
PROBE_FILE = ".kubelet-standin-probe"


def log(message: str) -> None:
    print(f"kubelet-standin: {message}", file=sys.stderr, flush=True)


def channel(endpoint: str) -> grpc.Channel:
    return grpc.insecure_channel(
        endpoint,
        options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.enable_http_proxy", 0),
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


def rpc_error(exc: grpc.RpcError) -> str:
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


class Stopped(Exception):
    """SIGTERM/SIGINT arrived during a probe."""


class StepFailed(Exception):
    def __init__(self, step: str, error: str) -> None:
        super().__init__(f"{step}: {error}")
        self.step = step
        self.error = error


# ---- the manifest subset -----------------------------------------------------------------------

PROTOCOLS = {"TCP": api_pb2.TCP, "UDP": api_pb2.UDP, "SCTP": api_pb2.SCTP}
PROPAGATION = {
    "": api_pb2.PROPAGATION_PRIVATE,
    "None": api_pb2.PROPAGATION_PRIVATE,
    "HostToContainer": api_pb2.PROPAGATION_HOST_TO_CONTAINER,
    "Bidirectional": api_pb2.PROPAGATION_BIDIRECTIONAL,
}
HOSTPATH_TYPES = (
    "",
    "DirectoryOrCreate",
    "Directory",
    "FileOrCreate",
    "File",
    "Socket",
    "CharDevice",
    "BlockDevice",
)


@dataclass(frozen=True)
class Port:
    container_port: int
    host_port: int
    protocol: str
    host_ip: str


@dataclass(frozen=True)
class VolumeMount:
    name: str
    mount_path: str
    read_only: bool
    propagation: str


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    command: tuple[str, ...]
    args: tuple[str, ...]
    working_dir: str
    env: tuple[tuple[str, str], ...]
    ports: tuple[Port, ...]
    mounts: tuple[VolumeMount, ...]


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    uid: str
    host_network: bool
    containers: tuple[Container, ...]
    host_paths: dict[str, tuple[str, str]] = field(default_factory=dict)  # volume -> (path, type)
    grace: int = 30
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _get(doc: Any, key: str, kind: type, where: str, default: Any = None) -> Any:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: must be an object")
    value = doc.get(key, default)
    if value is None:
        raise ValueError(f"{where}.{key}: required")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}.{key}: must be {kind.__name__}")
    return value


def _strings(doc: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = _get(doc, key, list, where, [])
    if not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}.{key}: must be a list of strings")
    return tuple(values)


def parse_pod(path: Path) -> Pod:
    """The manifest subset (see the module doc) of the JSON Pod at ``path``. Raises
    ``ValueError`` naming the first bad field."""
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    meta = _get(doc, "metadata", dict, path.name)
    spec = _get(doc, "spec", dict, path.name)
    name = _get(meta, "name", str, "metadata")
    namespace = _get(meta, "namespace", str, "metadata", "default")
    digest = hashlib.sha256(raw).hexdigest()
    uid = _get(meta, "uid", str, "metadata", str(uuid.UUID(digest[:32])))
    host_paths: dict[str, tuple[str, str]] = {}
    for i, vol in enumerate(_get(spec, "volumes", list, "spec", [])):
        where = f"spec.volumes[{i}]"
        vname = _get(vol, "name", str, where)
        hp = vol.get("hostPath") if isinstance(vol, dict) else None
        if not isinstance(hp, dict):
            raise ValueError(f"{where} ({vname}): only hostPath volumes are supported")
        hpath = _get(hp, "path", str, f"{where}.hostPath")
        htype = _get(hp, "type", str, f"{where}.hostPath", "")
        if not hpath.startswith("/"):
            raise ValueError(f"{where}.hostPath.path: must be absolute")
        if htype not in HOSTPATH_TYPES:
            raise ValueError(f"{where}.hostPath.type: {htype!r} is not supported")
        host_paths[vname] = (hpath, htype)
    containers = []
    for i, c in enumerate(_get(spec, "containers", list, "spec")):
        where = f"spec.containers[{i}]"
        ports = []
        for j, p in enumerate(_get(c, "ports", list, where, [])):
            pw = f"{where}.ports[{j}]"
            protocol = _get(p, "protocol", str, pw, "TCP")
            if protocol not in PROTOCOLS:
                raise ValueError(f"{pw}.protocol: {protocol!r} is not TCP, UDP or SCTP")
            ports.append(
                Port(
                    _get(p, "containerPort", int, pw),
                    _get(p, "hostPort", int, pw, 0),
                    protocol,
                    _get(p, "hostIP", str, pw, ""),
                )
            )
        mounts = []
        for j, m in enumerate(_get(c, "volumeMounts", list, where, [])):
            mw = f"{where}.volumeMounts[{j}]"
            mname = _get(m, "name", str, mw)
            if mname not in host_paths:
                raise ValueError(f"{mw}.name: no volume {mname!r} in spec.volumes")
            propagation = _get(m, "mountPropagation", str, mw, "")
            if propagation not in PROPAGATION:
                raise ValueError(f"{mw}.mountPropagation: {propagation!r} is not supported")
            mounts.append(
                VolumeMount(
                    mname,
                    _get(m, "mountPath", str, mw),
                    _get(m, "readOnly", bool, mw, False),
                    propagation,
                )
            )
        env = tuple(
            (_get(e, "name", str, f"{where}.env"), _get(e, "value", str, f"{where}.env", ""))
            for e in _get(c, "env", list, where, [])
        )
        containers.append(
            Container(
                _get(c, "name", str, where),
                _get(c, "image", str, where),
                _strings(c, "command", where),
                _strings(c, "args", where),
                _get(c, "workingDir", str, where, ""),
                env,
                tuple(ports),
                tuple(mounts),
            )
        )
    if not containers:
        raise ValueError("spec.containers: at least one container is required")
    return Pod(
        name,
        namespace,
        uid,
        _get(spec, "hostNetwork", bool, "spec", False),
        tuple(containers),
        host_paths,
        grace=_get(spec, "terminationGracePeriodSeconds", int, "spec", 30),
        source=str(path),
    )


# ---- the status file and health ----------------------------------------------------------------


class Report:
    """What the stand-in knows, written to the status file after every change, and its health
    as /healthz serves it."""

    def __init__(self, path: str, endpoint: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.doc: dict[str, Any] = {
            "endpoint": endpoint,
            "state": "starting",
            "healthy": False,
            "failure": None,
            "attempt": 0,
            "pods": [],
            "steps": [],
            "pod_ip": None,
            "sandbox": None,
            "conditions": {},
            "pid": os.getpid(),
        }
        self.reason = "no pod probe has run yet"

    def update(self, **values: Any) -> None:
        with self.lock:
            self.doc.update(values)
            self._write()

    def health(self) -> tuple[bool, str]:
        with self.lock:
            return bool(self.doc["healthy"]), self.reason

    def set_health(self, healthy: bool, reason: str) -> None:
        with self.lock:
            self.doc["healthy"] = healthy
            self.reason = reason
            self._write()

    def _write(self) -> None:
        self.doc["time"] = time.time()
        if not self.path:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as fh:
                json.dump(self.doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log(f"cannot write {self.path}: {exc}")


def serve_healthz(report: Report, address: str, port: int) -> http.server.HTTPServer | None:
    """Serve ``GET /healthz`` (200 ``ok`` or 500 and the reason) on ``address:port`` in a
    thread; None (logged) when the port cannot be bound."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self._answer(404, "not found")
                return
            healthy, reason = report.health()
            if healthy:
                self._answer(200, "ok")
            else:
                self._answer(500, reason)

        def _answer(self, code: int, text: str) -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        server = http.server.ThreadingHTTPServer((address, port), Handler)
    except OSError as exc:
        log(f"healthz: cannot listen on {address}:{port}: {exc}")
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"healthz on http://{address}:{port}/healthz")
    return server


# ---- the pod probe -----------------------------------------------------------------------------


def node_ip(flag: str) -> str:
    """``--node-ip``, else the source address the kernel picks for the default route."""
    if flag:
        return flag
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only a route lookup, nothing is sent
        except OSError as exc:
            raise StepFailed(
                "hostPort", f"no default route to take the node IP from ({exc}); give --node-ip"
            ) from None
        return str(sock.getsockname()[0])


class Prober:
    """One probe attempt over the runtime at ``endpoint``, recording into ``report``."""

    def __init__(self, args: argparse.Namespace, report: Report, attempt: int) -> None:
        self.args = args
        self.report = report
        self.attempt = attempt
        self.channel = channel(args.container_runtime_endpoint)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.steps: list[dict[str, Any]] = []
        self.pods: list[dict[str, Any]] = []

    def close(self) -> None:
        self.channel.close()

    def publish(self) -> None:
        first = self.pods[0] if self.pods else {}
        self.report.update(
            steps=self.steps,
            pods=self.pods,
            pod_ip=first.get("pod_ip"),
            sandbox=first.get("sandbox"),
        )

    @contextmanager
    def step(self, pod: dict[str, Any], name: str, what: str = "") -> Iterator[dict[str, Any]]:
        """Time the step ``name``; the body may set ``detail``; an exception fails it."""
        if stop.is_set():
            raise Stopped()
        started = time.monotonic()
        entry: dict[str, Any] = {"pod": pod.get("key", ""), "step": name, "detail": what}
        try:
            yield entry
        except grpc.RpcError as exc:
            raise self._failed(pod, entry, started, rpc_error(exc)) from None
        except StepFailed as exc:
            raise self._failed(pod, entry, started, exc.error) from None
        except OSError as exc:
            raise self._failed(pod, entry, started, str(exc)) from None
        entry["seconds"] = round(time.monotonic() - started, 3)
        self.steps.append(entry)
        pod.setdefault("steps", []).append(entry)
        detail = f" {entry['detail']}" if entry["detail"] else ""
        where = f"{pod['key']}: " if pod.get("key") else ""
        log(f"{where}{name}{detail} ({entry['seconds']:.2f}s)")
        self.publish()

    def _failed(
        self, pod: dict[str, Any], entry: dict[str, Any], started: float, error: str
    ) -> StepFailed:
        entry["seconds"] = round(time.monotonic() - started, 3)
        entry["error"] = error
        self.steps.append(entry)
        pod.setdefault("steps", []).append(entry)
        pod["failure"] = {"pod": pod.get("key", ""), "step": entry["step"], "error": error}
        where = f"{pod['key']}: " if pod.get("key") else ""
        log(f"{where}{entry['step']} FAILED after {entry['seconds']:.2f}s: {error}")
        self.publish()
        return StepFailed(entry["step"], error)

    # -- the runtime's state

    def status(self, pod: dict[str, Any], network: bool) -> None:
        deadline = time.monotonic() + self.args.timeout
        with self.step(pod, "Status") as entry:
            while True:
                r = self.rt.Status(api_pb2.StatusRequest(), timeout=10)
                conditions = {c.type: c for c in r.status.conditions}
                self.report.update(conditions={t: c.status for t, c in conditions.items()})
                missing = ""
                for name in ("RuntimeReady", "NetworkReady") if network else ("RuntimeReady",):
                    c = conditions.get(name)
                    if c is None:
                        missing = f"{name} not reported"
                    elif not c.status:
                        missing = f"{name} false: {c.message or c.reason}"
                    if missing:
                        break
                if not missing:
                    entry["detail"] = " ".join(f"{t}={c.status}" for t, c in conditions.items())
                    return
                if time.monotonic() >= deadline:
                    raise StepFailed("Status", f"{missing} after {self.args.timeout:g}s")
                if stop.wait(0.2):
                    raise Stopped()

    # -- a pod from a manifest

    def run_pod(self, pod: Pod) -> None:
        rec: dict[str, Any] = {
            "key": pod.key,
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
            "manifest": pod.source,
            "host_network": pod.host_network,
            "pod_ip": None,
            "sandbox": None,
            "steps": [],
            "failure": None,
        }
        self.pods.append(rec)
        self.status(rec, network=not pod.host_network)
        image_ids = {}
        for c in pod.containers:
            with self.step(rec, "ImageStatus", c.image) as entry:
                r = self.images.ImageStatus(
                    api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=c.image)), timeout=10
                )
                if not r.HasField("image") or not r.image.id:
                    raise StepFailed(
                        "ImageStatus",
                        f"image {c.image} is not present in the CRI daemon (imagePullPolicy "
                        "Never: the stand-in pulls nothing; preload it)",
                    )
                image_ids[c.name] = r.image.id
                entry["detail"] = f"{c.image}: present ({r.image.id[:19]}, no pull)"
        if pod.host_paths:
            with self.step(rec, "volumes") as entry:
                entry["detail"] = ", ".join(
                    f"{n}={self.host_path(p, t)}" for n, (p, t) in pod.host_paths.items()
                )
        self.remove_leftovers(rec, pod.uid)
        log_dir = os.path.join(self.args.pod_logs_dir, f"{pod.namespace}_{pod.name}_{pod.uid}")
        labels = {
            "io.kubernetes.pod.name": pod.name,
            "io.kubernetes.pod.namespace": pod.namespace,
            "io.kubernetes.pod.uid": pod.uid,
            "bootstrap.kubelet-standin": "probe",
        }
        ns = api_pb2.NamespaceOption(
            network=api_pb2.NODE if pod.host_network else api_pb2.POD,
            pid=api_pb2.CONTAINER,
            ipc=api_pb2.POD,
        )
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name=pod.name, uid=pod.uid, namespace=pod.namespace, attempt=self.attempt
            ),
            # a host-network sandbox shares the node's UTS namespace: no hostname then
            hostname="" if pod.host_network else pod.name,
            log_directory=log_dir,
            port_mappings=[
                api_pb2.PortMapping(
                    protocol=PROTOCOLS[p.protocol],
                    container_port=p.container_port,
                    host_port=p.host_port,
                    host_ip=p.host_ip,
                )
                for c in pod.containers
                for p in c.ports
                if p.host_port
            ],
            labels=labels,
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=self.args.pod_cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(namespace_options=ns),
            ),
        )
        sid = ""
        cids: list[str] = []
        try:
            with self.step(rec, "RunPodSandbox") as entry:
                os.makedirs(log_dir, exist_ok=True)
                sid = self.rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=config), timeout=120
                ).pod_sandbox_id
                rec["sandbox"] = sid
                net = "host network" if pod.host_network else "own network namespace"
                entry["detail"] = f"{sid[:12]} ({net})"
            with self.step(rec, "PodSandboxStatus") as entry:
                st = self.rt.PodSandboxStatus(
                    api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10
                ).status
                if st.state != api_pb2.SANDBOX_READY:
                    raise StepFailed("PodSandboxStatus", f"sandbox state {st.state}, not ready")
                ip = st.network.ip
                if not pod.host_network and not ip:
                    raise StepFailed("PodSandboxStatus", "the pod has no IP")
                rec["pod_ip"] = ip or None
                entry["detail"] = f"pod IP {ip or '(host network)'}"
            for c in pod.containers:
                cid = self.create(rec, pod, c, sid, config, image_ids[c.name], labels, ns)
                cids.append(cid)
            for c, cid in zip(pod.containers, cids, strict=True):
                self.check_log(rec, log_dir, c, cid)
            self.exec_and_host_path(rec, pod, cids[0])
            self.host_ports(rec, pod)
        finally:
            self.teardown(rec, sid, cids, log_dir, pod.grace)

    def host_path(self, path: str, kind: str) -> str:
        """Check or create the hostPath ``path`` as the kubelet does for its ``type``."""
        if kind == "DirectoryOrCreate":
            os.makedirs(path, mode=0o755, exist_ok=True)
        elif kind == "FileOrCreate" and not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a"):
                pass
            os.chmod(path, 0o644)
        if not kind:
            return f"{path} (unchecked)"
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise StepFailed("volumes", f"hostPath {path} ({kind}) does not exist") from None
        want = {
            "DirectoryOrCreate": stat.S_ISDIR,
            "Directory": stat.S_ISDIR,
            "FileOrCreate": stat.S_ISREG,
            "File": stat.S_ISREG,
            "Socket": stat.S_ISSOCK,
            "CharDevice": stat.S_ISCHR,
            "BlockDevice": stat.S_ISBLK,
        }[kind]
        if not want(mode):
            raise StepFailed("volumes", f"hostPath {path} is not a {kind}")
        return path

    def remove_leftovers(self, rec: dict[str, Any], uid: str) -> None:
        """Stop and remove sandboxes of this pod's uid left by an earlier run (a kill -9)."""
        found = self.rt.ListPodSandbox(
            api_pb2.ListPodSandboxRequest(
                filter=api_pb2.PodSandboxFilter(label_selector={"io.kubernetes.pod.uid": uid})
            ),
            timeout=10,
        ).items
        if not found:
            return
        with self.step(rec, "cleanup", f"{len(found)} sandbox(es) of an earlier run"):
            for sandbox in found:
                self.rt.StopPodSandbox(
                    api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=60
                )
                self.rt.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id), timeout=60
                )

    def create(
        self,
        rec: dict[str, Any],
        pod: Pod,
        c: Container,
        sid: str,
        sandbox_config: Any,
        image_id: str,
        labels: dict[str, str],
        ns: Any,
    ) -> str:
        with self.step(rec, "CreateContainer", c.name) as entry:
            config = api_pb2.ContainerConfig(
                metadata=api_pb2.ContainerMetadata(name=c.name, attempt=0),
                image=api_pb2.ImageSpec(image=image_id),
                command=list(c.command),
                args=list(c.args),
                working_dir=c.working_dir,
                envs=[api_pb2.KeyValue(key=k, value=v) for k, v in c.env],
                mounts=[
                    api_pb2.Mount(
                        container_path=m.mount_path,
                        host_path=pod.host_paths[m.name][0],
                        readonly=m.read_only,
                        propagation=PROPAGATION[m.propagation],
                    )
                    for m in c.mounts
                ],
                labels={**labels, "io.kubernetes.container.name": c.name},
                log_path=f"{c.name}/0.log",
                linux=api_pb2.LinuxContainerConfig(
                    security_context=api_pb2.LinuxContainerSecurityContext(namespace_options=ns)
                ),
            )
            cid = self.rt.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=sid, config=config, sandbox_config=sandbox_config
                ),
                timeout=60,
            ).container_id
            entry["detail"] = f"{c.name} {cid[:12]}"
        with self.step(rec, "StartContainer", c.name):
            self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)
        return str(cid)

    def check_log(self, rec: dict[str, Any], log_dir: str, c: Container, cid: str) -> None:
        path = os.path.join(log_dir, c.name, "0.log")
        with self.step(rec, "log", path) as entry:
            deadline = time.monotonic() + min(self.args.timeout, 30)
            while True:
                try:
                    with open(path, "rb") as fh:
                        first = fh.readline()
                except FileNotFoundError:
                    first = b""
                if first.endswith(b"\n"):
                    # CRI log format: TIME STREAM TAG MESSAGE
                    message = first.decode(errors="replace").rstrip("\n").split(" ", 3)[-1]
                    entry["detail"] = f"{path}: {message[:120]!r}"
                    rec.setdefault("logs", {})[c.name] = message[:500]
                    return
                st = self.rt.ContainerStatus(
                    api_pb2.ContainerStatusRequest(container_id=cid), timeout=10
                ).status
                if st.state == api_pb2.CONTAINER_EXITED:
                    raise StepFailed(
                        "log",
                        f"container {c.name} exited ({st.exit_code}, {st.reason}) without "
                        f"writing {path}",
                    )
                if time.monotonic() >= deadline:
                    raise StepFailed("log", f"{path} has no complete line")
                if stop.wait(0.1):
                    raise Stopped()

    def exec_and_host_path(self, rec: dict[str, Any], pod: Pod, cid: str) -> None:
        c = pod.containers[0]
        target = next(
            (
                m
                for m in c.mounts
                if not m.read_only
                and pod.host_paths[m.name][1] in ("Directory", "DirectoryOrCreate")
            ),
            None,
        )
        token = uuid.uuid4().hex
        if target is None:
            script = "echo ok"
        else:
            script = f"echo {token} > {target.mount_path}/{PROBE_FILE} && echo ok"
        with self.step(rec, "ExecSync", f"{c.name}: sh -c {script!r}") as entry:
            r = self.rt.ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=30),
                timeout=40,
            )
            out = r.stdout.decode(errors="replace").strip()
            if r.exit_code != 0 or out != "ok":
                err = r.stderr.decode(errors="replace").strip()
                raise StepFailed(
                    "ExecSync", f"exit {r.exit_code}, stdout {out!r}, stderr {err[:200]!r}"
                )
            entry["detail"] = f"{c.name}: exit 0, {out!r}"
        if target is None:
            return
        host = os.path.join(pod.host_paths[target.name][0], PROBE_FILE)
        with self.step(rec, "hostPath", host) as entry:
            try:
                seen = Path(host).read_text().strip()
            except FileNotFoundError:
                raise StepFailed(
                    "hostPath",
                    f"{host}: not there (the container wrote {target.mount_path}/{PROBE_FILE})",
                ) from None
            if seen != token:
                raise StepFailed("hostPath", f"{host} holds {seen[:40]!r}, not the token")
            os.unlink(host)
            entry["detail"] = f"{target.mount_path}/{PROBE_FILE} in the pod is {host} here"

    def host_ports(self, rec: dict[str, Any], pod: Pod) -> None:
        ports = [p for c in pod.containers for p in c.ports if p.host_port]
        if not ports:
            return
        ip = ""
        for p in ports:
            if p.protocol != "TCP":
                log(f"{pod.key}: hostPort {p.host_port}/{p.protocol}: only TCP is checked")
                continue
            with self.step(rec, "hostPort", f"{p.host_port}->{p.container_port}") as entry:
                ip = ip or p.host_ip or node_ip(self.args.node_ip)
                entry["detail"] = self.reach(ip, p.host_port, p.container_port)

    def reach(self, ip: str, port: int, container_port: int) -> str:
        """An HTTP GET to ``ip:port`` until something answers (the server may still start)."""
        deadline = time.monotonic() + min(self.args.timeout, 30)
        last = ""
        while True:
            try:
                with socket.create_connection((ip, port), timeout=3) as sock:
                    sock.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
                    answer = sock.recv(256).decode(errors="replace")
                if answer:
                    line = answer.splitlines()[0]
                    return f"{ip}:{port} -> :{container_port} answered {line!r}"
                last = "connection closed without an answer"
            except OSError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise StepFailed("hostPort", f"{ip}:{port}: {last}")
            if stop.wait(0.2):
                raise Stopped()

    def teardown(
        self, rec: dict[str, Any], sid: str, cids: list[str], log_dir: str, grace: int = 30
    ) -> None:
        """Stop and remove what was made, also after a failure (then the failing step's error
        is what the report keeps and a teardown error is only logged); a teardown error after
        a pass fails the probe."""
        prior = rec.get("failure") is not None
        first_error: StepFailed | None = None
        calls: list[tuple[str, Callable[[], Any]]] = []
        for cid in cids:
            calls.append(
                (
                    "StopContainer",
                    functools.partial(
                        self.rt.StopContainer,
                        api_pb2.StopContainerRequest(container_id=cid, timeout=grace),
                        timeout=grace + 30,
                    ),
                )
            )
            calls.append(
                (
                    "RemoveContainer",
                    functools.partial(
                        self.rt.RemoveContainer,
                        api_pb2.RemoveContainerRequest(container_id=cid),
                        timeout=60,
                    ),
                )
            )
        if sid:
            calls.append(
                (
                    "StopPodSandbox",
                    lambda: self.rt.StopPodSandbox(
                        api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60
                    ),
                )
            )
            calls.append(
                (
                    "RemovePodSandbox",
                    lambda: self.rt.RemovePodSandbox(
                        api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60
                    ),
                )
            )
        for name, call in calls:
            started = time.monotonic()
            entry: dict[str, Any] = {"pod": rec["key"], "step": name, "detail": ""}
            try:
                call()
            except grpc.RpcError as exc:
                if prior or first_error is not None:
                    log(f"{rec['key']}: {name} failed: {rpc_error(exc)}")
                else:
                    first_error = self._failed(rec, entry, started, rpc_error(exc))
                continue
            entry["seconds"] = round(time.monotonic() - started, 3)
            self.steps.append(entry)
            rec["steps"].append(entry)
            log(f"{rec['key']}: {name} ({entry['seconds']:.2f}s)")
        shutil.rmtree(log_dir, ignore_errors=True)
        if sid:
            log(f"{rec['key']}: pod sandbox {sid[:12]} stopped and removed")
        self.publish()
        if first_error is not None:
            raise first_error

    # -- no manifest: the host-network sandbox probe

    def host_network_probe(self) -> None:
        uid = uuid.uuid4().hex
        rec: dict[str, Any] = {
            "key": "bootstrap/standin-probe",
            "name": "standin-probe",
            "namespace": "bootstrap",
            "uid": uid,
            "manifest": None,
            "host_network": True,
            "pod_ip": None,
            "sandbox": None,
            "steps": [],
            "failure": None,
        }
        self.pods.append(rec)
        self.status(rec, network=False)
        log_dir = os.path.join(self.args.pod_logs_dir, f"bootstrap_standin-probe_{uid}")
        config = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(
                name="standin-probe", uid=uid, namespace="bootstrap", attempt=0
            ),
            log_directory=log_dir,
            labels={"io.kubernetes.pod.uid": uid, "bootstrap.kubelet-standin": "probe"},
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=self.args.pod_cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(network=api_pb2.NODE)
                ),
            ),
        )
        sid = ""
        try:
            with self.step(rec, "RunPodSandbox") as entry:
                sid = self.rt.RunPodSandbox(
                    api_pb2.RunPodSandboxRequest(config=config), timeout=120
                ).pod_sandbox_id
                rec["sandbox"] = sid
                entry["detail"] = f"{sid[:12]} (host network)"
        finally:
            self.teardown(rec, sid, [], log_dir)


def manifests(directory: str) -> list[Path]:
    try:
        return sorted(p for p in Path(directory).glob("*.json") if p.is_file())
    except OSError:
        return []


def probe(args: argparse.Namespace, report: Report, attempt: int) -> bool:
    """One probe attempt over every manifest (or the host-network sandbox); True when all
    passed. The report says what happened."""
    report.update(state="probing", attempt=attempt, failure=None)
    prober = Prober(args, report, attempt)
    started = time.monotonic()
    try:
        paths = manifests(args.pod_manifest_path)
        if not paths:
            log(f"no static pod manifests in {args.pod_manifest_path}: host-network sandbox probe")
            prober.host_network_probe()
        for path in paths:
            try:
                pod = parse_pod(path)
            except (ValueError, OSError) as exc:
                rec: dict[str, Any] = {
                    "key": path.name,
                    "manifest": str(path),
                    "steps": [],
                    "failure": None,
                }
                prober.pods.append(rec)
                with prober.step(rec, "manifest", str(path)):
                    raise StepFailed("manifest", f"{path}: {exc}") from None
            prober.run_pod(pod)
    except StepFailed as exc:
        failure = next((p["failure"] for p in prober.pods if p.get("failure")), None)
        failure = failure or {"pod": "", "step": exc.step, "error": exc.error}
        report.update(state="failed", failure=failure)
        report.set_health(False, f"{failure['pod']} {failure['step']}: {failure['error']}".strip())
        return False
    except grpc.RpcError as exc:  # a call outside any step (ListPodSandbox)
        failure = {"pod": "", "step": "CRI", "error": rpc_error(exc)}
        report.update(state="failed", failure=failure)
        report.set_health(False, f"CRI: {failure['error']}")
        return False
    except Stopped:
        raise
    except Exception as exc:  # a bug here must not end the stand-in: report it, retry
        log(f"probe failed unexpectedly: {exc!r}")
        failure = {"pod": "", "step": "internal", "error": repr(exc)}
        report.update(state="failed", failure=failure)
        report.set_health(False, f"internal error: {exc!r}")
        return False
    finally:
        prober.close()
    pods = ", ".join(f"{p['key']} ({p['pod_ip'] or 'host network'})" for p in prober.pods)
    log(f"pod probe passed in {time.monotonic() - started:.2f}s: {pods}")
    report.update(state="ok", failure=None)
    report.set_health(True, "ok")
    return True


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--container-runtime-endpoint", required=True)
    p.add_argument("--status-file", default=STATUS_FILE)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--pod-cgroup-parent", default="", help="cgroup_parent of the probe pods")
    p.add_argument("--pod-manifest-path", default=MANIFESTS)
    p.add_argument("--pod-logs-dir", default=POD_LOGS)
    p.add_argument("--node-ip", default="")
    p.add_argument("--healthz-bind-address", default="127.0.0.1")
    p.add_argument("--healthz-port", type=int, default=10248)
    args, unknown = p.parse_known_args()
    if unknown:
        log(f"ignoring kubelet flags: {' '.join(unknown)}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    endpoint = args.container_runtime_endpoint
    report = Report(args.status_file, endpoint)
    server = (
        serve_healthz(report, args.healthz_bind_address, args.healthz_port)
        if (args.healthz_port)
        else None
    )

    def version(timeout: float = 2) -> Any:
        with channel(endpoint) as ch:
            return api_pb2_grpc.RuntimeServiceStub(ch).Version(
                api_pb2.VersionRequest(version="v1"), timeout=timeout
            )

    started = time.monotonic()
    deadline = started + args.timeout
    while True:
        try:
            v = version()
            break
        except grpc.RpcError as exc:
            if time.monotonic() >= deadline or stop.is_set():
                log(f"Version failed for {args.timeout:g}s: {rpc_error(exc)}")
                return 0 if stop.is_set() else 1
            report.set_health(False, f"CRI Version: {rpc_error(exc)}")
            stop.wait(0.2)
    log(
        f"CRI version: {v.runtime_name} {v.runtime_version} (API {v.runtime_api_version}) "
        f"after {time.monotonic() - started:.2f}s"
    )
    report.update(
        runtime_name=v.runtime_name,
        runtime_version=v.runtime_version,
        runtime_api_version=v.runtime_api_version,
    )
    if sd_notify("READY=1"):
        log("sent READY=1")
    attempt = 0
    passed = False
    while not stop.is_set():
        if not passed:
            try:
                passed = probe(args, report, attempt)
            except Stopped:
                break
            attempt += 1
            if passed:
                log("ready")
        if stop.wait(args.interval):
            break
        try:
            version(timeout=5)
        except grpc.RpcError as exc:
            log(f"Version failed: {rpc_error(exc)}")
            report.update(
                state="failed", failure={"pod": "", "step": "Version", "error": rpc_error(exc)}
            )
            report.set_health(False, f"CRI Version: {rpc_error(exc)}")
            passed = False
    log("stopping")
    if server is not None:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
