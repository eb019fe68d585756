"""Offline test images for the node: a CRI daemon built from Debian's containerd, and a kubelet
stand-in that speaks CRI over gRPC — a thin test layer over the product's builders in
:mod:`bootstrap.demo.images` (one implementation), cached under ``.cache/cri/`` (rebuilt when
their inputs change: the .deb files, the grpcio/protobuf versions, the stand-in's sources).

Contract::

    cri_daemon_image() -> CachedImage      # layout, tag "containerd"; see CRI_SOCKET
    cri_daemon_builder() -> (key, build)   # build(layout) writes it anew (reproducibility)
    kubelet_standin_image() -> CachedImage # layout, tag "standin"; entrypoint STANDIN_KUBELET
    pause_archive() -> Path                # docker-archive of the busybox "pause" image
    host_daemon_config(rootfs, dirs, args) -> dict   # config.json for a plain `runc run` test
    stubs() -> (api_pb2, api_pb2_grpc)     # the generated CRI v1 modules
    cri_version(socket, timeout) -> dict   # call CRI Version from the host with the stubs

What the images hold is described in :mod:`bootstrap.demo.images`; the stand-in's program is
``bootstrap/demo/kubelet_standin/`` (``/opt/standin`` in the image).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from bootstrap.demo import demo, images
from bootstrap.demo.images import (  # noqa: F401  (re-exported: part of this module's contract)
    CONTAINERD_CONFIG,
    CRI_SOCKET,
    DAEMON_DEBS,
    DAEMON_TAG,
    OCID_START,
    PAUSE_IMAGE,
    STANDIN_DEBS,
    STANDIN_KUBELET,
    STANDIN_SKIP,
    STANDIN_TAG,
    STANDIN_WRAPPER,
    CachedImage,
)
from bootstrap.runtime.config import DEFAULT_MOUNTS

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "cri"
STANDIN_SRC = demo.STANDIN_SRC


def pause_archive() -> Path:
    """A docker-archive of a busybox ``sleep infinity`` image named :data:`PAUSE_IMAGE`."""
    return images.pause_archive(CACHE)


def cri_daemon_image() -> CachedImage:
    """The containerd CRI daemon image, tagged :data:`DAEMON_TAG`."""
    return images.cri_daemon_image(CACHE)


def cri_daemon_builder() -> tuple[str, Any]:
    """(cache key, a function building the CRI daemon image into a given OCI layout)."""
    return images.cri_daemon_builder(CACHE)


def kubelet_standin_image() -> CachedImage:
    """The kubelet stand-in image, tagged :data:`STANDIN_TAG`."""
    return images.kubelet_standin_image(CACHE, STANDIN_SRC)


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


def host_daemon_config(rootfs: Path, dirs: dict[str, Path], args: Sequence[str]) -> dict[str, Any]:
    """A runc ``config.json`` running the CRI daemon image on this host without systemd (RECIPES'
    config: bounding-set caps, no rlimits, host network, own pid namespace, /sys rw and
    /sys/fs/cgroup rbind rw over the product's other ``DEFAULT_MOUNTS``, rw binds of ``dirs``
    (container path -> host path), the host's /etc/hosts and /etc/resolv.conf)."""
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
    for f in ("/etc/hosts", "/etc/resolv.conf"):
        mounts.append({"destination": f, "type": "bind", "source": f, "options": ["bind", "ro"]})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [images.DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": {
                k: caps for k in ("bounding", "effective", "permitted", "inheritable")
            },
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}],
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
