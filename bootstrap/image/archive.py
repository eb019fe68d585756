"""Offline import: ``docker save`` tarballs, ``oci-archive`` tarballs and plain rootfs TARs.

The kind is detected from the content, never from the file name:

- a top-level ``manifest.json`` (a regular file) makes a **docker-archive**: for each entry
  ``{Config, RepoTags, Layers}`` the config and the layer tars are stored, each layer verified
  against the config's ``rootfs.diff_ids`` (docker layers are uncompressed; gzip/zstd ones are
  decompressed to check); an OCI manifest is written for them;
- top-level ``oci-layout`` and ``index.json`` make an **oci-archive**: every blob reachable from
  ``index.json`` is copied (digest-verified);
- anything else that is a tar (optionally gzip/zstd compressed) is a **rootfs tar**: stored as
  one layer as-is, with a minimal config (host platform, no command; ``created`` left out so the
  same tar always gives the same image digest).

Names: ``--name`` if given (then the archive must hold exactly one image), else the archive's
own tags (docker ``RepoTags``; OCI ``io.containerd.image.name`` or a full reference in
``org.opencontainers.image.ref.name``), normalized. A plain tar needs ``--name``.

Hostile archives: a member named with ``..`` or an absolute path, an unknown member type, a
metadata member (manifest.json, index.json, blobs) that is a link instead of a regular file, a
path in manifest.json that leaves the archive, a digest or diff_id mismatch: each is an
:class:`~bootstrap.errors.IntegrityError` (exit 4). The archive is only read, never extracted;
blobs enter the store verified (temp + fsync + rename) and the tag is written last, so a failed
import leaves at most unreferenced blobs that ``gc`` removes. A blob already stored is hashed
before it is taken as present (as ``bootstrap pull`` does): a damaged one is moved aside and
replaced from the archive, so importing an archive again heals what ``fsck`` found.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.image.model import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Descriptor,
    Index,
    Platform,
    check_digest,
    digest_of,
    matches,
)
from bootstrap.image.store import ADMITTED_ANNOTATION
from bootstrap.image.stream import Digesting
from bootstrap.image.tarstream import TarMember, scan_tar

if TYPE_CHECKING:
    from bootstrap.image.store import Store
    from bootstrap.settings import Settings

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_CONTAINERD_NAME = "io.containerd.image.name"
_MEDIA = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
_HINT = "the archive is damaged or hostile; nothing was imported under a name"
_KINDS_HINT = (
    "bootstrap import reads a docker-archive (docker save), an oci-archive or a root "
    "filesystem tar, optionally gzip- or zstd-compressed"
)
_INCOMPLETE_HINT = (
    "the file is incomplete: copy or download it again (compare its size with the original's); "
    "nothing was imported under a name"
)


@dataclass(frozen=True)
class ImportedImage:
    """One name the import tagged, and the manifest (or index) digest it points at."""

    name: str
    digest: str


@dataclass(frozen=True)
class ImportResult:
    """What ``bootstrap import`` stored: the detected ``kind`` (docker-archive, oci-archive,
    rootfs-tar) and the images tagged."""

    path: Path
    kind: str
    images: tuple[ImportedImage, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "images": [{"name": i.name, "digest": i.digest} for i in self.images],
        }

    def to_text(self) -> str:
        return "\n".join(f"{i.name} {i.digest}" for i in self.images)


def _compression_of(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith((b"BZh", b"\xfd7zXZ\x00")):
        raise UsageError(
            "bzip2/xz compressed archives are not supported",
            "decompress it first, or recompress with gzip or zstd",
        )
    return "none"


def _normalize(name: str) -> str:
    from bootstrap.image.reference import Reference

    return str(Reference.parse(name))


ArchiveAdmitter = Callable[[str, Path, str], object]
"""Signature policy for archives: called with the transport (``docker-archive``,
``oci-archive``, ``tarball``), the archive path and the name to be tagged, before anything is
stored; returns what admitted it (recorded on the tag) or raises ``TrustError`` (exit 7)."""


def import_command(
    settings: Settings, path: str, *, name: str | None, admit: ArchiveAdmitter | None = None
) -> ImportResult:
    """CLI entry: ``bootstrap import PATH [--name REF]``."""
    from bootstrap.image.store import Store

    normalized = _normalize(name) if name else None
    store = Store(settings.store)
    store.init()
    return import_archive(store, Path(path), normalized, admit=admit)


def import_archive(
    store: Store, path: Path, name: str | None, *, admit: ArchiveAdmitter | None = None
) -> ImportResult:
    """Import the archive at ``path`` (kind detected by content, see the module docstring) and
    tag it ``name`` (a reference; normalized here) or the archive's own names. ``admit``: the
    signature policy, asked once the kind is known and before any blob is stored (archives
    carry no signatures); None: no policy check.

    Raises UsageError (exit 2) for a missing/unreadable file, a file that is not a tar at all,
    a missing name, or ``name`` with a multi-image archive; IntegrityError (exit 4) for
    damaged, incomplete, hostile or inconsistent content, naming the archive, with a hint
    about the archive (never about pulling); TrustError (exit 7) when ``admit`` refuses."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(
            f"{path} is a directory, not an archive",
            f"give a tar file (e.g. tar -C {path} -cf rootfs.tar . then "
            "bootstrap import --name REF rootfs.tar)",
        )
    if not path.is_file():
        what = "no such file" if not os.path.lexists(path) else "not a regular file"
        raise UsageError(f"{path}: {what}", "give the path of a docker save, oci or tar file")
    name = _normalize(name) if name else None
    try:
        return _import(store, path, name, admit)
    except IntegrityError as exc:
        raise _about_the_archive(path, exc) from exc


def _about_the_archive(path: Path, exc: IntegrityError) -> IntegrityError:
    """``exc`` as the import's error: naming the archive, with a hint about the archive (an
    error raised by code shared with pulls speaks of registries and pulling again)."""
    message = exc.message
    if path.name not in message:
        message = f"{path}: {message}"
    if "truncated" in message or "ends early" in message:
        hint = _INCOMPLETE_HINT
    elif exc.hint.startswith((_INCOMPLETE_HINT, _KINDS_HINT)) or "stored blob" in message:
        hint = exc.hint  # about the archive already, or about the store's own damage
    elif "MAX_EXPANSION" in exc.hint or "BOOTSTRAP_" in exc.hint:
        hint = exc.hint  # a limit the user may raise
    else:
        hint = _HINT
    err = IntegrityError(message, hint)
    err.__dict__.update({k: v for k, v in exc.__dict__.items() if k not in ("message", "hint")})
    return err


def _scan_archive(
    hashing: Digesting, compression: str, path: Path, add: Callable[[TarMember], None]
) -> str:
    """:func:`scan_tar` over the whole archive file; its errors say what is wrong with the
    file (not a tar at all, damaged, incomplete) instead of speaking of a layer."""
    try:
        return scan_tar(hashing, compression, path.name, add)
    except IntegrityError as exc:
        detail = exc.message.removeprefix(f"layer {path.name}: ").removeprefix(f"{path.name}: ")
        detail = detail.removeprefix("malformed tar data: ")
        if "truncated" in detail:
            return _raise(f"{path}: the archive ends early ({detail})", _INCOMPLETE_HINT, exc)
        if "at offset 0" in detail:  # the very first header: not a tar at all (bad input)
            what = "not a tar archive" if compression == "none" else f"not a {compression} tar"
            raise UsageError(f"{path}: {what} ({detail})", f"{_KINDS_HINT}; is it one?") from exc
        return _raise(f"{path}: damaged tar archive ({detail})", _HINT, exc)


def _raise(message: str, hint: str, cause: BaseException) -> str:
    raise IntegrityError(message, hint) from cause


def _import(
    store: Store, path: Path, name: str | None, admit: ArchiveAdmitter | None
) -> ImportResult:
    with store.using():
        with path.open("rb") as fh:
            compression = _compression_of(fh.read(8))
            fh.seek(0)
            members: dict[str, TarMember] = {}
            hashing = Digesting(fh, algorithm="sha256")

            def add(m: TarMember) -> None:
                # docker-archive and oci-archive metadata and blobs are at most 3 levels deep
                # (manifest.json, <id>/layer.tar, blobs/sha256/<hex>); a big rootfs tar's deeper
                # members are not kept, so memory stays small
                if m.name.count("/") < 3:
                    members[m.name] = m

            diff_id = _scan_archive(hashing, compression, path, add)
        kind = _kind(members)
        admitted = ""
        if admit is not None:
            transport = "tarball" if kind == "rootfs-tar" else kind
            admitted = str(admit(transport, path.absolute(), name or str(path)))
        if kind == "rootfs-tar":
            images = [
                _import_rootfs(
                    store, path, name, compression, diff_id, hashing.digest(), hashing.count
                )
            ]
        elif compression != "none":
            raise UsageError(
                f"{path}: a compressed {kind} is not supported",
                f"decompress it first ({'gunzip' if compression == 'gzip' else 'unzstd'})",
            )
        else:
            reader = _Members(path, members)
            if kind == "docker-archive":
                images = _import_docker(store, reader, name)
            else:
                images = _import_oci(store, reader, name)
        if admitted:
            for image in images:
                store.annotate(image.name, {ADMITTED_ANNOTATION: admitted})
    for image in images:
        log.info("imported %s as %s", image.digest, image.name)
    return ImportResult(path, kind, tuple(images))


def _kind(members: dict[str, TarMember]) -> str:
    if "manifest.json" in members:
        return "docker-archive"
    if "oci-layout" in members and "index.json" in members:
        return "oci-archive"
    return "rootfs-tar"


class _Members:
    """Random access to regular-file members of an uncompressed archive."""

    def __init__(self, path: Path, members: dict[str, TarMember]) -> None:
        self.path = path
        self.members = members

    def get(self, name: str, what: str) -> TarMember:
        parts = [p for p in name.split("/") if p and p != "."]
        if name.startswith("/") or ".." in parts:
            raise IntegrityError(f"{self.path.name}: {what} {name!r} leaves the archive", _HINT)
        member = self.members.get("/".join(parts))
        if member is None:
            raise IntegrityError(f"{self.path.name}: {what} {name!r} is missing", _HINT)
        if member.kind != "0":
            raise IntegrityError(
                f"{self.path.name}: {what} {member.raw_name!r} is not a regular file "
                f"(tar type {member.kind!r})",
                _HINT,
            )
        return member

    def read(self, name: str, what: str, limit: int) -> bytes:
        member = self.get(name, what)
        if member.size > limit:
            raise IntegrityError(
                f"{self.path.name}: {what} {name!r} is {member.size} bytes (limit {limit})", _HINT
            )
        with self.path.open("rb") as fh:
            fh.seek(member.offset)
            data = fh.read(member.size)
        if len(data) != member.size:
            raise IntegrityError(f"{self.path.name}: {what} {name!r} is truncated", _HINT)
        return data

    def fetch(self, name: str, what: str) -> Callable[[Callable[[bytes], object]], None]:
        member = self.get(name, what)

        def fetch(write: Callable[[bytes], object]) -> None:
            with self.path.open("rb") as fh:
                fh.seek(member.offset)
                left = member.size
                while left:
                    chunk = fh.read(min(left, _CHUNK))
                    if not chunk:
                        raise IntegrityError(
                            f"{self.path.name}: {what} {name!r} is truncated", _HINT
                        )
                    write(chunk)
                    left -= len(chunk)

        return fetch

    def open_region(self, name: str, what: str) -> tuple[BinaryIO, int]:
        member = self.get(name, what)
        fh = self.path.open("rb")
        fh.seek(member.offset)
        return fh, member.size


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{where}: not valid JSON: {exc}", _HINT) from None
    except RecursionError:  # hostile nesting ([[[[...]]]]): json recurses per level
        raise IntegrityError(f"{where}: JSON nested too deeply", _HINT) from None


# ---- plain rootfs tar --------------------------------------------------------------------------


def _import_rootfs(
    store: Store,
    path: Path,
    name: str | None,
    compression: str,
    diff_id: str,
    blob_digest: str,
    size: int,
) -> ImportedImage:
    if name is None:
        raise UsageError(
            f"{path}: a plain rootfs tar carries no image name; --name is required",
            "e.g. bootstrap import --name example.com/rootfs:1 PATH",
        )
    layer = Descriptor(_MEDIA[compression], blob_digest, size)

    def fetch(write: Callable[[bytes], object]) -> None:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                write(chunk)

    store.ensure_blob(layer, fetch, verify=True)
    plat = Platform.host()
    config: dict[str, Any] = {
        "architecture": plat.architecture,
        "os": plat.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"bootstrap import {path.name}"}],
    }
    if plat.variant:
        config["variant"] = plat.variant
    cdesc = store.put_blob(_canonical(config), OCI_CONFIG, verify=True)
    return _tag_manifest(store, name, cdesc, [layer])


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _tag_manifest(
    store: Store, name: str, config: Descriptor, layers: list[Descriptor]
) -> ImportedImage:
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _plain(config),
        "layers": [_plain(d) for d in layers],
    }
    mdesc = store.put_blob(_canonical(manifest), OCI_MANIFEST, verify=True)
    store.tag(name, mdesc)
    return ImportedImage(name, mdesc.digest)


def _plain(desc: Descriptor) -> dict[str, Any]:
    return {"mediaType": desc.media_type, "digest": desc.digest, "size": desc.size}


# ---- docker save -------------------------------------------------------------------------------


def _import_docker(store: Store, reader: _Members, name: str | None) -> list[ImportedImage]:
    where = f"{reader.path.name}: manifest.json"
    doc = _json(reader.read("manifest.json", "manifest.json", MAX_MANIFEST_BYTES), where)
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise IntegrityError(f"{where}: expected a non-empty array of objects", _HINT)
    if name is not None and len(doc) != 1:
        raise UsageError(
            f"{reader.path}: holds {len(doc)} images; --name names one",
            "import without --name to use the archive's own tags",
        )
    plans: list[tuple[list[str], dict[str, Any], int]] = []
    for i, entry in enumerate(doc):
        tags = entry.get("RepoTags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise IntegrityError(f"{where}[{i}].RepoTags: expected an array of strings", _HINT)
        names = [name] if name is not None else [_normalize(t) for t in tags]
        if not names:
            raise UsageError(
                f"{reader.path}: image {i} has no RepoTags; --name is required",
                "give it a name with --name REF",
            )
        plans.append((names, entry, i))
    out: list[ImportedImage] = []
    for names, entry, i in plans:
        out.extend(_import_docker_image(store, reader, names, entry, f"{where}[{i}]"))
    return out


def _import_docker_image(
    store: Store, reader: _Members, names: list[str], entry: dict[str, Any], where: str
) -> list[ImportedImage]:
    from bootstrap.image.manifest import parse_config

    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str):
        raise IntegrityError(f"{where}.Config: expected a string", _HINT)
    if not isinstance(layer_names, list) or not all(isinstance(x, str) for x in layer_names):
        raise IntegrityError(f"{where}.Layers: expected an array of strings", _HINT)
    config_bytes = reader.read(config_name, "config", MAX_CONFIG_BYTES)
    config_digest = digest_of(config_bytes)
    config = parse_config(config_bytes, config_digest)
    if len(config.diff_ids) != len(layer_names):
        raise IntegrityError(
            f"{where}: {len(layer_names)} layers but the config lists "
            f"{len(config.diff_ids)} diff_ids",
            _HINT,
        )
    layers: list[Descriptor] = []
    for layer_name, diff_id in zip(layer_names, config.diff_ids, strict=True):
        layers.append(_docker_layer(store, reader, layer_name, diff_id))
    cdesc = store.put_blob(config_bytes, OCI_CONFIG, digest=config_digest, verify=True)
    return [_tag_manifest(store, n, cdesc, layers) for n in names]


def _docker_layer(store: Store, reader: _Members, layer_name: str, diff_id: str) -> Descriptor:
    member = reader.get(layer_name, "layer")
    fh, size = reader.open_region(layer_name, "layer")
    with fh:
        compression = _compression_of(fh.read(8))
    if compression == "none":
        desc = Descriptor(OCI_LAYER, diff_id, size)
        try:
            store.ensure_blob(desc, reader.fetch(layer_name, "layer"), verify=True)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{reader.path.name}: layer {member.raw_name!r} does not match the config's "
                f"diff_id {diff_id}: {exc.message}",
                _HINT,
            ) from exc
        return desc
    # a compressed layer: its diff_id is that of the decompressed stream, checked in the same
    # pass that stores it (nothing is stored when it does not match)

    def produce(write: Callable[[bytes], object]) -> None:
        region, left = reader.open_region(layer_name, "layer")
        with region:
            tee = Digesting(region, limit=left, tee=write)
            actual = scan_tar(tee, compression, f"layer {layer_name}", lambda m: None)
            while tee.read(_CHUNK):  # what follows the tar's end (compression trailer, padding)
                pass
        if tee.count != left:
            raise IntegrityError(
                f"{reader.path.name}: layer {member.raw_name!r} is truncated", _HINT
            )
        if actual != diff_id:
            raise IntegrityError(
                f"{reader.path.name}: layer {member.raw_name!r} is {actual}, the config says "
                f"{diff_id}",
                _HINT,
            )

    return store.put_stream(_MEDIA[compression], produce, verify=True)


# ---- oci-archive -------------------------------------------------------------------------------


def _blob_member(digest: str) -> str:
    alg, _, hexpart = check_digest(digest).partition(":")
    return f"blobs/{alg}/{hexpart}"


def _oci_names(entry: Descriptor, where: str) -> list[str]:
    candidate = entry.annotations.get(_CONTAINERD_NAME) or entry.annotations.get(
        REF_NAME_ANNOTATION
    )
    if not candidate:
        raise UsageError(
            f"{where} carries no image name; --name is required", "give one with --name REF"
        )
    if not any(c in candidate for c in "/:@"):
        raise UsageError(
            f"{where} names only the tag {candidate!r}, not an image; --name is required",
            "give one with --name REF",
        )
    return [_normalize(candidate)]


def _import_oci(store: Store, reader: _Members, name: str | None) -> list[ImportedImage]:
    from bootstrap.image.manifest import parse_manifest

    where = f"{reader.path.name}: index.json"
    layout = _json(reader.read("oci-layout", "oci-layout", 4096), f"{reader.path.name}: oci-layout")
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise IntegrityError(f"{reader.path.name}: oci-layout: no imageLayoutVersion", _HINT)
    index_bytes = reader.read("index.json", "index.json", MAX_MANIFEST_BYTES)
    index_digest = digest_of(index_bytes)
    index = parse_manifest(index_bytes, "", index_digest)
    if not isinstance(index, Index):
        raise IntegrityError(f"{where}: not an image index", _HINT)
    entries = index.manifests
    if not entries:
        raise IntegrityError(f"{where}: lists no images", _HINT)
    if name is not None and len(entries) != 1:
        raise UsageError(
            f"{reader.path}: holds {len(entries)} images; --name names one",
            "import without --name to use the archive's own names",
        )
    plans = [
        (
            [name] if name is not None else _oci_names(e, f"{where}: manifests[{i}]"),
            e,
        )
        for i, e in enumerate(entries)
    ]
    out: list[ImportedImage] = []
    for names, entry in plans:
        _copy_tree(store, reader, entry, 0)
        desc = Descriptor(entry.media_type, entry.digest, entry.size)
        for n in names:
            store.tag(n, desc)
            out.append(ImportedImage(n, entry.digest))
    return out


def _copy_tree(store: Store, reader: _Members, desc: Descriptor, depth: int) -> None:
    """Copy the manifest or index ``desc`` and everything it references into the store."""
    from bootstrap.image.manifest import parse_manifest

    if depth > 2:
        raise IntegrityError(f"{reader.path.name}: indexes nested too deeply", _HINT)
    member = _blob_member(desc.digest)
    data = reader.read(member, "manifest", MAX_MANIFEST_BYTES)
    if len(data) != desc.size or not matches(data, desc.digest):
        raise IntegrityError(
            f"{reader.path.name}: {member} does not match its descriptor "
            f"({desc.size} bytes, {desc.digest})",
            _HINT,
        )
    doc = parse_manifest(data, desc.media_type, desc.digest)
    if isinstance(doc, Index):
        copied = 0
        for child in doc.manifests:
            if _blob_member(child.digest) not in reader.members:
                log.info("%s: manifest %s not in the archive, skipped", reader.path, child.digest)
                continue
            _copy_tree(store, reader, child, depth + 1)
            copied += 1
        if not copied:
            raise IntegrityError(f"{reader.path.name}: index {desc.digest} has no manifests", _HINT)
    else:
        for blob in (doc.config, *doc.layers):
            if blob.urls and _blob_member(blob.digest) not in reader.members:
                raise IntegrityError(
                    f"{reader.path.name}: foreign layer {blob.digest} is not in the archive",
                    "bootstrap imports archives offline; include the layer",
                )
            try:
                store.ensure_blob(
                    Descriptor(blob.media_type, blob.digest, blob.size),
                    reader.fetch(_blob_member(blob.digest), "blob"),
                    verify=True,
                )
            except IntegrityError as exc:
                raise IntegrityError(
                    f"{reader.path.name}: {_blob_member(blob.digest)} does not match its "
                    f"descriptor: {exc.message.removeprefix(f'blob {blob.digest}: ')}",
                    _HINT,
                ) from exc
    store.put_blob(data, desc.media_type, digest=desc.digest, verify=True)
