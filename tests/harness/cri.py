"""Offline test images for the node: a CRI daemon built from Debian's containerd, and a kubelet
stand-in that speaks CRI over gRPC. Both are OCI layouts built with
:mod:`tests.harness.imagebuilder` and cached under ``.cache/cri/`` (rebuilt when their inputs
change: the .deb files, the Python site-packages used, this module and the stand-in's sources).

Contract::

    cri_daemon_image() -> CachedImage      # layout, tag "containerd"; see CRI_SOCKET
    cri_daemon_builder() -> (key, build)   # build(layout) writes it anew (reproducibility)
    kubelet_standin_image() -> CachedImage # layout, tag "standin"; entrypoint STANDIN_KUBELET
    pause_archive() -> Path                # docker-archive of the busybox "pause" image
    host_daemon_config(rootfs, dirs, args) -> dict   # config.json for a plain `runc run` test
    stubs() -> (api_pb2, api_pb2_grpc)     # the generated CRI v1 modules
    cri_version(socket, timeout) -> dict   # call CRI Version from the host with the stubs

The CRI daemon image (RECIPES "A CRI daemon system container from Debian's containerd"):
containerd, runc, libseccomp2, libc6 and tini from ``apt-get download`` + ``dpkg-deb -x`` (one
layer each, so shared layers dedupe), then a layer of ours: static busybox, ``/etc`` basics,
``/etc/containerd/config.toml``, ``/usr/share/ocid/pause.tar`` and ``/usr/local/bin/ocid-start``
(starts containerd, imports the pause image into the ``k8s.io`` namespace once the socket answers,
then waits). Entrypoint ``tini-static -s -g --``, so the daemon's pid namespace reaps its shims.

The kubelet stand-in: Debian's python3.11-minimal (+ its libraries), grpcio and protobuf copied
from this venv's site-packages, and ``tests/harness/kubelet_standin/`` as ``/opt/standin``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bootstrap.locks import flocked
from tests.harness import imagebuilder as ib

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "cri"
STANDIN_SRC = Path(__file__).resolve().parent / "kubelet_standin"

CRI_SOCKET = "/run/containerd/containerd.sock"
PAUSE_IMAGE = "registry.k8s.io/pause:3.6"
DAEMON_TAG = "containerd"
STANDIN_TAG = "standin"

DAEMON_DEBS = ("libc6", "libseccomp2", "containerd", "runc", "tini")
STANDIN_DEBS = (
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11-minimal",
)
"""The stand-in's Python: libpython3.11-stdlib for concurrent.futures (grpc imports it); its other
library dependencies serve extension modules the stand-in never imports, so they are left out."""
STANDIN_SKIP = (
    "usr/share",
    "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu",
)

CONTAINERD_CONFIG = f"""\
# containerd for a node whose CRI daemon is itself a runc system container (bootstrap tests)
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "{CRI_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # sandboxes ask for oom_score_adj -998, which an unprivileged-enough parent may not grant
  restrict_oom_score_adj = true
  disable_apparmor = true
  tolerate_missing_hugetlb_controller = true
  disable_hugetlb_controller = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"""

OCID_START = """\
#!/bin/sh
# Entry point of the test CRI daemon image: containerd, plus the offline "pause" image.
mkdir -p /var/lib/containerd /run/containerd /var/log/pods /tmp
containerd --config /etc/containerd/config.toml &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
i=0
until ctr --address %(socket)s version >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -gt 600 ] && { echo "ocid-start: containerd did not answer" >&2; break; }
  kill -0 "$pid" 2>/dev/null || break
  usleep 100000
done
if ! ctr --address %(socket)s -n k8s.io images check "name==%(pause)s" 2>/dev/null \\
    | grep -q complete; then
  ctr --address %(socket)s -n k8s.io images import /usr/share/ocid/pause.tar >&2 \\
    || echo "ocid-start: importing the pause image failed" >&2
fi
echo "ocid-start: containerd running (pid $pid)" >&2
wait "$pid"
trap - TERM INT
wait "$pid"
""" % {"socket": CRI_SOCKET, "pause": PAUSE_IMAGE}  # noqa: UP031 (shell text full of braces)


STANDIN_KUBELET = "/opt/standin/kubelet"
STANDIN_WRAPPER = """\
#!/bin/sh
# kubelet stand-in: takes kubelet flags, speaks CRI (see /opt/standin/main.py)
exec /usr/bin/python3.11 -u /opt/standin/main.py "$@"
"""


@dataclass(frozen=True)
class CachedImage:
    """An image in a cached OCI layout: ``ref`` is ``oci:LAYOUT:TAG`` for skopeo/umoci."""

    layout: Path
    tag: str
    manifest_digest: str

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


# ---- .debs -------------------------------------------------------------------------------------


@functools.cache
def deb(package: str) -> Path:
    """The .deb of ``package`` (the candidate version) in ``.cache/cri/debs``, downloaded with
    ``apt-get download`` when missing."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
    ).stdout.strip()
    policy = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=True
    ).stdout
    for line in policy.splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
    if not version or version == "(none)":
        raise RuntimeError(f"apt knows no version of {package}: run apt-get update")
    name = f"{package}_{version.replace(':', '%3a')}_*.deb"
    with flocked(debs / ".download.lock", timeout=900, what="apt-get download"):
        found = sorted(debs.glob(name))
        if not found:
            subprocess.run(
                ["apt-get", "download", f"{package}={version}"],
                cwd=debs,
                check=True,
                capture_output=True,
            )
            found = sorted(debs.glob(name))
    if not found:
        raise RuntimeError(f"apt-get download {package}={version} left no {name} ({arch})")
    return found[-1]


def extract_debs(packages: Sequence[str], dest: Path) -> None:
    """``dpkg-deb -x`` each package's .deb into ``dest`` (created)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in packages:
        subprocess.run(["dpkg-deb", "-x", str(deb(p)), str(dest)], check=True)


# ---- trees to layers ---------------------------------------------------------------------------


def _file_stream(path: Path, size: int) -> ib.Stream:
    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    return ib.Stream(size, chunks)


def tree_entries(root: Path, prefix: str = "", skip: Sequence[str] = ()) -> list[ib.Entry]:
    """Layer entries for everything below ``root`` (sorted, deterministic): directories, files
    (streamed from disk), symlinks and hard links, with their modes; owners are root.
    ``prefix`` is prepended to every path; paths starting with one of ``skip`` are left out."""
    entries: list[ib.Entry] = []
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            if _skipped(os.path.join(rel_dir, name), skip):
                continue
            rel = os.path.normpath(os.path.join(prefix, rel_dir, name))
            st = full.lstat()
            mode = st.st_mode & 0o7777
            if full.is_symlink():
                entries.append(ib.Symlink(rel, os.readlink(full)))
            elif full.is_dir():
                entries.append(ib.Dir(rel, mode=mode))
            elif full.is_file():
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in inodes:
                    entries.append(ib.Hardlink(rel, inodes[key]))
                else:
                    inodes[key] = rel
                    entries.append(ib.File(rel, _file_stream(full, st.st_size), mode=mode))
        dirnames[:] = [d for d in dirnames if not _skipped(os.path.join(rel_dir, d), skip)]
    return entries


def _skipped(rel: str, skip: Sequence[str]) -> bool:
    rel = os.path.normpath(rel)
    return any(rel == s or rel.startswith(s + "/") for s in skip)


def _busybox_entries() -> list[ib.Entry]:
    applets = (
        "sh", "sleep", "mkdir", "cat", "echo", "kill", "usleep", "grep", "ls", "ps", "rm", "true",
        "test", "[", "env", "mount", "id",
    )  # fmt: skip
    entries: list[ib.Entry] = [ib.File("bin/busybox", ib.BUSYBOX.read_bytes(), mode=0o755)]
    entries += [ib.Symlink(f"bin/{a}", "busybox") for a in applets]
    return entries


def _etc_entries() -> list[ib.Entry]:
    return [
        ib.File("etc/passwd", b"root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
        ib.File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        ib.File("etc/hosts", b"127.0.0.1 localhost\n"),
        ib.File("etc/resolv.conf", b""),
        ib.File("etc/nsswitch.conf", b"hosts: files dns\n"),
        ib.Dir("proc", mode=0o555),
        ib.Dir("sys", mode=0o555),
        ib.Dir("dev"),
        ib.Dir("run"),
        ib.Dir("tmp", mode=0o1777),
        ib.Dir("var/tmp", mode=0o1777),
        ib.Dir("root", mode=0o700),
    ]  # fmt: skip


def _digest_inputs(*parts: bytes | str | Path) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            h.update(p.name.encode() + b"\0" + p.read_bytes() if p.is_file() else str(p).encode())
        else:
            h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cached_build(kind: str, key: str, tag: str, build: Any) -> CachedImage:
    """Build into ``.cache/cri/KIND-KEY`` once (temp dir + rename); older keys are removed."""
    CACHE.mkdir(parents=True, exist_ok=True)
    final = CACHE / f"{kind}-{key}"
    with flocked(CACHE / f".{kind}.lock", timeout=1800, what=f"building the {kind} test image"):
        if not (final / "index.json").is_file():
            tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".{kind}-"))
            try:
                build(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for old in CACHE.glob(f"{kind}-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    index = json.loads((final / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get(ib.REF_NAME_ANNOTATION) == tag:
            return CachedImage(final, tag, m["digest"])
    raise RuntimeError(f"{final}: no image tagged {tag}")


# ---- the pause image ---------------------------------------------------------------------------


def pause_archive() -> Path:
    """A docker-archive of a busybox ``sleep infinity`` image named :data:`PAUSE_IMAGE`, built
    once into the cache."""
    path = CACHE / "pause.tar"
    CACHE.mkdir(parents=True, exist_ok=True)
    with flocked(CACHE / ".pause.lock", timeout=600, what="building the pause image"):
        if path.is_file():
            return path
        tmp = path.with_name(".pause.tar.tmp")
        spec = ib.ImageSpec(
            layers=[ib.Layer([*_busybox_entries(), *_etc_entries()], compression="none")],
            cmd=("/bin/sleep", "infinity"),
        )
        ib.save_docker_archive(spec, tmp, PAUSE_IMAGE)
        os.replace(tmp, path)
    return path


# ---- the CRI daemon image ----------------------------------------------------------------------


def cri_daemon_image() -> CachedImage:
    """The containerd CRI daemon image (see the module doc), tagged :data:`DAEMON_TAG`."""
    key, build = cri_daemon_builder()
    return _cached_build("ocid", key, DAEMON_TAG, build)


def cri_daemon_builder() -> tuple[str, Callable[[Path], None]]:
    """(cache key, a function building the CRI daemon image into a given OCI layout)."""
    debs = [deb(p) for p in DAEMON_DEBS]
    pause = pause_archive()
    key = _digest_inputs(*(d.name for d in debs), Path(__file__), pause.read_bytes())

    def build(layout: Path) -> None:
        layers = []
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".debs-") as work:
            for package, path in zip(DAEMON_DEBS, debs, strict=True):
                tree = Path(work) / package
                subprocess.run(["dpkg-deb", "-x", str(path), str(tree)], check=True)
                layers.append(ib.Layer(tree_entries(tree, skip=("usr/share/doc", "usr/share/man"))))
            ours = [
                *_busybox_entries(),
                *_etc_entries(),
                ib.File("etc/containerd/config.toml", CONTAINERD_CONFIG.encode()),
                ib.File("usr/share/ocid/pause.tar", pause.read_bytes()),
                ib.File("usr/local/bin/ocid-start", OCID_START.encode(), mode=0o755),
                ib.Dir("var/lib/containerd", mode=0o711),
                ib.Dir("run/containerd", mode=0o711),
                ib.Dir("var/log/pods"),
            ]
            layers.append(ib.Layer(ours))
            spec = ib.ImageSpec(
                layers=layers,
                entrypoint=("/usr/bin/tini-static", "-s", "-g", "--"),
                cmd=("/usr/local/bin/ocid-start",),
                labels={"org.opencontainers.image.title": "bootstrap test CRI daemon (containerd)"},
                stop_signal="SIGTERM",
            )
            ib.build_image(layout, DAEMON_TAG, spec)

    return key, build


# ---- the kubelet stand-in image ----------------------------------------------------------------


def _site_packages() -> Path:
    import grpc

    return Path(grpc.__file__).resolve().parents[1]


def kubelet_standin_image() -> CachedImage:
    """The kubelet stand-in image (see the module doc), tagged :data:`STANDIN_TAG`."""
    packages = STANDIN_DEBS
    debs = [deb(p) for p in packages]
    site = _site_packages()
    py_pkgs = ("grpc", "google", "typing_extensions.py")
    sources = sorted(p for p in STANDIN_SRC.rglob("*.py*") if "__pycache__" not in p.parts)
    versions = subprocess.run(
        [
            sys.executable,
            "-c",
            "import grpc, google.protobuf as p; print(grpc.__version__, p.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = _digest_inputs(*(d.name for d in debs), Path(__file__), versions, *sources)

    def build(layout: Path) -> None:
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".standin-") as work:
            tree = Path(work) / "root"
            extract_debs(packages, tree)
            base = tree_entries(tree, skip=STANDIN_SKIP)
            site_entries: list[ib.Entry] = []
            for name in py_pkgs:
                dest = f"usr/lib/python3/dist-packages/{name}"
                if (site / name).is_dir():
                    site_entries += [ib.Dir(dest), *tree_entries(site / name, prefix=dest)]
                else:
                    size = (site / name).stat().st_size
                    site_entries.append(ib.File(dest, _file_stream(site / name, size)))
            site_entries = [e for e in site_entries if "__pycache__" not in getattr(e, "path", "")]
            app = tree_entries(STANDIN_SRC, prefix="opt/standin")
            app = [e for e in app if "__pycache__" not in getattr(e, "path", "")]
            app.append(ib.File("opt/standin/kubelet", STANDIN_WRAPPER.encode(), mode=0o755))
            spec = ib.ImageSpec(
                layers=[
                    ib.Layer(base),
                    ib.Layer([ib.Dir("usr/lib/python3/dist-packages"), *site_entries]),
                    ib.Layer([*_busybox_entries(), *_etc_entries(), ib.Dir("opt/standin"), *app]),
                ],
                entrypoint=(STANDIN_KUBELET,),
                env=(
                    ib.DEFAULT_PATH_ENV,
                    "PYTHONPATH=/usr/lib/python3/dist-packages:/opt/standin",
                    "PYTHONDONTWRITEBYTECODE=1",
                ),
                labels={"org.opencontainers.image.title": "bootstrap test kubelet stand-in"},
            )
            ib.build_image(layout, STANDIN_TAG, spec)

    return _cached_build("standin", key, STANDIN_TAG, build)


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
    config: bounding-set caps, no rlimits, host network, own pid namespace, /sys/fs/cgroup rbind
    rw, rw binds of ``dirs`` (container path -> host path), the host's /etc/hosts and
    /etc/resolv.conf)."""
    caps = bounding_caps()
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "bind",
            "source": "/sys/fs/cgroup",
            "options": ["rbind", "rw"],
        },
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
    ]
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
            "env": [ib.DEFAULT_PATH_ENV],
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
    """The generated CRI v1 modules ``(api_pb2, api_pb2_grpc)`` from the stand-in's directory."""
    if str(STANDIN_SRC) not in sys.path:
        sys.path.append(str(STANDIN_SRC))
    return importlib.import_module("api_pb2"), importlib.import_module("api_pb2_grpc")


def cri_version(socket: str | Path, timeout: float = 5.0) -> dict[str, str]:
    """Call ``runtime.v1.RuntimeService/Version`` on the unix ``socket`` with the stand-in's
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
