"""Frozen data types the image stages hand each other, and the media types they understand.

Parsing JSON into these types validates it: a document that does not fit raises
:class:`~bootstrap.errors.IntegrityError` (exit 4) naming the field, because a manifest or config
that does not parse is content that is not what it claims to be.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bootstrap.errors import IntegrityError, UsageError

# manifests and indexes
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
# configs
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
# layers
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
LAYER_COMPRESSION: Mapping[str, str] = {
    OCI_LAYER: "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ND_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_LAYER_FOREIGN: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
}

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
#: The digest algorithms accepted everywhere (registry, store, archives), with their hashlib.
DIGEST_ALGORITHMS: Mapping[str, Callable[..., Any]] = {
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # as containers/image: larger manifests are refused
MAX_CONFIG_BYTES = 8 * 1024 * 1024


def check_digest(value: object, where: str = "digest") -> str:
    """Return ``value`` if it is a sha256/sha512 digest string in canonical form, else raise
    :class:`IntegrityError` naming ``where``."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise IntegrityError(
            f"{where}: {str(value)[:80]!r} is not a supported digest",
            "only sha256 and sha512 digests in lower-case hex are accepted",
        )
    return value


def split_digest(digest: str, where: str = "digest") -> tuple[str, str]:
    """``(algorithm, hex)`` of a digest checked by :func:`check_digest`."""
    alg, _, hexpart = check_digest(digest, where).partition(":")
    return alg, hexpart


def new_hasher(digest: str, where: str = "digest") -> Any:
    """A new hashlib object of ``digest``'s algorithm (sha256 or sha512); a digest string is
    ``ALG:`` + its ``hexdigest()``. Raises :class:`IntegrityError` for an unsupported digest."""
    return DIGEST_ALGORITHMS[split_digest(digest, where)[0]]()


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """The ``ALG:HEX`` digest of ``data`` (``algorithm`` one of :data:`DIGEST_ALGORITHMS`)."""
    return f"{algorithm}:{DIGEST_ALGORITHMS[algorithm](data).hexdigest()}"


def matches(data: bytes, digest: str) -> bool:
    """True when ``data`` hashes to ``digest`` under its algorithm; :class:`IntegrityError`
    for an unsupported digest."""
    return digest_of(data, split_digest(digest)[0]) == digest


@dataclass(frozen=True)
class Platform:
    """An OCI platform. ``variant`` is "" when absent."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        """The platform of this machine in Go's GOOS/GOARCH spelling."""
        machine = os.uname().machine.lower()  # what platform.machine() reads
        arch, variant = {
            "x86_64": ("amd64", ""),
            "amd64": ("amd64", ""),
            "aarch64": ("arm64", "v8"),
            "arm64": ("arm64", "v8"),
            "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"),
            "i686": ("386", ""),
            "i386": ("386", ""),
            "ppc64le": ("ppc64le", ""),
            "s390x": ("s390x", ""),
            "riscv64": ("riscv64", ""),
        }.get(machine, (machine, ""))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``; raises :class:`UsageError` (exit 2) otherwise."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9_.-]+", p) for p in parts):
            raise UsageError(
                f"--platform {text!r}: expected OS/ARCH[/VARIANT]", "e.g. linux/arm64/v8"
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: Any, where: str = "descriptor") -> Descriptor:
        """Validate and convert a descriptor object; raises :class:`IntegrityError`."""
        if not isinstance(doc, dict):
            raise IntegrityError(
                f"{where}: not an object", "the registry sent a malformed document"
            )
        media_type = doc.get("mediaType", "")
        size = doc.get("size")
        if not isinstance(media_type, str):
            raise IntegrityError(f"{where}.mediaType: not a string", "malformed document")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"{where}.size: {size!r} is not a size", "malformed document")
        digest = check_digest(doc.get("digest"), f"{where}.digest")
        ann = doc.get("annotations") or {}
        if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
        ):
            raise IntegrityError(f"{where}.annotations: not a string map", "malformed document")
        plat = None
        pdoc = doc.get("platform")
        if pdoc is not None:
            if not isinstance(pdoc, dict):
                raise IntegrityError(f"{where}.platform: not an object", "malformed document")
            plat = Platform(
                str(pdoc.get("os", "")),
                str(pdoc.get("architecture", "")),
                str(pdoc.get("variant", "")),
            )
        urls = doc.get("urls") or []
        return cls(media_type, digest, size, dict(ann), plat, tuple(str(u) for u in urls))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        if self.platform is not None:
            p: dict[str, str] = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            doc["platform"] = p
        if self.urls:
            doc["urls"] = list(self.urls)
        return doc


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker v2s2). ``digest`` is that of its exact bytes."""

    media_type: str
    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list."""

    media_type: str
    digest: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the tool uses. ``diff_ids`` are the uncompressed layer
    digests in order; ``user`` etc. are "" and ``entrypoint``/``cmd`` empty tuples when absent."""

    digest: str
    os: str
    architecture: str
    diff_ids: tuple[str, ...]
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    """A stored image, resolved: the reference it is known by (normalized string), its manifest
    and its config."""

    name: str
    manifest: Manifest
    config: ImageConfig
