"""The demo's images, built offline on this host from Debian's packages and the plain files under
``images/demo/KIND/`` in the source checkout (no registry; no network beyond Debian's mirror).

Each image is a :class:`Recipe` in :data:`RECIPES`: the .debs it is made of (``apt-get download``
of apt's candidate, kept in ``CACHE/debs``) and a function that, given them extracted and its
content directory, says which layers hold what; :mod:`bootstrap.demo.oci` writes them. What the
images hold beyond Debian's packages (containerd's config, the start scripts, the CNI image's
definition, the kubelet stand-in's program) is in those files, read when the image is built;
nothing here embeds it. Every small image also gets :func:`base_entries`: the host's static
``/bin/busybox`` (busybox-static) with its applets, and ``/etc`` basics.

- ``ocid`` (tag ``containerd``) — the CRI daemon from Debian's containerd: containerd, runc,
  libseccomp2, libc6, tini and iptables (nft backend, with its libraries: CNI plugins run it in
  the daemon's mount namespace), one layer per .deb (shared layers dedupe), then ours: direct
  ``/usr/sbin/iptables*`` links to ``xtables-nft-multi`` (the host's ``/etc`` hides the image's
  ``/etc/alternatives`` once the daemon sees it), ``ocid/config.toml`` as
  ``/etc/containerd/config.toml``, as ``/exports/hostfs/etc/containerd/config.toml`` (installed
  on the host, which is what the daemon reads when its definition binds the host's ``/etc``) and
  as ``/usr/share/ocid/config.toml`` (used when the host has none), and ``ocid/ocid-start``.
  Entrypoint ``tini-static -s -g --``, so the daemon's pid namespace reaps its shims.
- ``cni`` (tag ``plugins``) — Debian's libc6 (the plugins are dynamically linked), the plugins of
  containernetworking-plugins under ``/exports/hostfs/opt/cni/bin/``, ``cni/manifest.json`` as
  ``/exports/manifest.json`` (a ``"type": "oneshot"`` definition: files only, installed on the
  host), and its command ``cni/cni-selfcheck``.
- ``pause`` (tag ``3.9``) — the sandbox image: Debian's static ``catatonit`` run as
  ``catatonit -P``; pods know it as ``registry.k8s.io/pause:3.9`` (``ocid/config.toml``).
- ``busybox`` (tag ``busybox``) — busybox (``httpd`` among its applets) for pods' containers, and
  the demo's "hello" system container: its command is ``busybox/hello``.
- ``kubelet-standin`` (tag ``standin``) — a kubelet stand-in that speaks CRI over gRPC: Debian's
  python3.11-minimal (+ its libraries), grpcio and protobuf copied from this venv's
  site-packages, ``kubelet-standin/main.py`` in ``/usr/local/lib/kubelet-standin`` (under
  ``/usr``: a kubelet container sees the host's ``/opt``), ``kubelet-standin/kubelet`` as
  ``/usr/local/bin/kubelet`` running it, and the product's CRI stubs as
  ``/usr/local/lib/kubelet-standin/bootstrap/cri/`` (no ``__init__.py``: namespace packages, so
  ``from bootstrap.cri import api_pb2`` works there as it does here).

Each is built once into the OCI layout ``CACHE/KIND-KEY`` (:func:`image`), KEY a digest of every
input: the recipe code (this module and the builder), the .deb files, every file under
``images/demo/KIND/``, the host's busybox, and for the stand-in the venv's grpcio and protobuf
and the CRI stubs. A changed input builds the image again (temp dir + fsync + rename, under an
flock); older layouts of that kind go. Errors are :class:`~bootstrap.demo.oci.ImageBuildError`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bootstrap import process
from bootstrap.demo import oci
from bootstrap.demo.oci import (
    DEFAULT_PATH_ENV,
    Dir,
    Entry,
    File,
    ImageBuildError,
    ImageSpec,
    Layer,
    Symlink,
    tree_entries,
)
from bootstrap.fsutil import fsync_dir, remove_tree
from bootstrap.image.api import REF_NAME_ANNOTATION
from bootstrap.locks import flocked

CONTENT = Path(__file__).resolve().parents[2] / "images" / "demo"
"""The images' content files, ``images/demo/KIND/`` in the source checkout (the demo runs from
one: :func:`bootstrap.demo.demo.install_location`)."""
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "ash", "sleep", "usleep", "echo", "cat", "ls", "true", "false", "env", "id", "kill",
    "ps", "mkdir", "rm", "cp", "mv", "ln", "touch", "chmod", "chown", "stat", "test", "[",
    "printf", "grep", "sed", "awk", "head", "tail", "wc", "pwd", "hostname", "uname", "date",
    "mount", "umount", "readlink", "realpath", "sha256sum", "md5sum", "find", "xargs", "tar",
    "gzip", "nc", "wget", "httpd", "ip", "ifconfig", "ping", "seq", "yes", "timeout", "nohup",
    "dd", "df", "du", "tee", "sort", "uniq", "tr", "cut", "basename", "dirname", "which",
    "whoami", "sync", "mkfifo", "mknod", "getty", "init", "vi", "less", "more", "free", "top",
    "pidof", "pgrep", "pkill", "netstat", "nslookup", "watch", "expr", "base64", "od", "hexdump",
)  # fmt: skip
DEB_SKIP = ("usr/share/doc", "usr/share/man", "usr/share/lintian")
STANDIN_KUBELET = "/usr/local/bin/kubelet"
"""The kubelet stand-in image's entrypoint."""

log = logging.getLogger(__name__)


# ---- what every small image holds --------------------------------------------------------------


def busybox_entries() -> list[Entry]:
    """``bin/busybox`` (the host's static one) and symlinks for :data:`BUSYBOX_APPLETS`."""
    if not BUSYBOX.is_file():
        raise ImageBuildError(f"{BUSYBOX} not found", "apt-get install busybox-static")
    entries: list[Entry] = [Dir("bin"), File("bin/busybox", BUSYBOX, mode=0o755)]
    entries += [Symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    return entries


def etc_entries() -> list[Entry]:
    """The files and directories every small image needs: passwd/group, hosts, resolv.conf,
    nsswitch.conf, mount points, tmp."""
    return [
        Dir("etc"),
        File("etc/passwd", b"root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
        File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        File("etc/hosts", b"127.0.0.1 localhost\n"),
        File("etc/resolv.conf", b""),
        File("etc/nsswitch.conf", b"hosts: files dns\n"),
        Dir("proc", mode=0o555),
        Dir("sys", mode=0o555),
        Dir("dev"),
        Dir("run"),
        Dir("tmp", mode=0o1777),
        Dir("var"),
        Dir("var/tmp", mode=0o1777),
        Dir("root", mode=0o700),
    ]


def base_entries() -> list[Entry]:
    """:func:`busybox_entries` and :func:`etc_entries`: a runnable root for a small image."""
    return [*busybox_entries(), *etc_entries()]


# ---- Debian packages ---------------------------------------------------------------------------


def candidates(packages: Sequence[str]) -> dict[str, str]:
    """apt's candidate version of each of ``packages`` (one ``apt-cache policy`` call). Raises
    :class:`ImageBuildError` when apt knows no version of one."""
    out = process.run(
        ["apt-cache", "policy", *packages], error=ImageBuildError, timeout=120
    ).stdout.decode(errors="replace")
    found: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1].split(":", 1)[0]  # "pkg:" or "pkg:amd64:"
        elif line.strip().startswith("Candidate:") and current:
            found[current] = line.split(":", 1)[1].strip()
    for package in packages:
        if found.get(package, "(none)") == "(none)":
            raise ImageBuildError(f"apt knows no version of {package}", "run apt-get update")
    return found


def debs(packages: Sequence[str], debs_dir: Path) -> list[Path]:
    """The .deb of each of ``packages`` (apt's candidate version) in ``debs_dir``, fetched with
    ``apt-get download`` (under an flock) when missing. Raises :class:`ImageBuildError` when apt
    knows no such package or the download fails."""
    if not packages:
        return []
    debs_dir.mkdir(parents=True, exist_ok=True)
    versions = candidates(packages)
    paths: list[Path] = []
    with flocked(debs_dir / ".download.lock", timeout=900, what="apt-get download"):
        for package in packages:
            version = versions[package]
            pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
            found = sorted(debs_dir.glob(pattern))
            if not found:
                log.info("demo:   apt-get download %s=%s", package, version)
                process.run(
                    ["apt-get", "download", f"{package}={version}"],
                    cwd=debs_dir,
                    error=ImageBuildError,
                    hint="the Debian mirror must be reachable (apt-get update)",
                    timeout=900,
                )
                found = sorted(debs_dir.glob(pattern))
            if not found:
                raise ImageBuildError(
                    f"apt-get download {package}={version} left no {pattern}",
                    "run apt-get update",
                )
            paths.append(found[-1])
    return paths


@dataclass(frozen=True)
class Inputs:
    """What a recipe builds from: its content directory (``images/demo/KIND``), its .debs by
    package name, and a scratch directory (removed after the build)."""

    content: Path
    debs: Mapping[str, Path]
    scratch: Path

    def extract(self, *packages: str) -> Path:
        """The .debs of ``packages`` unpacked (``dpkg-deb -x``) into one new directory."""
        dest = Path(tempfile.mkdtemp(dir=self.scratch, prefix=f"{packages[0]}-"))
        for package in packages:
            process.run(
                ["dpkg-deb", "-x", self.debs[package], dest], error=ImageBuildError, timeout=600
            )
        return dest


# ---- the recipes -------------------------------------------------------------------------------

IPTABLES_DEBS = (
    "libmnl0",
    "libnftnl11",
    "libxtables12",
    "libip4tc2",
    "libip6tc2",
    "libnfnetlink0",
    "libnetfilter-conntrack3",
    "iptables",
)
"""Debian's iptables (nft backend) and its libraries: CNI plugins (portmap, bridge's ipMasq) run
it inside the CRI daemon's mount namespace."""
DAEMON_DEBS = ("libc6", "libseccomp2", "containerd", "runc", "tini", *IPTABLES_DEBS)
IPTABLES_LINKS = (
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
)
CONTAINERD_CONFIG = "etc/containerd/config.toml"
CONTAINERD_CONFIG_FALLBACK = "usr/share/ocid/config.toml"


def _ocid(src: Inputs) -> ImageSpec:
    config = src.content / "config.toml"
    ours: list[Entry] = [
        *base_entries(),
        Symlink("var/run", "../run"),
        File(CONTAINERD_CONFIG, config),
        File(CONTAINERD_CONFIG_FALLBACK, config),
        File(f"exports/hostfs/{CONTAINERD_CONFIG}", config),
        File("usr/local/bin/ocid-start", src.content / "ocid-start", mode=0o755),
        *(Symlink(f"usr/sbin/{name}", "xtables-nft-multi") for name in IPTABLES_LINKS),
        Dir("var/lib/containerd", mode=0o711),
        Dir("run/containerd", mode=0o711),
        Dir("var/log/pods"),
        Dir("etc/cni/net.d"),
        Dir("opt/cni/bin"),
    ]
    return ImageSpec(
        layers=[
            *(Layer(tree_entries(src.extract(deb), skip=DEB_SKIP)) for deb in DAEMON_DEBS),
            Layer(ours),
        ],
        entrypoint=("/usr/bin/tini-static", "-s", "-g", "--"),
        cmd=("/usr/local/bin/ocid-start",),
        labels={"org.opencontainers.image.title": "bootstrap CRI daemon (containerd)"},
        stop_signal="SIGTERM",
    )


CNI_BIN = "exports/hostfs/opt/cni/bin"


def _cni(src: Inputs) -> ImageSpec:
    plugins = src.extract("containernetworking-plugins") / "usr/lib/cni"
    ours: list[Entry] = [
        *base_entries(),
        File("exports/manifest.json", src.content / "manifest.json"),
        File("usr/local/bin/cni-selfcheck", src.content / "cni-selfcheck", mode=0o755),
    ]
    return ImageSpec(
        layers=[
            Layer(tree_entries(src.extract("libc6"), skip=DEB_SKIP)),
            Layer([Dir(CNI_BIN), *tree_entries(plugins, prefix=CNI_BIN)]),
            Layer(ours),
        ],
        cmd=("/usr/local/bin/cni-selfcheck",),
        labels={"org.opencontainers.image.title": "bootstrap CNI plugins (Debian)"},
    )


def _pause(src: Inputs) -> ImageSpec:
    return ImageSpec(
        layers=[Layer(tree_entries(src.extract("catatonit"), skip=("usr/share",)))],
        entrypoint=("/usr/bin/catatonit", "-P"),
        labels={"org.opencontainers.image.title": "bootstrap pause (catatonit -P)"},
    )


def _busybox(src: Inputs) -> ImageSpec:
    hello = File("usr/local/bin/hello", src.content / "hello", mode=0o755)
    return ImageSpec(
        layers=[Layer([*base_entries(), hello])],
        cmd=("/usr/local/bin/hello",),
        labels={"org.opencontainers.image.title": "bootstrap demo: busybox hello"},
    )


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
STANDIN_PY_PACKAGES = ("grpc", "google", "typing_extensions.py")
STANDIN_HOME = "usr/local/lib/kubelet-standin"
"""Where the stand-in's program goes: under /usr, the image's own (a kubelet container sees the
host's /opt)."""
CRI_STUBS = tuple(
    Path(__file__).resolve().parents[1] / "cri" / name for name in ("api_pb2.py", "api_pb2_grpc.py")
)
"""bootstrap/cri/'s generated CRI v1 modules, which the stand-in imports."""


def _grpc_site_packages() -> tuple[Path, str]:
    """The site-packages holding grpcio and protobuf, and their versions."""
    try:
        grpc = importlib.import_module("grpc")
        protobuf = importlib.import_module("google.protobuf")
    except ImportError as exc:
        raise ImageBuildError(
            f"the kubelet stand-in image needs grpcio and protobuf in this venv: {exc}",
            "pip install grpcio protobuf (or pip install -e '.[dev]')",
        ) from exc
    site = Path(str(grpc.__file__)).resolve().parents[1]
    return site, f"{grpc.__version__} {protobuf.__version__}"


def _standin_inputs() -> list[str]:
    return [_grpc_site_packages()[1], *(_file_digest(p) for p in CRI_STUBS)]


def _standin(src: Inputs) -> ImageSpec:
    site, _ = _grpc_site_packages()
    packages: list[Entry] = [Dir("usr/lib/python3/dist-packages")]
    for name in STANDIN_PY_PACKAGES:
        dest = f"usr/lib/python3/dist-packages/{name}"
        if (site / name).is_dir():
            packages += [Dir(dest), *tree_entries(site / name, prefix=dest)]
        elif (site / name).is_file():
            packages.append(File(dest, site / name))
    app: list[Entry] = [
        *base_entries(),
        File(f"{STANDIN_HOME}/main.py", src.content / "main.py"),
        File(STANDIN_KUBELET, src.content / "kubelet", mode=0o755),
        # the product's CRI stubs, importable as bootstrap.cri.api_pb2 (namespace packages)
        *(File(f"{STANDIN_HOME}/bootstrap/cri/{p.name}", p) for p in CRI_STUBS),
    ]
    return ImageSpec(
        layers=[
            Layer(tree_entries(src.extract(*STANDIN_DEBS), skip=STANDIN_SKIP)),
            Layer(packages),
            Layer(app),
        ],
        entrypoint=(STANDIN_KUBELET,),
        env=(
            DEFAULT_PATH_ENV,
            f"PYTHONPATH=/usr/lib/python3/dist-packages:/{STANDIN_HOME}",
            "PYTHONDONTWRITEBYTECODE=1",
        ),
        labels={"org.opencontainers.image.title": "bootstrap kubelet stand-in"},
    )


@dataclass(frozen=True)
class Recipe:
    """One of the demo's images: the tag in its layout, the .debs it is built from, its layers
    and config (``spec``), and what else its cache key must cover (``inputs``)."""

    tag: str
    debs: tuple[str, ...]
    spec: Callable[[Inputs], ImageSpec]
    inputs: Callable[[], Sequence[str]] = list


RECIPES: dict[str, Recipe] = {
    "ocid": Recipe("containerd", DAEMON_DEBS, _ocid),
    "cni": Recipe("plugins", ("libc6", "containernetworking-plugins"), _cni),
    "pause": Recipe("3.9", ("catatonit",), _pause),
    "busybox": Recipe("busybox", (), _busybox),
    "kubelet-standin": Recipe("standin", STANDIN_DEBS, _standin, _standin_inputs),
}
"""The demo's images by kind (the name of their cache layouts and of their content directory)."""


# ---- cached OCI layouts ------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedImage:
    """An image in a cached OCI layout: ``ref`` is ``oci:LAYOUT:TAG`` for skopeo/umoci."""

    layout: Path
    tag: str
    manifest_digest: str

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    def archive(self) -> Path:
        """This layout as an ``oci-archive`` next to it (``LAYOUT.tar``), made once."""
        dest = self.layout.with_name(f"{self.layout.name}.tar")
        if not dest.is_file():
            with flocked(self.layout.parent / ".archive.lock", timeout=1800):
                if not dest.is_file():
                    log.info("demo:   packing %s as an oci-archive", self.layout.name)
                    oci.save_oci_archive(self.layout, dest)
        return dest


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def builder(kind: str, cache: Path) -> tuple[str, Callable[[Path], None]]:
    """(cache key, a function writing the image ``kind`` of :data:`RECIPES` as a new OCI layout
    at its argument); the .debs are fetched into ``cache/debs`` first. Raises
    :class:`ImageBuildError` when an input is missing."""
    recipe = RECIPES[kind]
    content = CONTENT / kind
    if not CONTENT.is_dir():
        raise ImageBuildError(
            f"no {CONTENT}: the demo's images are built from a source checkout",
            "run bootstrap from its source checkout (pip install -e .)",
        )
    files = dict(zip(recipe.debs, debs(recipe.debs, cache / "debs"), strict=True))
    h = hashlib.sha256()
    for part in (
        kind,
        *(_file_digest(Path(path)) for path in (__file__, oci.__file__)),  # the recipe code
        *(f.name for f in files.values()),
        _file_digest(BUSYBOX) if BUSYBOX.is_file() else "",
        *recipe.inputs(),
    ):
        h.update(part.encode() + b"\0")
    if content.is_dir():
        oci.hash_tree(h, content)

    def build(layout: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{kind}-scratch-") as work:
            spec = recipe.spec(Inputs(content, files, Path(work)))
            oci.build_image(layout, recipe.tag, spec)

    return h.hexdigest()[:16], build


def image(kind: str, cache: Path) -> CachedImage:
    """The image ``kind`` of :data:`RECIPES` in the OCI layout ``cache/KIND-KEY``, built when
    missing (temp dir + fsync + rename, under ``cache/.KIND.lock``); older ``KIND-*`` layouts and
    their archives are removed. Raises :class:`ImageBuildError`."""
    key, build = builder(kind, cache)
    tag = RECIPES[kind].tag
    final = cache / f"{kind}-{key}"
    with flocked(cache / f".{kind}.lock", timeout=1800, what=f"building the {kind} image"):
        if not (final / "index.json").is_file():
            log.info("demo:   building the %s image", kind)
            work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{kind}-"))
            try:
                build(work / "layout")
                _fsync_tree(work / "layout")
                os.rename(work / "layout", final)
                fsync_dir(cache)
            finally:
                remove_tree(work)
            for old in cache.glob(f"{kind}-*"):
                if old.name not in (final.name, f"{final.name}.tar"):
                    remove_tree(old)
    index = json.loads((final / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            return CachedImage(final, tag, str(m["digest"]))
    raise ImageBuildError(f"{final}: no image tagged {tag}", f"remove {final} to rebuild it")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def node_manifest_images(cache: Path) -> dict[str, Path]:
    """oci-archives of the images ``examples/node.yaml`` names: by container name ``cni``,
    ``ocid`` and ``kubelet`` (the stand-in), and by repository name the pod images ``pause``
    and ``busybox``."""
    kinds = {"kubelet": "kubelet-standin"}
    names = ("cni", "ocid", "kubelet", "pause", "busybox")
    return {name: image(kinds.get(name, name), cache).archive() for name in names}
