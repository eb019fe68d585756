"""The registry v2 client: manifests and blobs over HTTP(S), with auth, mirrors and resume.

One :class:`RegistryClient` serves one pull (or many); it is safe to use from several threads
(layers download in parallel). Per endpoint host it pings ``/v2/`` once to learn the scheme and
the auth challenges (``Bearer`` with a token per (realm, service, scope), or ``Basic``), then
sends every request with the matching ``Authorization``. A 401 drops the cached token and
fetches a fresh one once; a second 401 is an error with a hint about credentials.

Transport: only sessions from :func:`bootstrap.http.new_session` (timeouts, retries of connect
errors and 429/5xx with ``Retry-After``). TLS verification uses the system CAs (OpenSSL's
hashed directory; certifi where the system has none) plus the host's ``certs.d`` CA files;
client certificates come from ``certs.d`` too. Insecure endpoints (``registries.conf``) skip
verification and fall back to plain http, as containers/image does.
Redirects (blob storage) are followed; requests drops ``Authorization`` on a cross-host redirect.

Endpoints (mirrors, then the registry itself) are tried in order. A mirror that is not the last
endpoint fails fast: a connect error (refused, unreachable, DNS failure, connect timeout) is not
retried, the next endpoint is tried at once, and the mirror is skipped for
:data:`DOWN_SECONDS` by this client; 429/5xx from it are retried by the session's policy, then
the next endpoint is tried. The last endpoint, and the registry itself, get the full policy.
The https→http fallback of an insecure endpoint does not repeat a connect failure: with an
explicit port (the same for both schemes) an unreachable https port is not tried again as http;
with the default ports the https probe fails fast and only the http one gets the policy. Each
endpoint's failure is logged once at INFO.

Errors: network and registry failures raise :class:`RegistryError` (exit 3), content that is not
what it claims :class:`IntegrityError` (exit 4), bad configuration :class:`UsageError` (exit 2).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.util.retry import Retry

from bootstrap.errors import BootstrapError, IntegrityError, RegistryError, UsageError
from bootstrap.http import CONNECT_TIMEOUT, READ_TIMEOUT, ExtraCAs, new_session
from bootstrap.image import registries
from bootstrap.image.auth import (
    AuthEntry,
    Challenge,
    Credentials,
    Token,
    TokenCache,
    load_credentials,
    parse_www_authenticate,
    token_from_response,
)
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

CHUNK_SIZE = 1024 * 1024
BLOB_ATTEMPTS = 6
BLOB_BACKOFF = 0.5
MAX_BACKOFF = 10.0
MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
DOWN_SECONDS = 60.0  # a mirror that refused a connection is skipped this long (not if last)

log = logging.getLogger(__name__)

_NET_ERRORS: tuple[type[Exception], ...] = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_TOKEN_ERRORS: tuple[type[Exception], ...] = (ValueError, *_NET_ERRORS)


class NotFoundError(RegistryError):
    """The registry answered 404 for a manifest or blob (exit 3). Defined here, not in
    bootstrap.errors, so callers can tell "missing" from "unreachable"."""


class TransientError(RegistryError):
    """A failure worth retrying or trying elsewhere: connection refused/reset, timeout, 5xx."""


class UnreachableError(TransientError):
    """No connection could be made: refused, unreachable, DNS failure, connect timeout (also
    to the proxy). Other endpoints are tried at once; see the module docstring."""


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


@dataclass
class _HostState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    pinged: bool = False
    scheme: str = "https"
    challenges: tuple[Challenge, ...] = ()
    down: tuple[str, str] | None = None  # (message, hint) of the last connect failure
    down_until: float = 0.0  # time.monotonic() until which fail-fast uses skip this host


def _is_connect_error(exc: requests.RequestException) -> bool:
    """True if no connection was made (refused, unreachable, DNS, connect timeout, proxy down);
    False for failures after connecting (reset, read timeout, TLS)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError):
        return True
    if not isinstance(exc, requests.ConnectionError) or isinstance(
        exc, requests.exceptions.SSLError
    ):
        return False
    inner: object = exc.args[0] if exc.args else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError):
        inner = inner.reason
    if isinstance(inner, urllib3.exceptions.ProxyError):
        inner = inner.original_error
    # NewConnectionError (refused, unreachable) and NameResolutionError subclass it
    return isinstance(inner, urllib3.exceptions.ConnectTimeoutError)


def _explicit_port(api_host: str) -> bool:
    try:
        return urlsplit(f"//{api_host}").port is not None
    except ValueError:
        return False


def _fail_fast_like(session: requests.Session) -> requests.Session:
    """A session from :func:`new_session` with the 429/5xx retries, backoff and timeouts of
    ``session`` (when it came from :func:`new_session`), but no retries of connect errors."""
    retry = getattr(session.get_adapter("https://"), "max_retries", None)
    retries, backoff = 4, 0.5
    if isinstance(retry, Retry):
        count = retry.status if retry.status is not None else retry.total
        retries = count if isinstance(count, int) else retries
        backoff = retry.backoff_factor
    connect_timeout, read_timeout = getattr(
        session, "default_timeout", (CONNECT_TIMEOUT, READ_TIMEOUT)
    )
    return new_session(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries=retries,
        backoff=backoff,
        connect_retries=0,
    )


def _reason(exc: BaseException) -> str:
    """A short reason for a network exception: '[Errno 111] Connection refused', 'read timed
    out', ..."""
    text = str(exc)
    m = re.search(r"\[SSL: [A-Z_]+\] [^'\"(]+", text)
    if m:
        return m.group(0).strip()
    m = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if m:
        return m.group(0).strip()
    low = text.lower()
    if "read timed out" in low or isinstance(
        exc, requests.exceptions.ReadTimeout | urllib3.exceptions.ReadTimeoutError
    ):
        return "read timed out"
    if "connect timeout" in low or isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timed out"
    if "certificate verify failed" in low:
        m = re.search(r"certificate verify failed: ([^(')\"]+)", text)
        return "certificate verify failed" + (f": {m.group(1).strip()}" if m else "")
    if "connection reset" in low or "connectionreseterror" in low:
        return "connection reset by peer"
    if "incompleteread" in low or "incomplete read" in low or "ended prematurely" in low:
        return "connection closed before the body was complete"
    if "connection aborted" in low or "remotedisconnected" in low:
        return "connection closed by the server"
    name = type(exc).__name__
    return f"{name}: {text[:200]}" if text else name


def _registry_message(resp: requests.Response) -> str:
    """The registry's JSON error message(s), if any."""
    try:
        body = resp.raw.read(MAX_ERROR_BODY, decode_content=True) if resp.raw else b""
        doc = json.loads(body)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list):
            parts = []
            for e in errs[:3]:
                if isinstance(e, dict):
                    parts.append(f"{e.get('code', '')}: {e.get('message', '')}".strip(": "))
            return "; ".join(p for p in parts if p)
    except Exception:
        return ""
    return ""


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
        default :func:`new_session`); ``mirror_session`` the mirrors before it (must not retry
        connect errors; default: like ``session`` but with ``connect_retries=0``). Sessions
        passed in are not closed by :meth:`close`."""
        self.conf = conf if conf is not None else RegistriesConf()
        self.credentials = credentials if credentials is not None else Credentials.empty()
        self._session = session if session is not None else new_session()
        self._own_session = session is None
        self._fast = (
            mirror_session if mirror_session is not None else _fail_fast_like(self._session)
        )
        self._own_fast = mirror_session is None
        self._logged: set[str] = set()
        self._blob_attempts = max(1, blob_attempts)
        self._blob_backoff = blob_backoff
        self._chunk_size = chunk_size
        self.tokens = TokenCache()
        self._hosts: dict[tuple[Any, ...], _HostState] = {}
        self._lock = threading.Lock()
        self._bundles: dict[tuple[str, ...], ExtraCAs] = {}
        self._bundle_dir: str | None = None
        self._entries: dict[tuple[str, str], AuthEntry | None] = {}
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @classmethod
    def from_environment(cls, session: requests.Session | None = None) -> RegistryClient:
        """A client with registries.conf, auth files and certs.d from the usual places."""
        return cls(registries.load(), load_credentials(), session)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session (if this client made it) and remove temporary CA bundles."""
        if self._own_session:
            self._session.close()
        if self._own_fast:
            self._fast.close()
        with self._lock:
            if self._finalizer is not None:
                self._finalizer()  # removes the CA bundle directory (once)
                self._finalizer = None
            self._bundle_dir = None
            self._bundles.clear()

    # --- TLS -------------------------------------------------------------------------------

    def _ca_bundle(self, files: tuple[str, ...]) -> ExtraCAs:
        with self._lock:
            path = self._bundles.get(files)
            if path is not None:
                return path
            if self._bundle_dir is None:
                self._bundle_dir = tempfile.mkdtemp(prefix="bootstrap-ca-")
                # removed by close(), else when the client is collected or at exit
                self._finalizer = weakref.finalize(
                    self, shutil.rmtree, self._bundle_dir, ignore_errors=True
                )
            parts: list[bytes] = []  # trusted besides the system roots (ExtraCAs)
            for f in files:
                try:
                    with open(f, "rb") as fh:
                        parts.append(fh.read())
                except OSError as exc:
                    raise UsageError(
                        f"certs.d {f}: cannot read: {exc.strerror}", "check its permissions"
                    ) from exc
            path = ExtraCAs(os.path.join(self._bundle_dir, f"ca-{len(self._bundles)}.pem"))
            with open(path, "wb") as fh:
                fh.write(b"\n".join(parts))
            self._bundles[files] = path
            return path

    def _tls_kwargs(self, ep: Endpoint, scheme: str) -> dict[str, Any]:
        if scheme != "https":
            return {}
        verify: bool | str = True
        if ep.insecure:
            verify = False
        elif ep.tls.ca_files:
            verify = self._ca_bundle(ep.tls.ca_files)
        kw: dict[str, Any] = {"verify": verify}
        if ep.tls.client_certs:
            kw["cert"] = ep.tls.client_certs[0]
        return kw

    # --- low-level HTTP --------------------------------------------------------------------

    def _send(
        self, ep: Endpoint, method: str, url: str, *, fast: bool = False, **kw: Any
    ) -> requests.Response:
        """One request with the full policy, or with the fail-fast session if ``fast``.
        Raises :class:`UnreachableError` if no connection could be made."""
        session = self._fast if fast else self._session
        try:
            return session.request(method, url, **kw)
        except requests.exceptions.SSLError as exc:
            dirs = registries.certs_dirs() if self.conf.certs_dirs is None else self.conf.certs_dirs
            first = str(dirs[0]) if dirs else "/etc/containers/certs.d"
            if "WRONG_VERSION_NUMBER" in str(exc) or "record layer failure" in str(exc):
                raise RegistryError(
                    f"{ep.host}: TLS failed: {_reason(exc)} (the server may speak plain http)",
                    f"if {ep.host} is a plain-http registry, set insecure = true for it in "
                    "registries.conf",
                ) from exc
            raise RegistryError(
                f"{ep.host}: TLS failed: {_reason(exc)}",
                f"put the registry's CA certificate in {first}/{ep.host}/ca.crt "
                f"(certs.d searched: {':'.join(str(d) for d in dirs)}), "
                "or mark the registry insecure in registries.conf",
            ) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            cls = UnreachableError if _is_connect_error(exc) else TransientError
            raise cls(
                f"{ep.host}: cannot reach {url.split('?')[0]}: {_reason(exc)}",
                "check the address, the network and proxy settings (HTTPS_PROXY, NO_PROXY)",
            ) from exc
        except requests.RequestException as exc:
            raise RegistryError(
                f"{ep.host}: {method} {url.split('?')[0]} failed: {_reason(exc)}",
                "check the registry address and the network",
            ) from exc

    def _host(self, ep: Endpoint, fast: bool = False) -> _HostState:
        """The pinged state of ``ep``'s host. With ``fast``, a host that failed to connect
        less than :data:`DOWN_SECONDS` ago raises :class:`UnreachableError` at once."""
        key = (ep.api_host, ep.insecure, ep.tls)
        with self._lock:
            state = self._hosts.get(key)
            if state is None:
                state = self._hosts[key] = _HostState()
        with state.lock:
            self._check_down(state, fast)
            if not state.pinged:
                try:
                    self._ping(ep, state, fast)
                except UnreachableError as exc:
                    self._mark_down(state, exc)
                    raise
                state.down = None
        return state

    @staticmethod
    def _check_down(state: _HostState, fast: bool) -> None:
        if fast and state.down is not None and time.monotonic() < state.down_until:
            message, hint = state.down
            raise UnreachableError(f"{message} (skipped: failed moments ago)", hint)

    @staticmethod
    def _mark_down(state: _HostState, exc: UnreachableError) -> None:
        state.down = (exc.message, exc.hint)
        state.down_until = time.monotonic() + DOWN_SECONDS

    def _ping(self, ep: Endpoint, state: _HostState, fast: bool = False) -> None:
        """Learn ``ep``'s scheme and auth challenges from ``GET /v2/``.

        An insecure endpoint tries https, then http. With an explicit port (the same for both)
        http is not tried after a connect failure: a refused port refuses both. With the
        default ports (443, 80) the https probe fails fast and the http one gets the policy."""
        schemes = ("https", "http") if ep.insecure else ("https",)
        same_port = _explicit_port(ep.api_host)
        if ep.insecure:
            # configured insecure on purpose: no warning per request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        error: BootstrapError | None = None
        for scheme in schemes:
            url = f"{scheme}://{ep.api_host}/v2/"
            probe_fast = fast or (scheme == "https" and ep.insecure and not same_port)
            try:
                resp = self._send(ep, "GET", url, fast=probe_fast, **self._tls_kwargs(ep, scheme))
            except UnreachableError as exc:
                if error is not None and not isinstance(error, UnreachableError):
                    raise error from exc  # https got an answer: that says more
                error = exc
                if same_port:
                    break
                continue
            except RegistryError as exc:
                error = exc
                continue
            with resp:
                if resp.status_code not in (200, 401):
                    error = TransientError(
                        f"{ep.host}: {url} answered HTTP {resp.status_code}; "
                        "not a registry v2 endpoint",
                        "check the registry address (host[:port]) and that it is a v2 registry",
                    )
                    continue
                state.challenges = tuple(
                    parse_www_authenticate(resp.headers.get("WWW-Authenticate", ""))
                )
                state.scheme = scheme
                state.pinged = True
                return
        assert error is not None
        raise error

    def ping(self, ref: Reference) -> str:
        """Ping the registry of ``ref`` itself (not its mirrors) and return ``scheme://host``."""
        ep = self.conf.endpoints(ref)[-1]
        state = self._host(ep)
        return f"{state.scheme}://{ep.api_host}"

    # --- auth ------------------------------------------------------------------------------

    def _entry(self, ep: Endpoint) -> AuthEntry | None:
        """The credential for ``ep``'s repository, looked up once per client (credential
        helpers are subprocesses)."""
        key = (ep.host, ep.reference.path)
        with self._lock:
            if key in self._entries:
                return self._entries[key]
        entry = self.credentials.entry_for(ep.host, ep.reference.path)
        with self._lock:
            self._entries[key] = entry
        return entry

    def _authorization(
        self,
        ep: Endpoint,
        challenges: tuple[Challenge, ...],
        extra_scope: str | None = None,
        fast: bool = False,
    ) -> tuple[dict[str, str], tuple[str, str, str, str] | None]:
        """Headers to authorize a request for ``ep.reference``'s repository, and the token
        cache key used (None for basic/anonymous)."""
        entry = self._entry(ep)
        for ch in challenges:
            if ch.scheme == "basic":
                if entry is not None and (entry.username or entry.password):
                    pair = f"{entry.username}:{entry.password}".encode()
                    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}, None
                return {}, None
            if ch.scheme == "bearer":
                realm = ch.params.get("realm", "")
                if not realm:
                    raise RegistryError(
                        f"{ep.host}: bearer challenge without a realm",
                        "the registry's auth configuration is broken",
                    )
                service = ch.params.get("service", "")
                scopes = [f"repository:{ep.reference.path}:pull"]
                if extra_scope and extra_scope not in scopes:
                    scopes.append(extra_scope)
                account = entry.username if entry is not None else ""
                key = (realm, service, " ".join(scopes), account)
                token = self.tokens.get(key)
                if token is None:
                    tok = self._fetch_token(ep, realm, service, scopes, entry, fast)
                    self.tokens.put(key, tok)
                    token = tok.value
                return {"Authorization": f"Bearer {token}"}, key
        return {}, None

    def _fetch_token(
        self,
        ep: Endpoint,
        realm: str,
        service: str,
        scopes: list[str],
        entry: AuthEntry | None,
        fast: bool,
    ) -> Token:
        scheme = realm.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise RegistryError(
                f"{ep.host}: token realm {realm!r} is not an http(s) URL",
                "the registry's auth configuration is broken",
            )
        tls = self._tls_kwargs(ep, scheme)
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        if entry is not None and entry.identity_token:
            form = [
                *params,
                ("grant_type", "refresh_token"),
                ("refresh_token", entry.identity_token),
                ("client_id", "bootstrap"),
            ]
            resp = self._send(ep, "POST", realm, fast=fast, data=form, stream=True, **tls)
        else:
            auth = None
            if entry is not None and (entry.username or entry.password):
                params.append(("account", entry.username))
                auth = (entry.username, entry.password)
            resp = self._send(
                ep, "GET", realm, fast=fast, params=params, auth=auth, stream=True, **tls
            )
        with resp:
            if resp.status_code in (401, 403):
                raise self._denied(ep, entry, f"token server {realm} answered {resp.status_code}")
            if resp.status_code != 200:
                cls = TransientError if resp.status_code >= 500 else RegistryError
                raise cls(
                    f"{ep.host}: token server {realm} answered HTTP {resp.status_code}",
                    "the registry's token service is failing; try again later",
                )
            try:
                body = resp.raw.read(MAX_TOKEN_BYTES + 1, decode_content=True)
                if len(body) > MAX_TOKEN_BYTES:
                    raise ValueError("token answer larger than 1 MiB")
                doc = json.loads(body)
            except _TOKEN_ERRORS as exc:
                raise RegistryError(
                    f"{ep.host}: token server {realm} sent no usable JSON: {_reason(exc)}",
                    "the registry's token service is broken",
                ) from exc
        return token_from_response(doc)

    def _denied(self, ep: Endpoint, entry: AuthEntry | None, what: str) -> RegistryError:
        repo = f"{ep.host}/{ep.reference.path}"
        if entry is not None and (entry.username or entry.identity_token):
            who = entry.username or "(identity token)"
            return RegistryError(
                f"{repo}: authentication failed for user {who!r}: {what}",
                f"check the credentials for {ep.host} in {entry.source} "
                "(wrong password, expired token, or no pull access)",
            )
        return RegistryError(
            f"{repo}: access denied without credentials: {what}",
            f"add credentials for {ep.host} to an auth file ($REGISTRY_AUTH_FILE, "
            "/etc/containers/auth.json or ~/.docker/config.json), or check the repository name",
        )

    def _request(
        self,
        ep: Endpoint,
        path: str,
        headers: Mapping[str, str],
        fast: bool = False,
        method: str = "GET",
    ) -> requests.Response:
        """``method`` (GET or HEAD) ``path`` on ``ep`` with auth; streams. Retries once with a
        fresh token on 401. ``fast``: connect errors are not retried, and mark the host down
        (see :meth:`_host`)."""
        state = self._host(ep, fast)
        try:
            resp = self._request_at(ep, state, path, headers, fast, method)
        except UnreachableError as exc:
            with state.lock:
                self._mark_down(state, exc)
            raise
        if state.down is not None:
            with state.lock:
                state.down = None
        return resp

    def _request_at(
        self,
        ep: Endpoint,
        state: _HostState,
        path: str,
        headers: Mapping[str, str],
        fast: bool,
        method: str = "GET",
    ) -> requests.Response:
        url = f"{state.scheme}://{ep.api_host}{path}"
        tls = self._tls_kwargs(ep, state.scheme)
        auth, key = self._authorization(ep, state.challenges, fast=fast)
        resp = self._send(
            ep, method, url, fast=fast, headers={**headers, **auth}, stream=True, **tls
        )
        if resp.status_code != 401:
            return resp
        fresh = tuple(parse_www_authenticate(resp.headers.get("WWW-Authenticate", "")))
        resp.close()
        extra = None
        for ch in fresh:
            if ch.scheme == "bearer" and ch.params.get("scope"):
                extra = ch.params["scope"]
        if key is not None:
            self.tokens.drop(key, auth.get("Authorization", "")[len("Bearer ") :])
        challenges = fresh if any(c.scheme in ("bearer", "basic") for c in fresh) else ()
        challenges = challenges or state.challenges
        if not challenges and not auth:
            raise self._denied(ep, self._entry(ep), f"{path} answered 401 with no challenge")
        auth2, _ = self._authorization(ep, challenges, extra, fast)
        resp = self._send(
            ep, method, url, fast=fast, headers={**headers, **auth2}, stream=True, **tls
        )
        if resp.status_code == 401:
            resp.close()
            raise self._denied(ep, self._entry(ep), f"{method} {path} answered 401")
        return resp

    def _status_error(self, ep: Endpoint, resp: requests.Response, what: str) -> RegistryError:
        detail = _registry_message(resp)
        msg = f"{what} at {ep.host}: HTTP {resp.status_code}" + (f" ({detail})" if detail else "")
        if resp.status_code == 403:
            return self._denied(ep, self._entry(ep), f"HTTP 403 {detail}".strip())
        if resp.status_code == 404:
            return NotFoundError(msg, "check the repository name, tag and digest")
        if resp.status_code >= 500 or resp.status_code == 429:
            return TransientError(msg, "the registry is failing; try again later")
        return RegistryError(msg, "the registry refused the request")

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
        raise RegistryError(
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
                resp = self._request(
                    ep, f"/v2/{r.path}/manifests/{tag}", {"Accept": MANIFEST_ACCEPT}, fast, "HEAD"
                )
                with resp:
                    if resp.status_code != 200:
                        raise self._status_error(ep, resp, what)
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
        raise RegistryError(
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
        resp = self._request(
            ep, f"/v2/{ref.path}/manifests/{tag_or_digest}", {"Accept": MANIFEST_ACCEPT}, fast
        )
        with resp:
            if resp.status_code != 200:
                raise self._status_error(ep, resp, what)
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
            except _NET_ERRORS as exc:
                raise TransientError(
                    f"{what}: reading from {ep.host} failed: {_reason(exc)}",
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
                resp = self._request(ep, path, headers, fast)
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
                        err = self._status_error(ep, resp, what)
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
            except _NET_ERRORS as exc:
                return offset, _reason(exc)
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
