"""Pull orchestration: registry -> store, blobs verified, the tag written last.

:func:`pull_image` fetches the manifest (selecting a platform from an index), the config, then
the layers in parallel (bounded by ``jobs``), each through :meth:`Store.ensure_blob` (per-blob
lock, temp file, size and digest checked, rename). Only when every blob is stored does it point
the tag at what was pulled, so a pull killed at any point leaves a valid store; what it had
stored so far is reused by the next pull or removed by ``gc``. It holds :meth:`Store.using`
throughout, so a concurrent ``gc`` waits rather than deleting blobs the pull relies on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bootstrap.errors import BootstrapError, IntegrityError
from bootstrap.image.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER_FOREIGN,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    MAX_CONFIG_BYTES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ND_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Image,
    Index,
    Manifest,
    Platform,
)
from bootstrap.image.pipe import Cancelled, StreamedLayer
from bootstrap.image.store import ADMITTED_ANNOTATION, SOURCE_DIGEST_ANNOTATION, Store
from bootstrap.progress import Progress

if TYPE_CHECKING:
    from bootstrap.image.apply import UnpackOptions
    from bootstrap.image.reference import Reference
    from bootstrap.image.registry import FetchedManifest, RegistryClient

log = logging.getLogger(__name__)


_DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_CONFIG: OCI_CONFIG,
    DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
    DOCKER_LAYER_FOREIGN: OCI_LAYER_ND_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar": OCI_LAYER,
}


@dataclass(frozen=True)
class PullResult:
    """A finished pull. ``name``: the normalized reference now tagged in the store; ``digest``:
    what the registry served for it (the index or manifest digest: what ``REF@DIGEST`` pins);
    ``media_type``: its type; ``manifest_digest``: the registry's digest of the platform
    manifest pulled; ``stored_digest``: the manifest the tag points at in the store (differs
    from ``manifest_digest`` only when a Docker manifest was converted to OCI, see
    :func:`pull_image`); ``image``: the stored image; ``platform``: the platform selected from
    an index (None for a single manifest); ``size``: bytes of config and layers;
    ``downloaded``: bytes this pull fetched."""

    name: str
    digest: str
    image: Image
    media_type: str
    manifest_digest: str
    stored_digest: str
    platform: Platform | None
    size: int
    downloaded: int
    elapsed: float
    admitted: str = ""

    def to_json(self) -> dict[str, Any]:
        cfg = self.image.config
        return {
            "name": self.name,
            "digest": self.digest,
            "media_type": self.media_type,
            "manifest_digest": self.manifest_digest,
            "stored_digest": self.stored_digest,
            "config_digest": cfg.digest,
            "platform": str(self.platform or Platform(cfg.os, cfg.architecture)),
            "layers": [layer.digest for layer in self.image.manifest.layers],
            "size": self.size,
            "downloaded": self.downloaded,
            "elapsed": round(self.elapsed, 3),
            "admitted": self.admitted,
        }

    def to_text(self) -> str:
        return self.digest


class ImageVerifier(Protocol):
    """What the pull path needs of signature verification (``bootstrap.trust.verify.Verifier``
    implements it): given the reference, the manifest bytes exactly as fetched and their
    digest, and the registry client (for signatures stored in the registry), return what
    admitted the image (its ``str()`` is recorded) or raise ``TrustError`` (exit 7)."""

    def check_pull(
        self, reference: Reference, manifest: bytes, digest: str, client: RegistryClient
    ) -> object: ...


def pull_image(
    store: Store,
    reference: Reference,
    *,
    platform: Platform | None = None,
    client: RegistryClient | None = None,
    progress: Progress | None = None,
    jobs: int = 8,
    fetched: FetchedManifest | None = None,
    verifier: ImageVerifier | None = None,
    extract: UnpackOptions | None = None,
    verify_stored: bool = False,
) -> PullResult:
    """Pull ``reference`` into ``store`` and tag it as ``str(reference)``; return what was pulled.

    An index is resolved to ``platform`` (the host's by default) and, as ``skopeo copy`` without
    ``--all`` does, only that platform's image is stored: the tag names its manifest, never the
    index (umoci refuses a tag naming a multi-platform index as ambiguous). An OCI manifest is
    stored as served. A Docker v2 schema 2 manifest is converted to an OCI manifest over the
    same config and layer blobs (only media types change, as ``skopeo copy docker://...
    oci:...`` does), so ``$STORE/oci`` stays a layout skopeo and umoci read. When the digest the
    tag names differs from what the registry served for the reference (an index, or a
    converted manifest), the entry's ``io.bootstrap.source.digest`` annotation keeps the
    registry's digest (what ``pull`` prints, what ``REF@DIGEST`` pins). Pulling the same
    reference for another ``platform`` re-points the tag at that platform's manifest.
    ``fetched``: the manifest of ``reference`` when the caller already has it from ``client``
    (e.g. :meth:`RegistryClient.resolve`), so it is not fetched again.
    ``verifier``: the signature policy, consulted with the manifest as fetched (an index
    itself, when one is served) before any config or layer is downloaded; what it returns is
    recorded on the tag (``io.bootstrap.trust.admitted``). Every command that brings an image
    in passes one; None skips verification (library use and tests).
    ``extract``: also fill the layer cache (:func:`~bootstrap.image.layercache.ensure_layer`) with
    these options in the same pass: each layer downloaded now is teed into its blob temp file
    and, through a pipe, into an extractor thread, and neither is committed until the blob's
    size and digest and the layer's diff_id all match (a mismatch removes both). Layers whose
    blob is already stored or whose cache entry exists are not extracted here.
    ``verify_stored``: a blob already stored is hashed before it is taken as present (what
    ``bootstrap pull`` does); one that does not hash to its digest is moved aside and fetched
    again. Without it, a stored blob of the right size is present (fsck hashes).

    Raises :class:`RegistryError` (exit 3) for registry/network failures,
    :class:`IntegrityError` (exit 4) for content that does not match its digest or size (nothing
    of it is stored), :class:`UsageError` (exit 2) when no manifest matches the platform. Every
    blob is stored before the tag is written. A refusal by ``verifier`` raises its
    ``TrustError`` (exit 7) before anything of the image is stored.
    """
    if client is None:
        from bootstrap.image.registry import RegistryClient

        with RegistryClient.from_environment() as own:
            return pull_image(
                store,
                reference,
                platform=platform,
                client=own,
                progress=progress,
                jobs=jobs,
                fetched=fetched,
                verifier=verifier,
                extract=extract,
                verify_stored=verify_stored,
            )
    from bootstrap.image import manifest as mf

    progress = progress or Progress()
    name = str(reference)
    started = time.monotonic()
    store.init()
    with store.using():
        if fetched is None:
            fetched = client.get_manifest(reference)
        if reference.digest and fetched.digest != reference.digest:
            raise IntegrityError(
                f"{name}: the registry served manifest {fetched.digest}",
                "the registry or a mirror is serving wrong content",
            )
        admitted = ""
        if verifier is not None:
            admitted = str(verifier.check_pull(reference, fetched.data, fetched.digest, client))
        top = mf.parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        selected: Platform | None = None
        if isinstance(top, Index):
            wanted = platform or Platform.host()
            chosen = mf.select_platform(top, wanted)
            selected = chosen.platform or wanted
            sub = client.get_manifest(reference, digest=chosen.digest)
            served = mf.parse_manifest(sub.data, sub.media_type, sub.digest)
            if not isinstance(served, Manifest):
                raise IntegrityError(
                    f"{name}: index {top.digest} nests another index ({chosen.digest})",
                    "nested indexes are not supported; pull the inner index by digest",
                )
            log.debug("%s: selected %s for %s", name, chosen.digest, selected)
            manifest_data = sub.data
        else:
            served = top
            manifest_data = fetched.data

        fetched_bytes: dict[
            str, int
        ] = {}  # blob digest -> bytes this pull downloaded (one writer each)
        endpoint = fetched.endpoint

        diff_of: dict[str, str] = {}

        def fetch(desc: Descriptor, label: str, cancel: threading.Event | None = None) -> None:
            called = False
            streamed: StreamedLayer | None = None

            def download(write: Callable[[bytes], object]) -> None:
                nonlocal called, streamed
                called = True
                diff_id = diff_of.get(desc.digest)
                if extract is not None and diff_id is not None:
                    from bootstrap.image.layercache import cached_layer

                    if cached_layer(store, diff_id, extract) is None:
                        streamed = StreamedLayer(store, desc, diff_id, extract)
                tee = streamed

                def sink(chunk: bytes) -> None:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled()
                    write(chunk)
                    if tee is not None:
                        tee.write(chunk)
                    fetched_bytes[desc.digest] = fetched_bytes.get(desc.digest, 0) + len(chunk)
                    progress.advance(desc.digest, len(chunk))

                client.get_blob(reference, desc, sink, endpoint=endpoint)
                if tee is not None:
                    tee.end_of_stream()

            def commit_point() -> None:
                if streamed is not None:
                    streamed.wait_extracted()

            progress.add(desc.digest, desc.size, label)
            try:
                store.ensure_blob(desc, download, before_commit=commit_point, verify=verify_stored)
            except BaseException:
                if streamed is not None:
                    streamed.settle(commit=False)
                raise
            if streamed is not None:
                streamed.settle(commit=True)
            progress.done(
                desc.digest, "" if called else "already present" + (", verified" * verify_stored)
            )

        cfg_desc = served.config
        if cfg_desc.size > MAX_CONFIG_BYTES:
            raise IntegrityError(
                f"{name}: config {cfg_desc.digest} claims {cfg_desc.size} bytes",
                f"configs larger than {MAX_CONFIG_BYTES} bytes are refused",
            )
        fetch(cfg_desc, f"config {_short(cfg_desc.digest)}")
        config = mf.parse_config(
            store.read_blob(cfg_desc.digest, MAX_CONFIG_BYTES), cfg_desc.digest
        )
        if len(config.diff_ids) != len(served.layers):
            raise IntegrityError(
                f"{name}: manifest lists {len(served.layers)} layers, its config "
                f"{len(config.diff_ids)} diff_ids",
                "the image is malformed; report it to its publisher",
            )
        if platform is not None and selected is None:
            actual = Platform(config.os, config.architecture)
            if (actual.os, actual.architecture) != (platform.os, platform.architecture):
                log.warning(
                    "warning: %s: image platform %s does not match the expected platform %s "
                    "(a single-platform image, pulled as it is)",
                    name,
                    actual,
                    platform,
                )

        if extract is not None:
            diff_of.update(zip((d.digest for d in served.layers), config.diff_ids, strict=True))
            jobs = min(jobs, max(2, os.cpu_count() or 1))  # each job also inflates: one core
        _fetch_layers(served.layers, fetch, jobs)

        # every blob is in: now the manifest, then the tag
        if served.media_type == DOCKER_MANIFEST:
            oci_data = oci_manifest(manifest_data)
            desc = store.put_blob(oci_data, OCI_MANIFEST, verify=verify_stored)
            converted = mf.parse_manifest(oci_data, OCI_MANIFEST, desc.digest)
            if not isinstance(converted, Manifest):  # pragma: no cover - oci_manifest keeps kind
                raise IntegrityError(f"{name}: conversion to OCI failed", "report a bug")
            stored = converted
        else:
            desc = store.put_blob(
                manifest_data, served.media_type, digest=served.digest, verify=verify_stored
            )
            stored = served
        source = {SOURCE_DIGEST_ANNOTATION: fetched.digest} if fetched.digest != desc.digest else {}
        if admitted:
            source[ADMITTED_ANNOTATION] = admitted
        target = Descriptor(desc.media_type, desc.digest, desc.size, annotations=source)
        store.tag(name, target)
    size = cfg_desc.size + sum(layer.size for layer in served.layers)
    return PullResult(
        name=name,
        digest=fetched.digest,
        image=Image(name, stored, config),
        media_type=top.media_type,
        manifest_digest=served.digest,
        stored_digest=target.digest,
        platform=selected,
        size=size,
        downloaded=sum(fetched_bytes.values()),
        elapsed=time.monotonic() - started,
        admitted=admitted,
    )


def oci_manifest(data: bytes) -> bytes:
    """A Docker v2 schema 2 manifest rewritten as an OCI image manifest over the same blobs:
    the manifest's, config's and layers' media types mapped to their OCI equivalents, nothing
    else changed. Deterministic (same input, same bytes, same digest)."""
    doc = json.loads(data)
    doc["mediaType"] = OCI_MANIFEST
    doc["config"]["mediaType"] = _DOCKER_TO_OCI.get(doc["config"].get("mediaType"), OCI_CONFIG)
    for layer in doc.get("layers") or []:
        layer["mediaType"] = _DOCKER_TO_OCI.get(layer.get("mediaType"), layer.get("mediaType"))
    return json.dumps(doc, separators=(",", ":")).encode()


def _fetch_layers(
    layers: tuple[Descriptor, ...],
    fetch: Callable[[Descriptor, str, threading.Event | None], None],
    jobs: int,
) -> None:
    """Fetch every layer, at most ``jobs`` at once; distinct digests only. On the first failure
    stop the others (their write callbacks raise) and raise that failure."""
    unique: dict[str, tuple[int, Descriptor]] = {}
    for i, layer in enumerate(layers):
        unique.setdefault(layer.digest, (i, layer))
    if not unique:
        return
    cancel = threading.Event()
    n = len(layers)
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(unique))), thread_name_prefix="pull")
    futures: list[Future[None]] = []
    try:
        for i, layer in unique.values():
            label = f"layer {i + 1}/{n} {_short(layer.digest)}"
            futures.append(pool.submit(fetch, layer, label, cancel))
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:
        cancel.set()
        raise
    finally:
        if any(f.done() and f.exception() is not None for f in futures):
            cancel.set()
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)
    errors = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()]
    real = [e for e in errors if not isinstance(e, Cancelled)]
    first = next((e for e in real if isinstance(e, BootstrapError)), None) or (
        real[0] if real else None
    )
    if first is not None:
        raise first


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]
