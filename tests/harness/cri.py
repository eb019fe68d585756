"""Offline test images for the node: a CRI daemon built from Debian's containerd, a kubelet
stand-in that speaks CRI over gRPC, the CNI plugins, and the pod images (pause, busybox) — a
thin test layer over the product's recipes in :mod:`bootstrap.demo.images` (one
implementation), cached under ``.cache/cri/`` (rebuilt when their inputs change: the .deb files,
the files under images/demo/, the grpcio/protobuf versions, the recipe code).

Contract::

    cri_daemon_image() -> CachedImage      # layout, tag "containerd"; see CRI_SOCKET
    kubelet_standin_image() -> CachedImage # layout, tag "standin"; entrypoint STANDIN_KUBELET
    cni_plugins_image() -> CachedImage     # layout, tag "plugins"; /exports/hostfs/opt/cni/bin
    pause_image() -> CachedImage           # layout, tag "3.9"; pods know it as PAUSE_IMAGE
    pod_image() -> CachedImage             # layout, tag "busybox"; busybox with httpd
    BUILDERS: {kind: builder}              # builder() -> (key, build); build(layout) anew
    ctr_archive(image, name, dest) -> Path # oci-archive named `name`, for `ctr images import`
    host_daemon_config(rootfs, dirs, args) -> dict   # config.json for a plain `runc run` test
    stubs() -> (api_pb2, api_pb2_grpc)     # the generated CRI v1 modules
    cri_version(socket, timeout) -> dict   # call CRI Version from the host with the stubs
    node_netns() -> context of a netns name # NODE_IP on a veth, default route; deleted after
    cni_conflist() -> dict                 # bridge + host-local (POD_SUBNET) + portmap + loopback
    image_variant(image, layout, tag, label=, files=)  # a tag of `image` a label (+ files) apart
    manifest_head(registry_host) -> str    # a node manifest up to "containers:"
    ocid_entry(image, after=, auto_update=, ready_timeout=) -> str  # its containerd CRI daemon

What the images hold is described in :mod:`bootstrap.demo.images`; their files (containerd's
config, the stand-in's program, ...) are under ``images/demo/``. CRI_SOCKET and PAUSE_IMAGE are
read from the CRI daemon image's containerd config there.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tarfile
import tomllib
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

from bootstrap.demo import images
from bootstrap.demo.images import (  # noqa: F401  (re-exported: part of this module's contract)
    DAEMON_DEBS,
    STANDIN_KUBELET,
    CachedImage,
)
from bootstrap.demo.oci import DEFAULT_PATH_ENV, MTIME
from bootstrap.image.model import REF_NAME_ANNOTATION
from bootstrap.runtime.config import DEFAULT_MOUNTS

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "cri"
STANDIN_SRC = images.CONTENT / "kubelet-standin"
"""The kubelet stand-in's program (``main.py``) and wrapper, copied into its image."""
CONTAINERD_CONFIG = (images.CONTENT / "ocid" / "config.toml").read_text()
"""The CRI daemon image's containerd config (also in its /exports/hostfs)."""
_CONTAINERD = tomllib.loads(CONTAINERD_CONFIG)
CRI_SOCKET: str = _CONTAINERD["grpc"]["address"]
PAUSE_IMAGE: str = _CONTAINERD["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"]
"""The sandbox image containerd is configured with (bootstrap preloads it; never pulled)."""


def cri_daemon_image() -> CachedImage:
    """The containerd CRI daemon image, tagged ``containerd``."""
    return images.image("ocid", CACHE)


def cni_plugins_image() -> CachedImage:
    """The CNI plugins image, tagged ``plugins``."""
    return images.image("cni", CACHE)


def pause_image() -> CachedImage:
    """The sandbox image (``catatonit -P``), tagged ``3.9``."""
    return images.image("pause", CACHE)


def pod_image() -> CachedImage:
    """The busybox pod image (with ``httpd``), tagged ``busybox``."""
    return images.image("busybox", CACHE)


def kubelet_standin_image() -> CachedImage:
    """The kubelet stand-in image, tagged ``standin``."""
    return images.image("kubelet-standin", CACHE)


BUILDERS: dict[str, Callable[[], tuple[str, Callable[[Path], None]]]] = {
    kind: partial(images.builder, kind, CACHE) for kind in ("ocid", "cni", "pause", "busybox")
}
"""Builders of the images above by kind: ``(cache key, build(new_layout))``."""
CACHED: dict[str, Callable[[], CachedImage]] = {
    kind: partial(images.image, kind, CACHE) for kind in BUILDERS
}


def ctr_archive(image: CachedImage, name: str, dest: Path) -> Path:
    """``image`` as an ``oci-archive`` at ``dest`` whose index names it ``name`` (as
    ``org.opencontainers.image.ref.name`` and containerd's ``io.containerd.image.name``), which
    ``ctr images import`` takes as the image's name — the form bootstrap hands a CRI daemon."""
    index = json.loads((image.layout / "index.json").read_text())
    entry = next(
        m for m in index["manifests"] if m["annotations"][REF_NAME_ANNOTATION] == image.tag
    )
    names = {REF_NAME_ANNOTATION: name, "io.containerd.image.name": name}
    entry = {**entry, "annotations": names}
    with tarfile.open(dest, "w") as tar:
        tar.add(image.layout / "oci-layout", "oci-layout")
        doc = json.dumps({**index, "manifests": [entry]}).encode()
        info = tarfile.TarInfo("index.json")
        info.size = len(doc)
        tar.addfile(info, io.BytesIO(doc))
        tar.add(image.layout / "blobs", "blobs")
    return dest


# ---- running the daemon on the host, talking to it ---------------------------------------------


def bounding_caps() -> list[str]:
    """Every capability in this process's bounding set, as ``CAP_*`` names (a runc config may
    only ask for these)."""
    names = [
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
        "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
        "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
        "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
        "PERFMON", "BPF", "CHECKPOINT_RESTORE",
    ]  # fmt: skip
    status = Path("/proc/self/status").read_text()
    bnd = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapBnd:")), 16)
    return [f"CAP_{n}" for i, n in enumerate(names) if bnd >> i & 1]


def host_daemon_config(
    rootfs: Path,
    dirs: dict[str, Path],
    args: Sequence[str],
    *,
    netns: str | None = None,
    ro: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """A runc ``config.json`` running the CRI daemon image on this host without systemd (RECIPES'
    config: bounding-set caps, no rlimits, own pid namespace, /sys rw and /sys/fs/cgroup rbind
    rw over the product's other ``DEFAULT_MOUNTS``, rw binds of ``dirs`` and read-only binds of
    ``ro`` (container path -> host path), the host's /etc/hosts and /etc/resolv.conf). The
    network is the host's, or the network namespace ``netns`` (a name under /run/netns)."""
    caps = bounding_caps()
    overrides: dict[str, dict[str, Any]] = {  # containerd writes both
        "/sys": {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid"]},
        "/sys/fs/cgroup": {
            "destination": "/sys/fs/cgroup",
            "type": "bind",
            "source": "/sys/fs/cgroup",
            "options": ["rbind", "rw"],
        },
    }
    mounts = [overrides.get(m["destination"], copy.deepcopy(m)) for m in DEFAULT_MOUNTS]
    for dest, src in dirs.items():
        mounts.append(
            {"destination": dest, "type": "bind", "source": str(src), "options": ["rbind", "rw"]}
        )
    for dest, src in (ro or {}).items():
        mounts.append(
            {"destination": dest, "type": "bind", "source": str(src), "options": ["rbind", "ro"]}
        )
    namespaces: list[dict[str, str]] = [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]
    if netns is not None:
        namespaces.append({"type": "network", "path": f"/run/netns/{netns}"})
    for f in ("/etc/hosts", "/etc/resolv.conf"):
        mounts.append({"destination": f, "type": "bind", "source": f, "options": ["bind", "ro"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": {
                k: caps for k in ("bounding", "effective", "permitted", "inheritable")
            },
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [],
            "readonlyPaths": [],
        },
    }


def stubs() -> tuple[ModuleType, ModuleType]:
    """The product's generated CRI v1 modules ``(api_pb2, api_pb2_grpc)`` (bootstrap/cri/)."""
    from bootstrap.cri import api_pb2, api_pb2_grpc

    return api_pb2, api_pb2_grpc


def cri_version(socket: str | Path, timeout: float = 5.0) -> dict[str, str]:
    """Call ``runtime.v1.RuntimeService/Version`` on the unix ``socket`` with the product's
    stubs; return the response fields. Raises ``grpc.RpcError`` on failure."""
    import grpc

    api_pb2, api_pb2_grpc = stubs()
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        resp = stub.Version(api_pb2.VersionRequest(version="v1"), timeout=timeout)
    return {
        "version": resp.version,
        "runtime_name": resp.runtime_name,
        "runtime_version": resp.runtime_version,
        "runtime_api_version": resp.runtime_api_version,
    }


# ---- a node network inside a network namespace -------------------------------------------------

NODE_IP = "198.51.100.2"
"""The node's address in :func:`node_netns` (its default route's source)."""
POD_SUBNET = "198.51.100.128/25"
POD_IMAGE = "localhost/bootstrap/busybox:httpd"
"""What the tests call :func:`pod_image` when they hand it to a CRI daemon."""


def manifest_head(registry_host: str) -> str:
    """The start of a test node manifest, up to ``containers:``: the loopback registry at
    ``registry_host`` is insecure (plain HTTP) and the mirror of registry.k8s.io (where
    PAUSE_IMAGE is known), and up waits 30 s for the network."""
    return f"""\
version: 1
registries:
  insecure: ["{registry_host}"]
  mirrors:
    registry.k8s.io: ["{registry_host}"]
network:
  timeout: 30
containers:
"""


def ocid_entry(
    image: str, *, after: str = "", auto_update: str = "", ready_timeout: int = 120
) -> str:
    """The node manifest's ``containers:`` entry for the CRI daemon image (:func:`
    cri_daemon_image`) under the shipped ``ocid/`` definition: the ``set:`` values containerd
    needs (its socket, run and state dirs, ``ctr`` as the image import) and readiness when
    CRI_SOCKET answers within ``ready_timeout`` seconds; ``after`` (e.g. ``[cni]``) and
    ``auto_update`` (a policy) when given."""
    lines = [
        "  - name: ocid",
        f"    image: {image}",
        f"    definition: {REPO}/ocid",
        *([f"    after: {after}"] if after else []),
        *([f"    auto_update: {auto_update}"] if auto_update else []),
        "    set:",
        f"      CRI_SOCKET: {CRI_SOCKET}",
        "      CRI_RUN_DIR: /run/containerd",
        "      CRI_STATE_DIR: /var/lib/containerd",
        "      IMAGE_IMPORT: exec ctr -n k8s.io images import -",
        "    ready:",
        f"      cri_socket: {CRI_SOCKET}",
        f"      timeout: {ready_timeout}",
    ]
    return "\n".join(lines) + "\n"


def cni_conflist(name: str = "bootstrap-test") -> dict[str, Any]:
    """A CNI conflist: ``bridge`` (``cni0``, gateway, host-local IPAM on :data:`POD_SUBNET`),
    ``portmap`` (hostPorts) and ``loopback``."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "loopback"},
        ],
    }


@contextlib.contextmanager
def node_netns() -> Iterator[str]:
    """A network namespace standing in for a node's network (never the machine's own), the
    demo machine's (:class:`bootstrap.demo.netns.PrivateNetwork`): ``lo`` up, a veth pair
    inside it with :data:`NODE_IP` and the default route through its peer. Yields its name
    (``/run/netns/NAME``); deleting it at the end takes its links, bridges and iptables rules
    with it."""
    from bootstrap.demo.netns import PrivateNetwork

    net = PrivateNetwork(f"bs-cri-{uuid.uuid4().hex[:8]}")
    net.create()
    try:
        yield net.name
    finally:
        net.destroy()


# ---- variants of an image, for updates -----------------------------------------------------------


def image_variant(
    image: CachedImage,
    layout: Path,
    tag: str,
    *,
    label: str,
    files: dict[str, bytes] | None = None,
) -> None:
    """Tag ``tag`` in the OCI layout ``layout`` (a copy of ``image``'s layout, made on first
    use): ``image`` with the config label ``bootstrap.test.variant=LABEL`` (so a new config and
    manifest digest) and, with ``files``, one more layer holding them (paths relative to the
    rootfs, e.g. ``exports/hostfs/etc/x``; parent directories 0755, files 0644)."""
    import shutil
    import subprocess
    import tempfile

    if not (layout / "index.json").exists():
        shutil.copytree(image.layout, layout)
    base = f"{layout}:{image.tag}"
    if files:
        with tempfile.TemporaryDirectory() as work:
            tar_path = Path(work) / "layer.tar"
            with tarfile.open(tar_path, "w") as tar:
                dirs = sorted({str(p) for f in files for p in Path(f).parents if str(p) != "."})
                for d in dirs:
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    tar.addfile(info)
                for name, data in sorted(files.items()):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, MTIME
                    tar.addfile(info, io.BytesIO(data))
            subprocess.run(
                ["umoci", "raw", "add-layer", "--image", base, "--tag", tag, str(tar_path)],
                check=True,
                capture_output=True,
            )
        base = f"{layout}:{tag}"
    subprocess.run(
        ["umoci", "config", "--image", base, "--tag", tag,
         "--config.label", f"bootstrap.test.variant={label}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
