"""Stream a stored image out as an ``oci-archive``: the tar of a one-image OCI image layout.

This is how an image bootstrap pulled and verified is handed to another image store without a
registry (a CRI daemon's own import command reads it on its stdin: ``ctr images import -``,
``skopeo copy oci-archive:/dev/stdin containers-storage:REF``). The archive holds
``oci-layout``, ``index.json`` naming the image by its full reference (both
``org.opencontainers.image.ref.name`` and containerd's ``io.containerd.image.name``) and the
manifest, config and layer blobs under ``blobs/ALG/HEX``, in that order.

Blobs are copied from the store in chunks and hashed on the way: a stored blob that no longer
matches its digest stops the export with :class:`~bootstrap.errors.IntegrityError` (exit 4)
before its last byte is written, so a damaged store never hands over damaged content. Memory
stays flat whatever the image size.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

from bootstrap.errors import BootstrapError, IntegrityError
from bootstrap.image.model import Descriptor, Image
from bootstrap.image.store import Store

#: containerd names an imported image by this index annotation (else it derives the name).
CONTAINERD_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_CHUNK = 1 << 20
_MTIME = 0


@dataclass(frozen=True)
class Exported:
    """What :func:`write_oci_archive` wrote: the image's name and manifest digest, the blobs
    and the bytes of the archive."""

    name: str
    manifest_digest: str
    blobs: int
    size: int


class _Out:
    """Counts what is written to ``out``; a write that fails is an :class:`ExportError`."""

    def __init__(self, out: BinaryIO, what: str) -> None:
        self.out = out
        self.what = what
        self.size = 0

    def write(self, data: bytes) -> int:
        try:
            n = self.out.write(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ExportError(
                f"{self.what}: the reader stopped after {self.size} bytes",
                "see the importing command's own error for why",
            ) from exc
        self.size += len(data)
        return n if n is not None else len(data)

    def flush(self) -> None:
        self.out.flush()


class ExportError(BootstrapError):
    """The archive could not be written to its reader (the reader went away)."""


def write_oci_archive(store: Store, image: Image, out: BinaryIO) -> Exported:
    """Write ``image`` (as :meth:`Store.image` returned it) to ``out`` as an oci-archive named
    ``image.name``. Holds the store's shared lock while reading. Raises
    :class:`IntegrityError` when a blob is missing or does not match its digest,
    :class:`ExportError` when ``out`` is closed by its reader."""
    manifest = image.manifest
    try:
        manifest_size = store.blob_path(manifest.digest).stat().st_size
    except FileNotFoundError:
        raise IntegrityError(
            f"the manifest {manifest.digest} of {image.name} is missing from the store",
            f"run 'bootstrap fsck', then 'bootstrap pull {image.name}'",
        ) from None
    manifest_desc = Descriptor(
        manifest.media_type or "application/vnd.oci.image.manifest.v1+json",
        manifest.digest,
        manifest_size,
        {REF_NAME: image.name, CONTAINERD_NAME: image.name},
    )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [manifest_desc.to_json()],
    }
    blobs = [manifest_desc, manifest.config, *manifest.layers]
    sink = _Out(out, f"exporting {image.name}")
    stream = cast(IO[bytes], sink)
    with store.using(), tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", json.dumps(index, separators=(",", ":")).encode())
        _add_dir(tar, "blobs")
        seen: set[str] = set()
        algs: set[str] = set()
        for desc in blobs:
            if desc.digest in seen:
                continue
            seen.add(desc.digest)
            alg, hexpart = desc.digest.split(":", 1)
            if alg not in algs:
                algs.add(alg)
                _add_dir(tar, f"blobs/{alg}")
            _add_blob(tar, store, desc, f"blobs/{alg}/{hexpart}")
    sink.flush()
    return Exported(image.name, manifest.digest, len(seen), sink.size)


def _info(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = _MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_info(name, tarfile.DIRTYPE))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))


class _Verified(io.RawIOBase):
    """Reads a stored blob, hashing it; at its end (``size`` bytes) the digest must match."""

    def __init__(self, fh: BinaryIO, desc: Descriptor) -> None:
        super().__init__()
        self.fh = fh
        self.desc = desc
        alg = desc.digest.split(":", 1)[0]
        self.hasher = hashlib.new(alg)
        self.left = desc.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self.left, _CHUNK)
        if want <= 0:
            return 0
        data = self.fh.read(want)
        if len(data) < want:
            raise IntegrityError(
                f"stored blob {self.desc.digest} is shorter than its {self.desc.size} bytes",
                "run 'bootstrap fsck', then pull the image again",
            )
        self.hasher.update(data)
        self.left -= len(data)
        if self.left == 0 and f"{self.desc.digest.split(':', 1)[0]}:{self.hasher.hexdigest()}" != (
            self.desc.digest
        ):
            raise IntegrityError(
                f"stored blob {self.desc.digest} is damaged (its content hashes otherwise)",
                "run 'bootstrap fsck', then pull the image again",
            )
        buffer[: len(data)] = data
        return len(data)


def _add_blob(tar: tarfile.TarFile, store: Store, desc: Descriptor, name: str) -> None:
    with store.open_blob(desc.digest) as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        if size != desc.size:
            raise IntegrityError(
                f"stored blob {desc.digest} has {size} bytes, not the {desc.size} its "
                "descriptor says",
                "run 'bootstrap fsck', then pull the image again",
            )
        reader = io.BufferedReader(_Verified(fh, desc), _CHUNK)
        tar.addfile(_info(name, tarfile.REGTYPE, desc.size), reader)
