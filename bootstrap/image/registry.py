"""The registry v2 protocol: manifests and blobs, mirrors in order, resumed blob downloads.

One :class:`RegistryClient` serves one pull (or many); it is safe to use from several threads
(layers download in parallel). Requests go through its
:class:`~bootstrap.image.transport.Transport` (sessions, TLS, ping, auth and tokens).

Endpoints (mirrors, then the registry itself) are tried in order. A mirror that is not the last
endpoint fails fast: a connect error (refused, unreachable, DNS failure, connect timeout) is not
retried, the next endpoint is tried at once, and the mirror is skipped for
:data:`~bootstrap.image.transport.DOWN_SECONDS` by this client; 429/5xx from it are retried by
the session's policy, then the next endpoint is tried. The last endpoint, and the registry
itself, get the full policy. Each endpoint's failure is logged once at INFO. A blob download
that stalls or breaks mid-body is resumed with ``Range`` from the bytes kept.

Errors: network and registry failures raise :class:`RegistryError` (exit 3), content that is not
what it claims :class:`IntegrityError` (exit 4), bad configuration :class:`UsageError` (exit 2).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import requests

from bootstrap.errors import IntegrityError, RegistryError
from bootstrap.image import registries
from bootstrap.image.auth import Credentials, TokenCache, load_credentials
from bootstrap.image.manifest import (
    KNOWN_TYPES,
    MANIFEST_ACCEPT,
    clean_media_type,
    schema1_error,
    sniff_media_type,
)
from bootstrap.image.model import (
    DOCKER_V1,
    DOCKER_V1_SIGNED,
    MAX_MANIFEST_BYTES,
    Descriptor,
    check_digest,
    digest_of,
    split_digest,
)
from bootstrap.image.reference import Reference
from bootstrap.image.registries import Endpoint, RegistriesConf
from bootstrap.image.transport import (
    NET_ERRORS,
    NotFoundError,
    TransientError,
    Transport,
    UnreachableError,
    reason,
)

__all__ = ["FetchedManifest", "NotFoundError", "RegistryClient", "TransientError"]

CHUNK_SIZE = 1024 * 1024
BLOB_ATTEMPTS = 6
BLOB_BACKOFF = 0.5
MAX_BACKOFF = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchedManifest:
    """Manifest bytes as served; ``digest`` is of ``data`` (verified when asked by digest);
    ``endpoint`` is the host[:port] that served it (pass it to :meth:`get_blob`);
    ``reference`` is the reference as rewritten for that endpoint."""

    data: bytes
    media_type: str
    digest: str
    endpoint: str
    reference: Reference | None = None


class RegistryClient:
    """Talks to v2 registries for pulls. See the module docstring for behaviour."""

    def __init__(
        self,
        conf: RegistriesConf | None = None,
        credentials: Credentials | None = None,
        session: requests.Session | None = None,
        *,
        mirror_session: requests.Session | None = None,
        blob_attempts: int = BLOB_ATTEMPTS,
        blob_backoff: float = BLOB_BACKOFF,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        """``session`` serves the last endpoint and the registry itself (full retry policy;
        default :func:`~bootstrap.http.new_session`); ``mirror_session`` the mirrors before it
        (must not retry connect errors; default: like ``session`` but with
        ``connect_retries=0``). Sessions passed in are not closed by :meth:`close`.
        ``blob_attempts``, ``blob_backoff``: how often and how patiently a broken blob download
        is resumed; ``chunk_size``: bytes per read of a body."""
        self.conf = conf if conf is not None else RegistriesConf()
        self.credentials = credentials if credentials is not None else Credentials.empty()
        self.transport = Transport(
            self.conf, self.credentials, session, mirror_session=mirror_session
        )
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self._blob_attempts = max(1, blob_attempts)
        self._blob_backoff = blob_backoff
        self._chunk_size = chunk_size

    @classmethod
    def from_environment(cls, session: requests.Session | None = None) -> RegistryClient:
        """A client with registries.conf, auth files and certs.d from the usual places."""
        return cls(registries.load(), load_credentials(), session)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sessions (those this client made) and remove temporary CA bundles."""
        self.transport.close()

    @property
    def tokens(self) -> TokenCache:
        """The bearer tokens cached by this client's transport."""
        return self.transport.tokens

    def ping(self, ref: Reference) -> str:
        """Ping the registry of ``ref`` itself (not its mirrors) and return ``scheme://host``."""
        return self.transport.base_url(self.conf.endpoints(ref)[-1])

    # --- manifests -------------------------------------------------------------------------

    def get_manifest(self, ref: Reference, digest: str | None = None) -> FetchedManifest:
        """Fetch the manifest (or index) of ``ref``: by ``digest`` if given, else by
        ``ref.digest``, else by ``ref.tag``; from each endpoint in order (mirrors first) until
        one serves it. Bytes fetched by digest are verified (:class:`IntegrityError`); more than
        :data:`MAX_MANIFEST_BYTES` is refused (:class:`IntegrityError`); schema 1 is refused
        (:class:`RegistryError`); nowhere found or reachable: :class:`RegistryError`."""
        want = digest or ref.digest
        target = ref if want is None or ref.digest == want else ref.with_digest(want)
        errors: list[tuple[Endpoint, RegistryError]] = []
        endpoints = self.conf.endpoints(target)
        for i, ep in enumerate(endpoints):
            try:
                return self._manifest_at(ep, want, _fails_fast(endpoints, i))
            except IntegrityError:
                raise
            except RegistryError as exc:
                errors.append((ep, exc))
                self._moving_on(endpoints, i, exc)
        if len(errors) == 1:
            raise errors[0][1]
        if isinstance(errors[-1][1], NotFoundError):
            # the registry itself (always last) says it does not exist: that is the answer
            others = "; ".join(
                e.message for _, e in errors[:-1] if not isinstance(e, NotFoundError)
            )
            raise NotFoundError(
                f"{target}: manifest not found (tried {', '.join(ep.host for ep, _ in errors)})"
                + (f"; also: {others}" if others else ""),
                "check the repository name, tag and digest",
            )
        detail = "; ".join(f"{_role(ep)} {e.message}" for ep, e in errors)
        raise _aggregate(errors)(
            f"{target}: none of the {len(errors)} endpoints served the manifest: {detail}",
            errors[-1][1].hint,
        )

    def head_digest(self, ref: Reference) -> str:
        """The digest ``ref``'s tag names now, from one ``HEAD`` of its manifest (its
        ``Docker-Content-Digest`` header), asked of each endpoint in order (mirrors first) with
        the same auth and ``Accept`` as :meth:`get_manifest`. An endpoint that answers without
        the header (some mirrors) is asked with a ``GET`` instead, whose bytes are hashed.
        Raises :class:`NotFoundError` / :class:`RegistryError` as :meth:`get_manifest`."""
        errors: list[tuple[Endpoint, RegistryError]] = []
        endpoints = self.conf.endpoints(ref)
        for i, ep in enumerate(endpoints):
            fast = _fails_fast(endpoints, i)
            r = ep.reference
            tag = ref.digest or r.tag or "latest"
            what = f"manifest {r.domain}/{r.path}:{tag}".replace(":sha", "@sha")
            try:
                resp = self.transport.request(
                    ep, f"/v2/{r.path}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT}, fast, "HEAD"
                )
                with resp:
                    if resp.status_code != 200:
                        raise self.transport.status_error(ep, resp, what)
                    header = resp.headers.get("Docker-Content-Digest", "").strip()
                if header:
                    return check_digest(header, f"{what}: Docker-Content-Digest")
                log.debug("%s: HEAD gave no Docker-Content-Digest; fetching it", what)
                return self._manifest_at(ep, ref.digest, fast).digest
            except IntegrityError:
                raise
            except RegistryError as exc:
                errors.append((ep, exc))
                self._moving_on(endpoints, i, exc)
        if len(errors) == 1 or isinstance(errors[-1][1], NotFoundError):
            raise errors[-1][1]
        detail = "; ".join(f"{_role(ep)} {e.message}" for ep, e in errors)
        raise _aggregate(errors)(
            f"{ref}: none of the {len(errors)} endpoints answered for the manifest: {detail}",
            errors[-1][1].hint,
        )

    def _moving_on(self, eps: list[Endpoint], i: int, exc: RegistryError) -> None:
        """Log, once per host and client, that ``eps[i]`` failed and the next is tried."""
        if i + 1 >= len(eps) or isinstance(exc, NotFoundError):
            return  # the caller reports the last failure; a mirror without the tag is normal
        ep = eps[i]
        with self._lock:
            if ep.host in self._logged:
                return
            self._logged.add(ep.host)
        reason = exc.message.removeprefix(f"{ep.host}: ")
        log.info("%s %s failed: %s; trying %s", _role(ep), ep.host, reason, eps[i + 1].host)

    def _manifest_at(self, ep: Endpoint, want: str | None, fast: bool) -> FetchedManifest:
        ref = ep.reference
        tag_or_digest = want or ref.tag or "latest"
        what = f"manifest {ref.domain}/{ref.path}:{tag_or_digest}".replace(":sha", "@sha")
        resp = self.transport.request(
            ep, f"/v2/{ref.path}/manifests/{tag_or_digest}", {"Accept": MANIFEST_ACCEPT}, fast
        )
        with resp:
            if resp.status_code != 200:
                raise self.transport.status_error(ep, resp, what)
            ctype = clean_media_type(resp.headers.get("Content-Type"))
            if ctype in (DOCKER_V1, DOCKER_V1_SIGNED):
                raise schema1_error(what)
            buf = bytearray()
            try:
                for chunk in resp.iter_content(64 * 1024):
                    buf += chunk
                    if len(buf) > MAX_MANIFEST_BYTES:
                        raise IntegrityError(
                            f"{what}: larger than {MAX_MANIFEST_BYTES} bytes",
                            "refusing an oversized manifest; check the registry",
                        )
            except NET_ERRORS as exc:
                raise TransientError(
                    f"{what}: reading from {ep.host} failed: {reason(exc)}",
                    "check the network; try again",
                ) from exc
        data = bytes(buf)
        if want is not None:
            actual = digest_of(data, split_digest(want)[0])
            if actual != want:
                raise IntegrityError(
                    f"{what}: {ep.host} sent bytes with digest {actual}",
                    "the registry or a mirror serves wrong content; do not trust it",
                )
            digest = want
        else:
            digest = digest_of(data, "sha256")
        media_type = ctype
        if ctype not in KNOWN_TYPES:
            try:
                doc = json.loads(data)
            except (ValueError, RecursionError):  # not JSON, or hostile nesting
                doc = None
            sniffed = sniff_media_type(doc) if isinstance(doc, dict) else ""
            if sniffed in (DOCKER_V1, DOCKER_V1_SIGNED):
                raise schema1_error(what)
            media_type = sniffed or ctype
        return FetchedManifest(data, media_type, digest, ep.host, ref)

    def resolve(self, text: str, digest: str | None = None) -> tuple[Reference, FetchedManifest]:
        """For what a user typed: try each candidate of
        :meth:`RegistriesConf.unqualified_search` in order and return the first reference whose
        manifest is found, with it. Integrity errors are raised at once."""
        candidates = self.conf.unqualified_search(text)
        errors: list[RegistryError] = []
        for ref in candidates:
            try:
                return ref, self.get_manifest(ref, digest)
            except IntegrityError:
                raise
            except RegistryError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise RegistryError(
            f"{text}: not found in any search registry: " + "; ".join(e.message for e in errors),
            errors[-1].hint,
        )

    # --- blobs -----------------------------------------------------------------------------

    def _blob_endpoints(self, ref: Reference, digest: str, endpoint: str | None) -> list[Endpoint]:
        eps: list[Endpoint] = []
        seen: set[tuple[str, str]] = set()
        for ep in [*self.conf.endpoints(ref), *self.conf.endpoints(replace(ref, digest=digest))]:
            k = (ep.host, ep.reference.path)
            if k not in seen:
                seen.add(k)
                eps.append(ep)
        if endpoint is not None:
            eps.sort(key=lambda e: e.host != endpoint)
        return eps

    def get_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        write: Callable[[bytes], object],
        *,
        progress: Callable[[int], None] | None = None,
        endpoint: str | None = None,
    ) -> None:
        """Stream blob ``desc`` of ``ref``'s repository to ``write`` in chunks.

        ``endpoint`` (the host that served the manifest) is tried first, then the other
        endpoints. A broken or stalled transfer resumes with ``Range: bytes=N-`` (N = bytes
        already written; a 200 answer has its first N bytes skipped), up to ``blob_attempts``
        tries without progress, with backoff. ``progress(n)`` gets the number of new bytes after
        each chunk. More bytes than ``desc.size`` raise :class:`IntegrityError` before they are
        written; a failure after the retries raises :class:`RegistryError` naming the blob.
        The digest is not checked here: the caller hashes what ``write`` receives.
        Exceptions from ``write`` propagate unchanged."""
        offset = 0
        errors: list[str] = []
        last: RegistryError | None = None
        eps = self._blob_endpoints(ref, desc.digest, endpoint)
        for i, ep in enumerate(eps):
            try:
                offset = self._blob_from(ep, desc, write, progress, offset, _fails_fast(eps, i))
                return
            except NotFoundError as exc:
                last = exc
                errors.append(f"{ep.host}: not found")
            except TransientError as exc:
                last = exc
                errors.append(f"{ep.host}: {exc.message}")
            except _BlobProgress as stop:
                offset = stop.offset
                last = stop.error
                errors.append(f"{ep.host}: {stop.error.message}")
            self._moving_on(eps, i, last)
        assert last is not None
        if len(errors) == 1:
            raise last
        raise type(last)(f"blob {desc.digest} of {ref.repository}: " + "; ".join(errors), last.hint)

    def _blob_from(
        self,
        ep: Endpoint,
        desc: Descriptor,
        write: Callable[[bytes], object],
        progress: Callable[[int], None] | None,
        offset: int,
        fast: bool,
    ) -> int:
        path = f"/v2/{ep.reference.path}/blobs/{desc.digest}"
        what = f"blob {desc.digest} of {ep.host}/{ep.reference.path}"
        failures = 0
        attempts = 0
        while True:
            if offset == desc.size and offset > 0:
                return offset
            attempts += 1
            start = offset
            reason: str
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                resp = self.transport.request(ep, path, headers, fast)
            except UnreachableError as exc:
                if fast:  # another endpoint remains: try it now
                    if offset:
                        raise _BlobProgress(offset, exc) from exc
                    raise
                reason = exc.message
            except TransientError as exc:
                reason = exc.message
            else:
                with resp:
                    if resp.status_code == 416 and offset:
                        raise IntegrityError(
                            f"{what}: the registry has no bytes after {offset}, the manifest "
                            f"declares {desc.size}",
                            "the registry serves wrong content; do not trust it",
                        )
                    if resp.status_code not in (200, 206):
                        err = self.transport.status_error(ep, resp, what)
                        if not isinstance(err, TransientError):
                            if offset and isinstance(err, NotFoundError):
                                raise _BlobProgress(offset, err)
                            raise err
                        reason = err.message
                    else:
                        skip = self._skip_for(resp, offset, what)
                        offset, reason = self._stream_body(
                            resp, desc, write, progress, offset, skip, what
                        )
                        if offset == desc.size:
                            return offset
            if offset > start:
                failures = 0  # progress: the budget starts again
            failures += 1
            # give up after blob_attempts failures in a row without progress, or after
            # 4 x blob_attempts attempts in all (a server trickling bytes between resets)
            if failures >= self._blob_attempts or attempts >= 4 * self._blob_attempts:
                err = TransientError(
                    f"{what}: {reason} (gave up after {attempts} attempts, at byte {offset} "
                    f"of {desc.size})",
                    "the registry or network keeps failing; try again later",
                )
                if offset:
                    raise _BlobProgress(offset, err)
                raise err
            time.sleep(min(self._blob_backoff * (2 ** (failures - 1)), MAX_BACKOFF))

    @staticmethod
    def _skip_for(resp: requests.Response, offset: int, what: str) -> int:
        if not offset:
            return 0
        if resp.status_code == 200:
            return offset  # the server ignored Range: drop what we already have
        m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if m is None:
            raise RegistryError(
                f"{what}: 206 answer without a usable Content-Range",
                "the registry's Range support is broken",
            )
        begin = int(m.group(1))
        if begin > offset:
            raise RegistryError(
                f"{what}: asked for bytes from {offset}, got from {begin}",
                "the registry's Range support is broken",
            )
        return offset - begin

    def _stream_body(
        self,
        resp: requests.Response,
        desc: Descriptor,
        write: Callable[[bytes], object],
        progress: Callable[[int], None] | None,
        offset: int,
        skip: int,
        what: str,
    ) -> tuple[int, str]:
        """Write the body; return (new offset, reason it stopped short) — reason "" if the
        body ended cleanly."""
        stream: Iterator[bytes] = resp.raw.stream(self._chunk_size, decode_content=False)
        while True:
            try:
                chunk = next(stream)
            except StopIteration:
                break
            except NET_ERRORS as exc:
                return offset, reason(exc)
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk = chunk[skip:]
                skip = 0
            if offset + len(chunk) > desc.size:
                raise IntegrityError(
                    f"{what}: the registry sent more than the {desc.size} bytes the manifest "
                    "declares",
                    "the registry serves wrong content; do not trust it",
                )
            write(chunk)
            offset += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if offset < desc.size:
            framed = "Content-Length" in resp.headers or "chunked" in resp.headers.get(
                "Transfer-Encoding", ""
            )
            if not framed:  # ended by a closed connection: cannot tell; resume
                return offset, f"connection closed at byte {offset} of {desc.size}"
            # the body ended cleanly (its framing says complete) but is too short
            raise IntegrityError(
                f"{what}: the registry's blob ends at byte {offset}, the manifest declares "
                f"{desc.size}",
                "the registry serves wrong content; do not trust it",
            )
        return offset, ""

    def get_blob_bytes(self, ref: Reference, desc: Descriptor, limit: int) -> bytes:
        """A small blob (a config) in memory, digest-verified. ``desc.size`` over ``limit`` or
        a digest mismatch raise :class:`IntegrityError`."""
        if desc.size > limit:
            raise IntegrityError(
                f"blob {desc.digest}: {desc.size} bytes is more than the {limit} allowed",
                "refusing an oversized config blob",
            )
        buf = bytearray()
        self.get_blob(ref, desc, buf.extend)
        data = bytes(buf)
        actual = digest_of(data, split_digest(desc.digest)[0])
        if actual != desc.digest or len(data) != desc.size:
            raise IntegrityError(
                f"blob {desc.digest} of {ref.repository}: got {len(data)} bytes with digest "
                f"{actual}",
                "the registry serves wrong content; do not trust it",
            )
        return data


def _aggregate(errors: list[tuple[Endpoint, RegistryError]]) -> type[RegistryError]:
    """The error class for "no endpoint served it": :class:`TransientError` when every endpoint
    failed in a way that may pass (a mirror refusing connections while the upstream does not
    resolve, on an air-gapped node), so callers that wait for a registry keep waiting."""
    if all(isinstance(e, TransientError) for _, e in errors):
        return TransientError
    return RegistryError


def _role(ep: Endpoint) -> str:
    return "mirror" if ep.mirror else "registry"


def _fails_fast(eps: list[Endpoint], i: int) -> bool:
    """Whether ``eps[i]`` is tried without retrying connect errors: a mirror that is not
    the last endpoint. The registry itself always gets the full policy."""
    return i + 1 < len(eps) and eps[i].mirror


class _BlobProgress(Exception):
    """Internal: an endpoint failed after delivering ``offset`` bytes in total."""

    def __init__(self, offset: int, error: RegistryError) -> None:
        super().__init__(error.message)
        self.offset = offset
        self.error = error
