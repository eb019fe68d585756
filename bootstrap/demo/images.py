"""The demo's images, built offline on this host: no registry, no network beyond Debian's mirror.

A small, deterministic OCI image writer (:func:`write_oci_archive`, :func:`write_docker_archive`)
turns an :class:`ImageSpec` — layers of :class:`Dir`, :class:`File`, :class:`Symlink` and
:class:`Hardlink` entries plus the image config — into an ``oci-archive`` (a tar of an OCI image
layout) or a ``docker save`` archive that ``bootstrap import`` loads. Layers are written with
owners 0:0, a fixed mtime and sorted input, so the same spec always gives the same digests;
file contents are streamed from disk, never held whole in memory.

Built archives are cached as ``CACHE/KIND-KEY.tar`` where KEY hashes everything that went into
the spec (:func:`cached_archive`); the cache is filled under an flock and written temp + fsync +
rename.

Images:

- :func:`busybox_image` — ``/bin/busybox`` of Debian's busybox-static and its applets (``httpd``
  among them), a "hello" loop as the command: the smallest runnable system container.
- :func:`cri_daemon_image` — the CRI daemon ("ocid") from Debian's containerd: containerd, runc,
  libseccomp2, libc6, tini and iptables (nft backend, with its libraries: CNI plugins run it in
  the daemon's mount namespace) from ``apt-get download`` + ``dpkg-deb -x`` (one layer each, so
  shared layers dedupe), then a layer of ours: static busybox, ``/etc`` basics, direct
  ``/usr/sbin/iptables*`` links to ``xtables-nft-multi`` (the host's ``/etc`` hides the image's
  ``/etc/alternatives`` once the daemon sees it), ``/etc/containerd/config.toml`` (sandbox image
  :data:`PAUSE_IMAGE`, CNI from ``/opt/cni/bin`` and ``/etc/cni/net.d``), the same file as
  ``/exports/hostfs/etc/containerd/config.toml`` (installed on the host, which is what the daemon
  reads when its definition binds the host's ``/etc``) and as ``/usr/share/ocid/config.toml``
  (used when the host has none), and ``/usr/local/bin/ocid-start`` (makes the directories it
  writes, then execs containerd). Entrypoint ``tini-static -s -g --``, so the daemon's pid
  namespace reaps its shims. RECIPES: "A CRI daemon system container from Debian's containerd".
- :func:`pause_image` — the sandbox image: Debian's static ``catatonit`` run as ``catatonit -P``.
- :func:`pod_image` — the busybox image (with ``httpd``) for pods' containers.
- :func:`cni_plugins_image` — Debian's containernetworking-plugins under
  ``/exports/hostfs/opt/cni/bin/`` with a ``"type": "oneshot"`` definition in ``/exports``: a
  files-only system container that installs the plugins on the host; its command checks that
  every plugin runs.
- :func:`kubelet_standin_image` — a kubelet stand-in that speaks CRI over gRPC: Debian's
  python3.11-minimal (+ its libraries), grpcio and protobuf copied from this venv's
  site-packages, the stand-in's sources (a directory given by the caller) as
  ``/usr/local/lib/kubelet-standin`` (under ``/usr``: a kubelet container sees the host's
  ``/opt``) with ``/usr/local/bin/kubelet`` running it, and the product's CRI stubs as
  ``/usr/local/lib/kubelet-standin/bootstrap/cri/`` (no ``__init__.py``: namespace packages,
  so ``from bootstrap.cri import api_pb2`` works there as it does here).
- :func:`node_manifest_images` — the last two as oci-archives, by container name, for
  ``examples/node.yaml``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from bootstrap import process
from bootstrap.errors import BootstrapError
from bootstrap.fsutil import fsync_dir, remove_tree
from bootstrap.image.api import Digesting
from bootstrap.locks import flocked

MTIME = 1700000000
"""mtime of every layer entry (reproducible layers)."""

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUSYBOX = Path("/bin/busybox")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20
_GZIP_LEVEL = 1  # isal level 1: fast, about as small as zlib's 6 on these layers

log = logging.getLogger(__name__)


class ImageBuildError(BootstrapError):
    """An image could not be built (a source file is missing, the disk is full, ...)."""


# ---- what an image is made of ------------------------------------------------------------------


@dataclass(frozen=True)
class Dir:
    """A directory at ``path`` (relative to the image root)."""

    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class File:
    """A regular file: ``source`` is its content, or a host file streamed in."""

    path: str
    source: bytes | Path
    mode: int = 0o644

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    """A hard link at ``path`` to the earlier entry ``target`` of the same layer."""

    path: str
    target: str


Entry = Dir | File | Symlink | Hardlink


@dataclass(frozen=True)
class ImageSpec:
    """An image: ``layers`` (lowest first) and the config fields a runtime uses."""

    layers: tuple[tuple[Entry, ...], ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = (DEFAULT_PATH_ENV,)
    working_dir: str = "/"
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str | None = None

    def config(self, diff_ids: Sequence[str]) -> dict[str, Any]:
        """The OCI image config for layers whose uncompressed digests are ``diff_ids``."""
        cfg: dict[str, Any] = {"Env": list(self.env), "WorkingDir": self.working_dir}
        if self.entrypoint:
            cfg["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            cfg["Cmd"] = list(self.cmd)
        if self.labels:
            cfg["Labels"] = dict(self.labels)
        if self.stop_signal:
            cfg["StopSignal"] = self.stop_signal
        return {
            "architecture": _goarch(),
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created_by": "bootstrap demo (offline image builder)"}],
        }

    def key(self) -> str:
        """A digest of everything that goes into the image (host files by path, size and
        mtime), to name cached builds."""
        h = hashlib.sha256()
        for n, layer in enumerate(self.layers):
            h.update(f"layer {n}\n".encode())
            for e in layer:
                if isinstance(e, File):
                    if isinstance(e.source, bytes):
                        what = hashlib.sha256(e.source).hexdigest()
                    else:
                        st = e.source.stat()
                        what = f"{e.source}:{st.st_size}:{st.st_mtime_ns}"
                    h.update(f"F {e.path} {e.mode:o} {what}\n".encode())
                elif isinstance(e, Dir):
                    h.update(f"D {e.path} {e.mode:o}\n".encode())
                else:
                    h.update(f"{type(e).__name__} {e.path} {e.target}\n".encode())
        rest = {k: v for k, v in self.config([]).items() if k != "rootfs"}
        h.update(json.dumps(rest, sort_keys=True).encode())
        return h.hexdigest()[:16]


def _goarch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


# ---- writing layers and archives ---------------------------------------------------------------


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    path = entry.path.strip("/")
    if not path or path.startswith("../") or "/../" in f"/{path}/":
        raise ImageBuildError(f"bad path in image spec: {entry.path!r}", "use relative paths")
    info = tarfile.TarInfo(path)
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if isinstance(entry, Dir):
        info.type, info.mode = tarfile.DIRTYPE, entry.mode
    elif isinstance(entry, File):
        info.type, info.mode, info.size = tarfile.REGTYPE, entry.mode, entry.size
    elif isinstance(entry, Symlink):
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
    else:
        info.type, info.mode, info.linkname = tarfile.LNKTYPE, 0o644, entry.target.strip("/")
    return info


def _with_parents(entries: Iterable[Entry]) -> Iterator[Entry]:
    """``entries``, each preceded by a :class:`Dir` for every parent not seen before."""
    seen: set[str] = set()
    for entry in entries:
        parts = entry.path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                yield Dir(parent)
        if isinstance(entry, Dir):
            seen.add(entry.path.strip("/"))
        yield entry


def _write_layer(entries: Iterable[Entry], blob_dir: Path) -> tuple[str, str, int]:
    """Write one gzip layer into ``blob_dir`` (named by digest); return (digest, diff_id,
    size)."""
    from isal import igzip

    fd, tmp_name = tempfile.mkstemp(dir=blob_dir, prefix=".layer-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            compressed = Digesting(raw, algorithm="sha256")
            gzip_file = igzip.IGzipFile(  # type: ignore[no-untyped-call]
                fileobj=compressed, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0
            )
            with cast(IO[bytes], gzip_file) as gz:
                plain = Digesting(gz, algorithm="sha256")
                with tarfile.open(
                    fileobj=cast(IO[bytes], plain), mode="w|", format=tarfile.PAX_FORMAT
                ) as tar:
                    for entry in _with_parents(entries):
                        info = _tarinfo(entry)
                        if isinstance(entry, File):
                            if isinstance(entry.source, bytes):
                                tar.addfile(info, io.BytesIO(entry.source))
                            else:
                                with open(entry.source, "rb") as src:
                                    tar.addfile(info, src)
                        else:
                            tar.addfile(info)
            raw.flush()
            os.fchmod(raw.fileno(), 0o644)
            os.fsync(raw.fileno())
        digest = compressed.digest()
        os.replace(tmp, blob_dir / digest.split(":", 1)[1])
        return digest, plain.digest(), compressed.count
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"building a layer: {exc.filename}: no such file", "install the package providing it"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_blob(blob_dir: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blob_dir / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def write_oci_layout(spec: ImageSpec, layout: Path, ref_name: str) -> str:
    """Write ``spec`` as the only image of a new OCI image layout at ``layout`` (which must not
    exist), tagged ``ref_name`` (``org.opencontainers.image.ref.name``); return the manifest
    digest."""
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    layers = [_write_layer(entries, blob_dir) for entries in spec.layers]
    config_digest, config_size = _write_blob(
        blob_dir, _canonical(spec.config([d for _, d, _ in layers]))
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size}
            for digest, _, size in layers
        ],
    }
    manifest_digest, manifest_size = _write_blob(blob_dir, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {REF_NAME: ref_name},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))
    (layout / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
    return manifest_digest


def _pack(root: Path, dest: Path) -> None:
    """Tar the tree ``root`` (sorted, owners 0, fixed mtime) into ``dest``, fsynced."""
    with open(dest, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(dirnames + filenames):
                    full = Path(dirpath) / name
                    info = tar.gettarinfo(str(full), arcname=str(full.relative_to(root)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
                    if info.isfile():
                        with open(full, "rb") as src:
                            tar.addfile(info, src)
                    else:
                        tar.addfile(info)
        raw.flush()
        os.fsync(raw.fileno())


def write_oci_archive(spec: ImageSpec, dest: Path, ref_name: str) -> str:
    """Write ``spec`` as an ``oci-archive`` at ``dest`` (temp + fsync + rename); return the
    manifest digest."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as work:
        digest = write_oci_layout(spec, Path(work) / "layout", ref_name)
        tmp = Path(work) / "archive.tar"
        _pack(Path(work) / "layout", tmp)
        os.replace(tmp, dest)
    fsync_dir(dest.parent)
    return digest


def write_docker_archive(spec: ImageSpec, dest: Path, repo_tag: str) -> None:
    """Write ``spec`` as a ``docker save`` archive at ``dest`` (temp + fsync + rename) with one
    image tagged ``repo_tag``: ``manifest.json``, the config and uncompressed layer tars."""
    from isal import igzip

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as work:
        root = Path(work) / "archive"
        layout = Path(work) / "layout"
        write_oci_layout(spec, layout, "latest")
        blobs = layout / "blobs" / "sha256"
        index = json.loads((layout / "index.json").read_bytes())
        manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
        root.mkdir()
        layer_names = []
        for desc in manifest["layers"]:
            name = f"{desc['digest'][7:]}/layer.tar"
            (root / name).parent.mkdir()
            src = cast(IO[bytes], igzip.open(blobs / desc["digest"][7:], "rb"))  # type: ignore[no-untyped-call]
            with src, open(root / name, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            layer_names.append(name)
        config_name = f"{manifest['config']['digest'][7:]}.json"
        shutil.copyfile(blobs / manifest["config"]["digest"][7:], root / config_name)
        doc = [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
        (root / "manifest.json").write_bytes(json.dumps(doc).encode())
        tmp = Path(work) / "archive.tar"
        _pack(root, tmp)
        os.replace(tmp, dest)
    fsync_dir(dest.parent)


def cached_archive(cache: Path, kind: str, key: str, build: Callable[[Path], object]) -> Path:
    """``cache/KIND-KEY.tar``, made by ``build(path)`` when missing (under an flock on
    ``cache/.lock``; ``build`` writes ``path`` atomically). Older ``KIND-*`` files go."""
    final = cache / f"{kind}-{key}.tar"
    if final.is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with flocked(cache / ".lock", timeout=3600, what=f"the demo image cache ({cache})"):
        if not final.is_file():
            log.info("demo:   building the %s image", kind)
            build(final)
            for old in cache.glob(f"{kind}-*.tar"):
                if old != final:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
    return final


# ---- the images --------------------------------------------------------------------------------

BUSYBOX_APPLETS = (
    "sh", "sleep", "mkdir", "cat", "echo", "kill", "usleep", "grep", "ls", "ps", "rm", "true",
    "test", "[", "env", "mount", "id", "date", "hostname", "wc", "head", "tail", "httpd",
)  # fmt: skip


def busybox_entries() -> list[Entry]:
    """``bin/busybox`` (the host's static one) and symlinks for :data:`BUSYBOX_APPLETS`."""
    if not BUSYBOX.is_file():
        raise ImageBuildError(f"{BUSYBOX} not found", "apt-get install busybox-static")
    entries: list[Entry] = [Dir("bin"), File("bin/busybox", BUSYBOX, mode=0o755)]
    entries += [Symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    return entries


def etc_entries() -> list[Entry]:
    """The files and directories every small image needs: passwd/group, hosts, resolv.conf,
    mount points, tmp."""
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


HELLO = (
    "trap 'echo bye; exit 0' TERM; "
    'echo "hello from a bootstrap demo system container ($(hostname))"; '
    "while :; do sleep 30 & wait $!; echo still here; done"
)
"""The hello loop; as pid 1 it handles TERM itself (a pid 1 ignores signals it has no handler
for), and waits on ``sleep`` in the background so the trap runs at once."""


def busybox_spec() -> ImageSpec:
    """A busybox image whose command says hello, then waits."""
    return ImageSpec(
        layers=(tuple(sorted([*busybox_entries(), *etc_entries()], key=lambda e: e.path)),),
        cmd=("/bin/sh", "-c", HELLO),
        labels={"org.opencontainers.image.title": "bootstrap demo: busybox hello"},
    )


def busybox_image(cache: Path, ref_name: str) -> Path:
    """The busybox hello image as an oci-archive in ``cache`` (built when missing), its index
    entry tagged ``ref_name``."""
    spec = busybox_spec()
    key = hashlib.sha256(f"{spec.key()} {ref_name}".encode()).hexdigest()[:16]
    return cached_archive(
        cache, "busybox", key, lambda dest: write_oci_archive(spec, dest, ref_name)
    )


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


def extract_deb(path: Path, dest: Path) -> None:
    """``dpkg-deb -x PATH DEST`` (DEST created)."""
    dest.mkdir(parents=True, exist_ok=True)
    process.run(["dpkg-deb", "-x", path, dest], error=ImageBuildError, timeout=600)


def _skipped(rel: str, skip: Sequence[str]) -> bool:
    rel = os.path.normpath(rel)
    return any(rel == s or rel.startswith(s + "/") for s in skip)


def tree_entries(root: Path, prefix: str = "", skip: Sequence[str] = ()) -> list[Entry]:
    """Layer entries for everything below ``root`` (sorted, deterministic): directories, files
    (streamed from disk when the layer is written), symlinks and hard links, with their modes;
    owners are root. ``prefix`` is prepended to every path; paths equal to or below one of
    ``skip`` and ``__pycache__`` directories are left out."""
    entries: list[Entry] = []
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d != "__pycache__" and not _skipped(os.path.join(rel_dir, d), skip)
        )
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            if _skipped(os.path.join(rel_dir, name), skip):
                continue
            rel = os.path.normpath(os.path.join(prefix, rel_dir, name))
            st = full.lstat()
            mode = st.st_mode & 0o7777
            if full.is_symlink():
                entries.append(Symlink(rel, os.readlink(full)))
            elif full.is_dir():
                entries.append(Dir(rel, mode=mode))
            elif full.is_file():
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in inodes:
                    entries.append(Hardlink(rel, inodes[key]))
                else:
                    inodes[key] = rel
                    entries.append(File(rel, full, mode=mode))
    return entries


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
                    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
                    try:
                        _pack(self.layout, tmp)
                        os.replace(tmp, dest)
                    finally:
                        tmp.unlink(missing_ok=True)
                    fsync_dir(dest.parent)
        return dest


def _digest_inputs(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_layout(
    cache: Path, kind: str, key: str, tag: str, build: Callable[[Path], None]
) -> CachedImage:
    """The OCI layout ``cache/KIND-KEY`` holding one image tagged ``tag``, made by
    ``build(new_layout_dir)`` when missing (temp dir + rename, under ``cache/.KIND.lock``); older
    ``KIND-*`` layouts and their archives are removed."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{kind}-{key}"
    with flocked(cache / f".{kind}.lock", timeout=1800, what=f"building the {kind} image"):
        if not (final / "index.json").is_file():
            log.info("demo:   building the %s image", kind)
            work = Path(tempfile.mkdtemp(dir=cache, prefix=f".{kind}-"))
            try:
                build(work / "layout")
                os.rename(work / "layout", final)
                fsync_dir(cache)
            finally:
                remove_tree(work)
            for old in cache.glob(f"{kind}-*"):
                if old.name not in (final.name, f"{final.name}.tar"):
                    remove_tree(old)
    index = json.loads((final / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get(REF_NAME) == tag:
            return CachedImage(final, tag, str(m["digest"]))
    raise ImageBuildError(f"{final}: no image tagged {tag}", f"remove {final} to rebuild it")


def _builder(
    cache: Path, kind: str, tag: str, spec: Callable[[Path], ImageSpec]
) -> Callable[[Path], None]:
    """A function writing the image ``spec(scratch_dir)`` as a new OCI layout at its argument,
    tagged ``tag``; the scratch directory (for .deb trees) is made in ``cache`` and removed."""

    def build(layout: Path) -> None:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{kind}-scratch-") as work:
            write_oci_layout(spec(Path(work)), layout, tag)

    return build


# ---- the CRI daemon ----------------------------------------------------------------------------

CRI_SOCKET = "/run/containerd/containerd.sock"
PAUSE_IMAGE = "registry.k8s.io/pause:3.9"
"""The sandbox image containerd is configured with (bootstrap preloads it; never pulled)."""
DAEMON_TAG = "containerd"
STANDIN_TAG = "standin"
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
"""Names Debian points at through /etc/alternatives (which the host's /etc hides once the
daemon sees it): direct links to ``xtables-nft-multi`` in /usr/sbin instead."""
CONTAINERD_CONFIG_PATH = "etc/containerd/config.toml"
CONTAINERD_CONFIG_FALLBACK = "usr/share/ocid/config.toml"

CONTAINERD_CONFIG = f"""\
# containerd for a node whose CRI daemon is itself a runc system container (bootstrap)
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "{CRI_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  # preloaded by bootstrap (the node manifest's preload list); the node pulls nothing
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
    max_conf_num = 1
"""

OCID_START = """\
#!/bin/sh
# Entry point of the CRI daemon image: the directories containerd and the CNI plugins write,
# then containerd with the host's /etc/containerd/config.toml (installed from the image's
# /exports/hostfs), or the image's own copy when the host has none.
mkdir -p /var/lib/containerd /run/containerd /var/log/pods /var/lib/cni /run/netns /tmp
config=/%(config)s
if [ ! -f "$config" ]; then
  echo "ocid-start: no $config; using the image's /%(fallback)s" >&2
  config=/%(fallback)s
fi
exec containerd --config "$config"
""" % {"config": CONTAINERD_CONFIG_PATH, "fallback": CONTAINERD_CONFIG_FALLBACK}  # noqa: UP031


def cri_daemon_image(cache: Path) -> CachedImage:
    """The containerd CRI daemon image (see the module doc) as a layout in ``cache``, tagged
    :data:`DAEMON_TAG`; .debs are kept in ``cache/debs``."""
    key, build = cri_daemon_builder(cache)
    return cached_layout(cache, "ocid", key, DAEMON_TAG, build)


def cri_daemon_builder(cache: Path) -> tuple[str, Callable[[Path], None]]:
    """(cache key, a function writing the CRI daemon image as a new OCI layout at its
    argument); the .debs are fetched into ``cache/debs`` first."""
    files = debs(DAEMON_DEBS, cache / "debs")
    key = _digest_inputs(
        *(d.name for d in files), CONTAINERD_CONFIG, OCID_START, _BUILDER_VERSION, "ocid 2"
    )

    def spec(scratch: Path) -> ImageSpec:
        layers: list[tuple[Entry, ...]] = []
        for package, path in zip(DAEMON_DEBS, files, strict=True):
            tree = scratch / package
            extract_deb(path, tree)
            layers.append(tuple(tree_entries(tree, skip=DEB_SKIP)))
        config = CONTAINERD_CONFIG.encode()
        ours: list[Entry] = [
            *busybox_entries(),
            *etc_entries(),
            Symlink("var/run", "../run"),
            File(CONTAINERD_CONFIG_PATH, config),
            File(CONTAINERD_CONFIG_FALLBACK, config),
            File(f"exports/hostfs/{CONTAINERD_CONFIG_PATH}", config),
            File("usr/local/bin/ocid-start", OCID_START.encode(), mode=0o755),
            *(Symlink(f"usr/sbin/{name}", "xtables-nft-multi") for name in IPTABLES_LINKS),
            Dir("var/lib/containerd", mode=0o711),
            Dir("run/containerd", mode=0o711),
            Dir("var/log/pods"),
            Dir("etc/cni/net.d"),
            Dir("opt/cni/bin"),
        ]
        layers.append(tuple(ours))
        return ImageSpec(
            layers=tuple(layers),
            entrypoint=("/usr/bin/tini-static", "-s", "-g", "--"),
            cmd=("/usr/local/bin/ocid-start",),
            labels={"org.opencontainers.image.title": "bootstrap CRI daemon (containerd)"},
            stop_signal="SIGTERM",
        )

    return key, _builder(cache, "ocid", DAEMON_TAG, spec)


DEB_SKIP = ("usr/share/doc", "usr/share/man", "usr/share/lintian")


# ---- pod images: the sandbox ("pause") image and a busybox with httpd ----------------------------

PAUSE_TAG = "3.9"
PAUSE_DEBS = ("catatonit",)


def pause_image(cache: Path) -> CachedImage:
    """The sandbox image: Debian's static ``catatonit`` in pause mode (``catatonit -P``: it
    sleeps, reaps zombies, and shows up as what it is), tagged :data:`PAUSE_TAG` in its layout;
    pods name it :data:`PAUSE_IMAGE`."""
    key, build = pause_builder(cache)
    return cached_layout(cache, "pause", key, PAUSE_TAG, build)


def pause_builder(cache: Path) -> tuple[str, Callable[[Path], None]]:
    """(cache key, a function writing :func:`pause_image` as a new OCI layout)."""
    files = debs(PAUSE_DEBS, cache / "debs")
    key = _digest_inputs(*(d.name for d in files), _BUILDER_VERSION, "pause 1")

    def spec(scratch: Path) -> ImageSpec:
        tree = scratch / "catatonit"
        extract_deb(files[0], tree)
        return ImageSpec(
            layers=(tuple(tree_entries(tree, skip=("usr/share",))),),
            entrypoint=("/usr/bin/catatonit", "-P"),
            labels={"org.opencontainers.image.title": "bootstrap pause (catatonit -P)"},
        )

    return key, _builder(cache, "pause", PAUSE_TAG, spec)


POD_TAG = "busybox"


def pod_image(cache: Path) -> CachedImage:
    """The busybox image (:func:`busybox_spec`: static busybox with ``httpd`` among its applets)
    as a layout in ``cache`` tagged :data:`POD_TAG`, for pods' containers."""
    key, build = pod_builder(cache)
    return cached_layout(cache, "pod", key, POD_TAG, build)


def pod_builder(cache: Path) -> tuple[str, Callable[[Path], None]]:
    """(cache key, a function writing :func:`pod_image` as a new OCI layout)."""
    spec = busybox_spec()
    key = _digest_inputs(spec.key(), _BUILDER_VERSION)
    return key, _builder(cache, "pod", POD_TAG, lambda _scratch: spec)


# ---- the CNI plugins ---------------------------------------------------------------------------

CNI_TAG = "plugins"
CNI_DEBS = ("libc6", "containernetworking-plugins")
CNI_BIN = "opt/cni/bin"
CNI_MANIFEST = {
    "type": "oneshot",
    "defaultValues": {},
}
"""The image's definition (``/exports/manifest.json``): files only, installed from its
``/exports/hostfs``; its run is the self-check below."""
CNI_SELFCHECK = (
    "for p in /exports/hostfs/opt/cni/bin/*; do "
    'CNI_COMMAND=VERSION "$p" </dev/null >/dev/null || { echo "cni: $p failed" >&2; exit 1; }; '
    "done; "
    'echo "cni: $(ls /exports/hostfs/opt/cni/bin | wc -l) plugins answer VERSION"'
)
"""The image's command: every plugin answers ``CNI_COMMAND=VERSION`` (they are dynamically
linked: this proves the image's libc serves them)."""


def cni_plugins_image(cache: Path) -> CachedImage:
    """The CNI plugins image as a layout in ``cache`` tagged :data:`CNI_TAG`: Debian's libc6
    (the plugins are dynamically linked), the plugins of ``containernetworking-plugins``
    (``/usr/lib/cni`` in the .deb) under ``/exports/hostfs/opt/cni/bin/``, its definition in
    ``/exports/manifest.json`` (:data:`CNI_MANIFEST`) and static busybox for
    :data:`CNI_SELFCHECK`, its command."""
    key, build = cni_plugins_builder(cache)
    return cached_layout(cache, "cni", key, CNI_TAG, build)


def cni_plugins_builder(cache: Path) -> tuple[str, Callable[[Path], None]]:
    """(cache key, a function writing :func:`cni_plugins_image` as a new OCI layout)."""
    files = debs(CNI_DEBS, cache / "debs")
    manifest = (json.dumps(CNI_MANIFEST, indent=2) + "\n").encode()
    key = _digest_inputs(*(d.name for d in files), manifest, CNI_SELFCHECK, _BUILDER_VERSION)

    def spec(scratch: Path) -> ImageSpec:
        libc = scratch / "libc6"
        extract_deb(files[0], libc)
        plugins = scratch / "plugins"
        extract_deb(files[1], plugins)
        ours: list[Entry] = [
            *busybox_entries(),
            *etc_entries(),
            File("exports/manifest.json", manifest),
        ]
        return ImageSpec(
            layers=(
                tuple(tree_entries(libc, skip=DEB_SKIP)),
                (
                    Dir(f"exports/hostfs/{CNI_BIN}"),
                    *tree_entries(plugins / "usr/lib/cni", prefix=f"exports/hostfs/{CNI_BIN}"),
                ),
                tuple(ours),
            ),
            cmd=("/bin/sh", "-c", CNI_SELFCHECK),
            labels={"org.opencontainers.image.title": "bootstrap CNI plugins (Debian)"},
        )

    return key, _builder(cache, "cni", CNI_TAG, spec)


# ---- the kubelet stand-in ----------------------------------------------------------------------

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
STANDIN_KUBELET = "/usr/local/bin/kubelet"
STANDIN_WRAPPER = """\
#!/bin/sh
# kubelet stand-in: takes kubelet flags, speaks CRI (see /usr/local/lib/kubelet-standin/main.py)
exec /usr/bin/python3.11 -u /usr/local/lib/kubelet-standin/main.py "$@"
"""
_BUILDER_VERSION = "1"  # bump when the layer format written here changes
CRI_STUBS = Path(__file__).resolve().parents[1] / "cri"
"""bootstrap/cri/: the generated CRI v1 modules the stand-in imports."""
CRI_STUB_FILES = ("api_pb2.py", "api_pb2_grpc.py")


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
    return Path(str(grpc.__file__)).resolve().parents[
        1
    ], f"{grpc.__version__} {protobuf.__version__}"


def kubelet_standin_image(cache: Path, standin_src: Path) -> CachedImage:
    """The kubelet stand-in image (see the module doc) as a layout in ``cache``, tagged
    :data:`STANDIN_TAG`; its program is the directory ``standin_src`` (``main.py`` and the CRI
    stubs). Raises :class:`ImageBuildError` without grpcio/protobuf or the sources."""
    if not (standin_src / "main.py").is_file():
        raise ImageBuildError(
            f"no kubelet stand-in sources in {standin_src}", "run from a complete source checkout"
        )
    files = debs(STANDIN_DEBS, cache / "debs")
    site, versions = _grpc_site_packages()
    sources = sorted(p for p in standin_src.rglob("*.py*") if "__pycache__" not in p.parts)
    stubs = [CRI_STUBS / name for name in CRI_STUB_FILES]
    key = _digest_inputs(
        *(d.name for d in files),
        versions,
        STANDIN_WRAPPER,
        _BUILDER_VERSION,
        *(
            f"{p.relative_to(standin_src)}\0{hashlib.sha256(p.read_bytes()).hexdigest()}"
            for p in sources
        ),
        *(f"{p.name}\0{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in stubs),
        ImageSpec(layers=((*busybox_entries(), *etc_entries()),)).key(),
    )

    def spec(scratch: Path) -> ImageSpec:
        tree = scratch / "root"
        for path in files:
            extract_deb(path, tree)
        base = tree_entries(tree, skip=STANDIN_SKIP)
        site_entries: list[Entry] = [Dir("usr/lib/python3/dist-packages")]
        for name in STANDIN_PY_PACKAGES:
            dest = f"usr/lib/python3/dist-packages/{name}"
            if (site / name).is_dir():
                site_entries += [Dir(dest), *tree_entries(site / name, prefix=dest)]
            elif (site / name).is_file():
                site_entries.append(File(dest, site / name))
        home = "usr/local/lib/kubelet-standin"  # /usr: the image's own, never a host bind
        app = [Dir(home), *tree_entries(standin_src, prefix=home)]
        app.append(File("usr/local/bin/kubelet", STANDIN_WRAPPER.encode(), mode=0o755))
        # the product's CRI stubs, importable as bootstrap.cri.api_pb2 (namespace packages)
        app += [Dir(f"{home}/bootstrap"), Dir(f"{home}/bootstrap/cri")]
        app += [File(f"{home}/bootstrap/cri/{p.name}", p) for p in stubs]
        return ImageSpec(
            layers=(tuple(base), tuple(site_entries), (*busybox_entries(), *etc_entries(), *app)),
            entrypoint=(STANDIN_KUBELET,),
            env=(
                DEFAULT_PATH_ENV,
                "PYTHONPATH=/usr/lib/python3/dist-packages:/usr/local/lib/kubelet-standin",
                "PYTHONDONTWRITEBYTECODE=1",
            ),
            labels={"org.opencontainers.image.title": "bootstrap kubelet stand-in"},
        )

    return cached_layout(
        cache, "standin", key, STANDIN_TAG, _builder(cache, "standin", STANDIN_TAG, spec)
    )


def node_manifest_images(cache: Path, standin_src: Path) -> dict[str, Path]:
    """oci-archives of the images ``examples/node.yaml`` names: by container name ``cni``
    (:func:`cni_plugins_image`), ``ocid`` (:func:`cri_daemon_image`) and ``kubelet``
    (:func:`kubelet_standin_image`), and by repository name the pod images ``pause``
    (:func:`pause_image`) and ``busybox`` (:func:`pod_image`)."""
    return {
        "cni": cni_plugins_image(cache).archive(),
        "ocid": cri_daemon_image(cache).archive(),
        "kubelet": kubelet_standin_image(cache, standin_src).archive(),
        "pause": pause_image(cache).archive(),
        "busybox": pod_image(cache).archive(),
    }
