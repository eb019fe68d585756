"""Push a stored image to a registry: the registry v2 upload protocol, blobs first, manifest last.

:func:`push_image` sends what the store holds under a reference to a ``docker://`` destination
through the same client as a pull (:class:`~bootstrap.image.registry.RegistryClient`: sessions
from :mod:`bootstrap.http`, ``auth.json`` credentials, ``certs.d`` CAs and client
certificates, registries.conf's ``insecure`` and ``blocked``), to the registry itself, never a
mirror (mirrors are for pulling, as in containers/image).

For each blob (config and layers) the destination is asked first (``HEAD
/v2/NAME/blobs/DIGEST``): one it has is not sent. Otherwise it is uploaded monolithically
(``POST /v2/NAME/blobs/uploads/``, then ``PUT`` of the whole blob to the ``Location`` it
answered with ``?digest=``), read from the store and hashed while it is sent: a stored blob
that does not hash to its digest stops the push (exit 4; ``bootstrap fsck --repair``), and the
registry checks the digest again. An upload that breaks is started again, twice at most. Once
every blob is there, the manifest is put under the destination's tag, as stored (so the
digest is the stored one: a Docker v2s2 image pulled earlier was stored as OCI, and is pushed
as OCI). A tag naming an index whose manifests are all stored is pushed whole (manifests,
then the index); otherwise the platform's manifest alone, as ``skopeo copy`` without
``--all``.

Signatures are not invented: the store keeps none (a pull verifies them and records what
admitted the image; that record is not a signature), so nothing is signed or copied; sign the
pushed image with ``skopeo``/``cosign`` where the key is (docs/trust.md).

Errors: registry and network failures :class:`~bootstrap.errors.RegistryError` (exit 3); a
damaged stored blob :class:`~bootstrap.errors.IntegrityError` (exit 4); a reference not stored
or a bad destination :class:`~bootstrap.errors.UsageError` (exit 2).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from bootstrap.errors import IntegrityError, RegistryError, UsageError
from bootstrap.image.model import Descriptor, Index, Manifest, Platform, new_hasher, split_digest
from bootstrap.image.reference import Reference
from bootstrap.image.store import Store
from bootstrap.image.transport import NET_ERRORS, TransientError, reason
from bootstrap.progress import Progress, counted, human_size

if TYPE_CHECKING:
    import requests

    from bootstrap.image.registries import Endpoint
    from bootstrap.image.registry import RegistryClient

log = logging.getLogger(__name__)

CHUNK = 1 << 20
UPLOAD_ATTEMPTS = 3
JOBS = 4


@dataclass(frozen=True)
class PushResult:
    """A finished push: the stored ``name``, the ``destination`` (normalized), the ``digest``
    of the manifest (or index) now tagged there, ``blobs_sent`` / ``blobs_present`` (asked
    for and found there already), ``bytes_sent``, ``manifests`` put."""

    name: str
    destination: str
    digest: str
    media_type: str
    blobs_sent: int
    blobs_present: int
    bytes_sent: int
    manifests: int
    elapsed: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "destination": self.destination,
            "digest": self.digest,
            "media_type": self.media_type,
            "blobs_sent": self.blobs_sent,
            "blobs_present": self.blobs_present,
            "bytes_sent": self.bytes_sent,
            "manifests": self.manifests,
            "signatures": 0,
            "elapsed": round(self.elapsed, 3),
        }

    def to_text(self) -> str:
        return self.digest


def parse_destination(text: str) -> Reference:
    """``docker://REF`` or a plain ``REF`` (as ``podman push`` takes it), normalized; it needs a
    tag (a digest names content, not a place to put it). Other transports, a digest or bad
    text: :class:`UsageError`."""
    transport, sep, rest = text.partition("://")
    if sep and transport != "docker":
        raise UsageError(
            f"push destination {text!r}: only docker:// destinations are supported",
            "push to a registry, e.g. docker://registry.example.com/ns/app:1; for an archive "
            "use skopeo copy oci:$STORE/oci:REF oci-archive:FILE",
        )
    if (
        not sep
        and ":" in text.split("/", 1)[0]
        and text.split(":", 1)[0]
        in (
            "oci",
            "oci-archive",
            "docker-archive",
            "dir",
            "containers-storage",
        )
    ):
        raise UsageError(
            f"push destination {text!r}: only docker:// destinations are supported",
            "push to a registry, e.g. docker://registry.example.com/ns/app:1",
        )
    ref = Reference.parse(rest if sep else text)
    if ref.digest is not None:
        raise UsageError(
            f"push destination {text!r} names a digest",
            "give a tag to push to (the digest is the pushed manifest's)",
        )
    return ref


def push_image(
    store: Store,
    name: str,
    destination: Reference,
    *,
    client: RegistryClient | None = None,
    progress: Progress | None = None,
    platform: Platform | None = None,
) -> PushResult:
    """Push the image stored as ``name`` to ``destination`` (see the module docstring).
    Holds :meth:`Store.using` throughout (gc waits)."""
    if client is None:
        from bootstrap.image.registry import RegistryClient

        with RegistryClient.from_environment() as own:
            return push_image(
                store, name, destination, client=own, progress=progress, platform=platform
            )
    progress = progress or Progress()
    started = time.monotonic()
    ep = client.conf.endpoints(destination)[-1]  # the registry itself: UsageError if blocked
    pusher = _Pusher(store, client, ep, progress)
    with store.using():
        top = store.resolve(name)
        data = store.read_blob(top.digest)
        from bootstrap.image import manifest as mf

        doc = mf.parse_manifest(data, top.media_type, top.digest)
        media_type = top.media_type
        manifests = 0
        if isinstance(doc, Index):
            stored = [d for d in doc.manifests if store.has_blob(d.digest)]
            if len(stored) == len(doc.manifests):
                for child in doc.manifests:
                    pusher.manifest(child, store.read_blob(child.digest), child.digest)
                    manifests += 1
                digest = pusher.put_manifest(
                    data, media_type, destination.tag or "latest", top.digest
                )
                manifests += 1
            else:
                image = store.image(name, platform)
                log.info(
                    "%s: %s of the index's %s stored; pushing the %s manifest alone (as "
                    "skopeo copy without --all)",
                    name,
                    len(stored),
                    counted(len(doc.manifests), "manifest"),
                    f"{image.config.os}/{image.config.architecture}",
                )
                mdesc = image.manifest
                mdata = store.read_blob(mdesc.digest)
                media_type = mdesc.media_type
                digest = pusher.manifest(
                    Descriptor(mdesc.media_type, mdesc.digest, len(mdata)),
                    mdata,
                    destination.tag or "latest",
                )
                manifests += 1
        else:
            digest = pusher.manifest(top, data, destination.tag or "latest")
            manifests += 1
    result = PushResult(
        name=name,
        destination=str(destination),
        digest=digest,
        media_type=media_type,
        blobs_sent=pusher.sent,
        blobs_present=pusher.present,
        bytes_sent=pusher.bytes_sent,
        manifests=manifests,
        elapsed=time.monotonic() - started,
    )
    log.info(
        "pushed %s to %s (%s): %s sent (%s), %s already there; no signatures (the store "
        "keeps none)",
        name,
        destination,
        digest,
        counted(result.blobs_sent, "blob"),
        human_size(result.bytes_sent),
        counted(result.blobs_present, "blob"),
    )
    return result


class _Body:
    """A stored blob as a request body: read in chunks, hashed and counted as it is sent;
    ``len()`` gives requests the Content-Length."""

    def __init__(self, fh: BinaryIO, size: int, digest: str, sent: Callable[[int], None]) -> None:
        self._fh = fh
        self._size = size
        self._hash = new_hasher(digest)
        self._sent = sent
        self.count = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self._fh.read(CHUNK):
            self._hash.update(chunk)
            self.count += len(chunk)
            self._sent(len(chunk))
            yield chunk

    def hexdigest(self) -> str:
        return str(self._hash.hexdigest())


class _Pusher:
    """The uploads of one push to one repository (``ep``); counts what it sent."""

    def __init__(
        self, store: Store, client: RegistryClient, ep: Endpoint, progress: Progress
    ) -> None:
        self.store = store
        self.transport = client.transport
        self.ep = ep
        self.repo = ep.reference.path
        self.progress = progress
        self.sent = self.present = self.bytes_sent = 0
        self._lock = threading.Lock()

    def manifest(self, desc: Descriptor, data: bytes, tag: str | None = None) -> str:
        """Push the blobs of manifest ``desc`` (bytes ``data``), then the manifest itself
        under ``tag`` (by its digest when None). Returns the digest the registry has."""
        from bootstrap.image import manifest as mf

        doc = mf.parse_manifest(data, desc.media_type, desc.digest)
        if not isinstance(doc, Manifest):
            raise IntegrityError(
                f"{desc.digest}: an index nested in an index", "push the inner index by itself"
            )
        blobs = [doc.config, *(layer for layer in doc.layers if not layer.urls)]
        unique = list({b.digest: b for b in blobs}.values())
        with ThreadPoolExecutor(
            max_workers=min(JOBS, len(unique)), thread_name_prefix="push"
        ) as pool:
            for future in [pool.submit(self.blob, b) for b in unique]:
                future.result()
        return self.put_manifest(data, desc.media_type, tag or desc.digest, desc.digest)

    def blob(self, desc: Descriptor) -> None:
        """Send blob ``desc`` unless the destination has it."""
        label = f"blob {split_digest(desc.digest)[1][:12]}"
        with self.store.using():
            if self._exists(desc):
                with self._lock:
                    self.present += 1
                self.progress.add(desc.digest, desc.size, label)
                self.progress.done(desc.digest, "already there")
                return
            self.progress.add(desc.digest, desc.size, label)
            for attempt in range(1, UPLOAD_ATTEMPTS + 1):
                try:
                    self._upload(desc)
                    break
                except TransientError as exc:
                    if attempt == UPLOAD_ATTEMPTS:
                        raise
                    log.info("%s: upload of %s broke (%s); starting again", self.ep.host,
                             desc.digest, exc.message)  # fmt: skip
                    time.sleep(0.5 * attempt)
        with self._lock:
            self.sent += 1
            self.bytes_sent += desc.size
        self.progress.done(desc.digest)

    def _exists(self, desc: Descriptor) -> bool:
        what = f"blob {desc.digest} at {self.ep.host}/{self.repo}"
        resp = self._call("HEAD", f"/v2/{self.repo}/blobs/{desc.digest}", {}, what=what)
        with resp:
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            raise self._refused(resp, what)

    def _upload(self, desc: Descriptor) -> None:
        what = f"upload of blob {desc.digest} to {self.ep.host}/{self.repo}"
        resp = self._call("POST", f"/v2/{self.repo}/blobs/uploads/", {"Content-Length": "0"},
                          what=what, body=lambda: b"")  # fmt: skip
        with resp:
            if resp.status_code != 202 or not resp.headers.get("Location"):
                raise self._refused(resp, what)
            location = resp.headers["Location"]
        target = _with_digest(location, desc.digest)
        opened: list[_Body] = []
        path = self.store.blob_path(desc.digest)

        def body() -> _Body:
            for b in opened:
                b._fh.close()
            fh = self.store.open_blob(desc.digest)
            b = _Body(fh, desc.size, desc.digest, lambda n: self.progress.advance(desc.digest, n))
            opened.append(b)
            return b

        headers = {"Content-Type": "application/octet-stream"}
        try:
            resp = self._call("PUT", target, headers, what=what, body=body)
            with resp:
                sent = opened[-1]
                actual = f"{split_digest(desc.digest)[0]}:{sent.hexdigest()}"
                if sent.count != desc.size or actual != desc.digest:
                    raise IntegrityError(
                        f"stored blob {desc.digest} ({path}) is damaged: it hashes to {actual} "
                        f"({sent.count} bytes); the registry refused it",
                        "run 'bootstrap fsck --repair', pull the image again, then push",
                    )
                if resp.status_code != 201:
                    raise self._refused(resp, what)
        finally:
            for b in opened:
                b._fh.close()

    def put_manifest(self, data: bytes, media_type: str, tag: str, ours: str) -> str:
        """Put manifest ``data`` (digest ``ours``) under ``tag`` (or its digest); return the
        digest the registry says it stored (it must be ours)."""
        what = f"manifest {self.ep.host}/{self.repo}:{tag}".replace(":sha256", "@sha256")
        resp = self._call("PUT", f"/v2/{self.repo}/manifests/{tag}", {"Content-Type": media_type},
                          what=what, body=lambda: data)  # fmt: skip
        with resp:
            if resp.status_code not in (200, 201):
                raise self._refused(resp, what)
            theirs = resp.headers.get("Docker-Content-Digest", "").strip() or ours
        if theirs != ours:
            raise RegistryError(
                f"{what}: the registry stored it as {theirs}, not {ours}",
                "the registry rewrote the manifest; push to another registry",
            )
        return ours

    def _call(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        *,
        what: str,
        body: Callable[[], Any] | None = None,
    ) -> requests.Response:
        try:
            return self.transport.upload(self.ep, method, target, headers, body)
        except RegistryError as exc:
            if "authentication failed" in exc.message or "access denied" in exc.message:
                hint = exc.hint.replace("no pull access", "no push access")
                raise RegistryError(
                    f"push to {self.ep.host}/{self.repo}: "
                    f"{exc.message.partition(': ')[2] or exc.message}",
                    hint if "push" in hint else f"{hint}; pushing needs push access",
                ) from exc
            raise
        except NET_ERRORS as exc:  # a body read that failed mid-request, a reset while sending
            raise TransientError(f"{what}: {reason(exc)}", "check the network; try again") from exc

    def _refused(self, resp: requests.Response, what: str) -> RegistryError:
        return self.transport.status_error(self.ep, resp, what)


def _with_digest(location: str, digest: str) -> str:
    """The upload ``Location`` with ``digest=DIGEST`` added to its query (it may carry its own
    ``_state``)."""
    parts = urlsplit(location)
    query = f"{parts.query}&digest={digest}" if parts.query else f"digest={digest}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
