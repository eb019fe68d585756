"""Manifest, index and image-config documents: parsing into :mod:`bootstrap.image.model` types,
and choosing a platform from an index.

Malformed documents raise :class:`IntegrityError` (exit 4) naming the field; Docker schema 1
manifests raise :class:`RegistryError` (exit 3) with a hint to re-push the image; a platform that
is not in an index raises :class:`UsageError` (exit 2) listing the platforms that are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from bootstrap.errors import IntegrityError, RegistryError, UsageError
from bootstrap.image.model import (
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1,
    DOCKER_V1_SIGNED,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    check_digest,
)

KNOWN_TYPES = MANIFEST_TYPES | INDEX_TYPES
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream"})
_HINT = "the registry sent a malformed manifest; check the image or the registry"


def schema1_error(where: str) -> RegistryError:
    return RegistryError(
        f"{where}: the manifest is Docker schema 1, which is not supported",
        "re-push the image with a current docker, skopeo or buildah (v2 schema 2 or OCI)",
    )


def clean_media_type(content_type: str | None) -> str:
    """A Content-Type header without parameters, lower-cased (``""`` if absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def sniff_media_type(doc: dict[str, Any]) -> str:
    """Guess the media type of a manifest document without one (containers/image
    ``GuessMIMEType``): ``manifests`` -> index, ``config`` + ``layers`` -> manifest (Docker if
    the config is a Docker config), schema 1 markers -> the schema 1 type, else ""."""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1 or "fsLayers" in doc or "signatures" in doc:
        return DOCKER_V1_SIGNED
    if "manifests" in doc:
        return OCI_INDEX
    config = doc.get("config")
    if isinstance(config, dict) and "layers" in doc:
        return DOCKER_MANIFEST if config.get("mediaType") == DOCKER_CONFIG else OCI_MANIFEST
    return ""


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{what}: not valid JSON: {exc}", _HINT) from None
    except RecursionError:  # hostile nesting ([[[[...]]]]): json recurses per level
        raise IntegrityError(f"{what}: JSON nested too deeply", _HINT) from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{what}: not a JSON object", _HINT)
    return doc


def parse_manifest(data: bytes, media_type: str, digest: str) -> Manifest | Index:
    """Parse manifest bytes whose digest is ``digest``.

    ``media_type`` is the Content-Type the registry sent (or the stored descriptor's); when it is
    empty or generic the document's ``mediaType`` is used, else the type is sniffed. A document
    whose ``mediaType`` contradicts a specific ``media_type`` is refused."""
    check_digest(digest, "manifest digest")
    where = f"manifest {digest}"
    given = clean_media_type(media_type)
    if given in (DOCKER_V1, DOCKER_V1_SIGNED):
        raise schema1_error(where)
    doc = _load_json(data, where)
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise IntegrityError(f"{where}: mediaType is not a string", _HINT)
    sniffed = sniff_media_type(doc)
    if sniffed in (DOCKER_V1, DOCKER_V1_SIGNED):
        raise schema1_error(where)
    mtype = given if given not in _GENERIC_TYPES else sniffed
    if mtype not in KNOWN_TYPES:
        raise IntegrityError(
            f"{where}: unsupported manifest media type {mtype or '(none)'!r}",
            "supported: OCI image manifest/index, Docker v2 schema 2 manifest/list",
        )
    if declared and declared != mtype:
        raise IntegrityError(
            f"{where}: mediaType {declared!r} in the document contradicts {mtype!r}", _HINT
        )
    if doc.get("schemaVersion") != 2:
        raise IntegrityError(
            f"{where}: schemaVersion is {doc.get('schemaVersion')!r}, expected 2", _HINT
        )
    if mtype == DOCKER_MANIFEST and declared != DOCKER_MANIFEST:
        raise IntegrityError(f"{where}: a Docker v2 manifest must declare its mediaType", _HINT)
    if mtype in INDEX_TYPES:
        if "config" in doc or "layers" in doc:
            raise IntegrityError(f"{where}: an index must not have config or layers", _HINT)
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise IntegrityError(f"{where}: manifests: expected an array", _HINT)
        descs = tuple(
            Descriptor.from_json(m, f"{where}: manifests[{i}]") for i, m in enumerate(manifests)
        )
        return Index(mtype, digest, descs)
    if "manifests" in doc:
        raise IntegrityError(f"{where}: an image manifest must not have manifests", _HINT)
    config = Descriptor.from_json(doc.get("config"), f"{where}: config")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, list):
        raise IntegrityError(f"{where}: layers: expected an array", _HINT)
    layers = tuple(
        Descriptor.from_json(layer, f"{where}: layers[{i}]") for i, layer in enumerate(layers_doc)
    )
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise IntegrityError(f"{where}: annotations: not a string map", _HINT)
    return Manifest(mtype, digest, config, layers, dict(annotations))


# --- platform selection --------------------------------------------------------------------


def _variants(architecture: str, variant: str) -> list[str]:
    """Variants acceptable for a wanted (architecture, variant), best first (containers/image
    platform matcher: an armv7 host runs v6 and v5; arm64 "" means v8; amd64 "" means v1)."""
    if architecture == "arm64":
        if variant in ("", "v8"):
            return ["v8", ""]
        return [variant]
    if architecture == "arm":
        order = ["v8", "v7", "v6", "v5"]
        if variant == "":
            variant = "v7"
        if variant in order:
            return [*order[order.index(variant) :], ""]
        return [variant]
    if architecture == "amd64":
        order = ["v4", "v3", "v2", "v1"]
        if variant == "":
            return ["", "v1"]
        if variant in order:
            return [*order[order.index(variant) :], ""]
        return [variant]
    return [variant] if variant else [""]


def _available(manifests: Iterable[Descriptor]) -> str:
    seen: list[str] = []
    for d in manifests:
        name = str(d.platform) if d.platform is not None else "(no platform)"
        if name not in seen:
            seen.append(name)
    return ", ".join(seen) or "none"


def select_platform(index: Index, platform: Platform) -> Descriptor:
    """The descriptor in ``index`` for ``platform``: same os and architecture and the best
    compatible variant; among equals the first. Entries without a platform, with os/arch
    ``unknown`` (attestations) or of non-manifest types are never chosen. Raises
    :class:`UsageError` listing the available platforms when nothing fits."""
    wanted = _variants(platform.architecture, platform.variant)
    best: Descriptor | None = None
    best_rank = len(wanted)
    for desc in index.manifests:
        p = desc.platform
        if p is None or desc.media_type not in KNOWN_TYPES:
            continue
        if p.os != platform.os or p.architecture != platform.architecture:
            continue
        if p.variant not in wanted:
            continue
        rank = wanted.index(p.variant)
        if rank < best_rank:
            best, best_rank = desc, rank
    if best is None:
        raise UsageError(
            f"image index {index.digest} has no manifest for platform {platform}",
            f"available: {_available(index.manifests)}; choose one with --platform",
        )
    return best


# --- image config --------------------------------------------------------------------------


def _str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise IntegrityError(f"{where}: expected an array of strings", _CONFIG_HINT)
    return tuple(value)


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise IntegrityError(f"{where}: expected a string", _CONFIG_HINT)
    return value


def _keys(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise IntegrityError(f"{where}: expected an object", _CONFIG_HINT)
    return tuple(sorted(str(k) for k in value))


_CONFIG_HINT = "the image config is malformed; check the image"


def parse_config(data: bytes, digest: str) -> ImageConfig:
    """Parse image config bytes (OCI or Docker) whose digest is ``digest``; the caller has
    verified the digest. Raises :class:`IntegrityError` naming the field that does not fit."""
    check_digest(digest, "config digest")
    where = f"image config {digest}"
    doc = _load_json(data, where)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise IntegrityError(f"{where}: rootfs: expected an object", _CONFIG_HINT)
    if rootfs.get("type") != "layers":
        raise IntegrityError(f"{where}: rootfs.type: expected 'layers'", _CONFIG_HINT)
    diff_ids = _str_tuple(rootfs.get("diff_ids"), f"{where}: rootfs.diff_ids")
    for i, d in enumerate(diff_ids):
        check_digest(d, f"{where}: rootfs.diff_ids[{i}]")
    cfg = doc.get("config")
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise IntegrityError(f"{where}: config: expected an object", _CONFIG_HINT)
    labels = cfg.get("Labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise IntegrityError(f"{where}: config.Labels: expected a string map", _CONFIG_HINT)
    return ImageConfig(
        digest=digest,
        os=_str(doc.get("os"), f"{where}: os"),
        architecture=_str(doc.get("architecture"), f"{where}: architecture"),
        diff_ids=diff_ids,
        entrypoint=_str_tuple(cfg.get("Entrypoint"), f"{where}: config.Entrypoint"),
        cmd=_str_tuple(cfg.get("Cmd"), f"{where}: config.Cmd"),
        env=_str_tuple(cfg.get("Env"), f"{where}: config.Env"),
        working_dir=_str(cfg.get("WorkingDir"), f"{where}: config.WorkingDir"),
        user=_str(cfg.get("User"), f"{where}: config.User"),
        labels=dict(labels),
        stop_signal=_str(cfg.get("StopSignal"), f"{where}: config.StopSignal"),
        exposed_ports=_keys(cfg.get("ExposedPorts"), f"{where}: config.ExposedPorts"),
        volumes=_keys(cfg.get("Volumes"), f"{where}: config.Volumes"),
    )


CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
MANIFEST_ACCEPT = ", ".join(
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, f"{DOCKER_V1_SIGNED};q=0.5"]
)
