"""Transport to registry endpoints: sessions, TLS, the ``/v2/`` ping, auth and tokens.

One :class:`Transport` serves a :class:`~bootstrap.image.registry.RegistryClient`; it is safe to
use from several threads. Per endpoint host it pings ``/v2/`` once to learn the scheme and the
auth challenges (``Bearer`` with a token per (realm, service, scope), or ``Basic``), then sends
every request with the matching ``Authorization``. A 401 drops the cached token and fetches a
fresh one once; a second 401 is an error with a hint about credentials.

Sessions come only from :func:`bootstrap.http.new_session` (timeouts, retries of connect errors
and 429/5xx with ``Retry-After``). TLS verification uses the system CAs (OpenSSL's hashed
directory; certifi where the system has none) plus the host's ``certs.d`` CA files; client
certificates come from ``certs.d`` too. Insecure endpoints (``registries.conf``) skip
verification and fall back to plain http, as containers/image does. Redirects (blob storage)
are followed; requests drops ``Authorization`` on a cross-host redirect.

A request marked ``fast`` (a mirror that is not the last endpoint) uses a session that does not
retry connect errors, and a host that could not be reached is skipped for
:data:`DOWN_SECONDS`. The https→http fallback of an insecure endpoint does not repeat a connect
failure: with an explicit port an unreachable https port is not tried again as http; with the
default ports the https probe fails fast and only the http one gets the policy.

Errors: no connection :class:`UnreachableError`, worth retrying :class:`TransientError`, 404
:class:`NotFoundError`, other failures :class:`~bootstrap.errors.RegistryError` (all exit 3);
unreadable certs.d files :class:`~bootstrap.errors.UsageError` (exit 2).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.util.retry import Retry

from bootstrap.errors import BootstrapError, RegistryError, UsageError
from bootstrap.http import CONNECT_TIMEOUT, READ_TIMEOUT, ExtraCAs, new_session
from bootstrap.image import registries
from bootstrap.image.auth import (
    AuthEntry,
    Challenge,
    Credentials,
    Token,
    TokenCache,
    parse_www_authenticate,
    token_from_response,
)
from bootstrap.image.registries import Endpoint, RegistriesConf

MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
DOWN_SECONDS = 60.0  # a mirror that refused a connection is skipped this long (not if last)

log = logging.getLogger(__name__)

NET_ERRORS: tuple[type[Exception], ...] = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_TOKEN_ERRORS: tuple[type[Exception], ...] = (ValueError, *NET_ERRORS)


class NotFoundError(RegistryError):
    """The registry answered 404 for a manifest or blob (exit 3). Defined here, not in
    bootstrap.errors, so callers can tell "missing" from "unreachable"."""


class TransientError(RegistryError):
    """A failure worth retrying or trying elsewhere: connection refused/reset, timeout, 5xx."""


class UnreachableError(TransientError):
    """No connection could be made: refused, unreachable, DNS failure, connect timeout (also
    to the proxy). Other endpoints are tried at once; see the module docstring."""


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


def reason(exc: BaseException) -> str:
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


class Transport:
    """Authorized, TLS-configured requests to the endpoints of v2 registries. See the module
    docstring for behaviour."""

    def __init__(
        self,
        conf: RegistriesConf,
        credentials: Credentials,
        session: requests.Session | None = None,
        *,
        mirror_session: requests.Session | None = None,
    ) -> None:
        """``session`` serves the last endpoint and the registry itself (full retry policy;
        default :func:`new_session`); ``mirror_session`` the mirrors before it (must not retry
        connect errors; default: like ``session`` but with ``connect_retries=0``). Sessions
        passed in are not closed by :meth:`close`. ``conf`` names the certs.d directories
        (for hints), ``credentials`` the auth entries."""
        self.conf = conf
        self.credentials = credentials
        self._session = session if session is not None else new_session()
        self._own_session = session is None
        self._fast = (
            mirror_session if mirror_session is not None else _fail_fast_like(self._session)
        )
        self._own_fast = mirror_session is None
        self.tokens = TokenCache()
        self._hosts: dict[tuple[Any, ...], _HostState] = {}
        self._lock = threading.Lock()
        self._bundles: dict[tuple[str, ...], ExtraCAs] = {}
        self._bundle_dir: str | None = None
        self._entries: dict[tuple[str, str], AuthEntry | None] = {}
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def close(self) -> None:
        """Close the sessions (those this transport made) and remove temporary CA bundles."""
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
                    f"{ep.host}: TLS failed: {reason(exc)} (the server may speak plain http)",
                    f"if {ep.host} is a plain-http registry, " + registries.insecure_hint(ep.host),
                ) from exc
            raise RegistryError(
                f"{ep.host}: TLS failed: {reason(exc)}",
                f"put the registry's CA certificate in {first}/{ep.host}/ca.crt "
                f"(certs.d searched: {':'.join(str(d) for d in dirs)}), "
                f"or to skip verification {registries.insecure_hint(ep.host)}",
            ) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            cls = UnreachableError if _is_connect_error(exc) else TransientError
            raise cls(
                f"{ep.host}: cannot reach {url.split('?')[0]}: {reason(exc)}",
                "check the address, the network and proxy settings (HTTPS_PROXY, NO_PROXY)",
            ) from exc
        except requests.RequestException as exc:
            raise RegistryError(
                f"{ep.host}: {method} {url.split('?')[0]} failed: {reason(exc)}",
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

        An insecure endpoint tries https, then http. With the default ports (443, 80) the https
        probe fails fast and the http one gets the policy. With an explicit port (the same for
        both) https gets the policy; after it, http is tried once without retries when the port
        refused the connection (a refusal is instant), and not at all after a connect timeout
        (the message says so). When no scheme could connect, the error names every URL tried."""
        schemes = ("https", "http") if ep.insecure else ("https",)
        same_port = _explicit_port(ep.api_host)
        if ep.insecure:
            # configured insecure on purpose: no warning per request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        error: BootstrapError | None = None
        unreachable: list[str] = []  # URLs no connection could be made to
        for scheme in schemes:
            url = f"{scheme}://{ep.api_host}/v2/"
            probe_fast = (
                fast
                or (scheme == "https" and ep.insecure and not same_port)
                or (scheme == "http" and same_port)  # the port had its retries over https
            )
            try:
                resp = self._send(ep, "GET", url, fast=probe_fast, **self._tls_kwargs(ep, scheme))
            except UnreachableError as exc:
                if error is not None and not isinstance(error, UnreachableError):
                    raise error from exc  # https got an answer: that says more
                unreachable.append(url)
                why = exc.message.rpartition(f"{url}: ")[2]
                error = UnreachableError(
                    f"{ep.host}: cannot reach {' nor '.join(unreachable)}: {why}", exc.hint
                )
                if same_port and scheme == "https" and ep.insecure and "refused" not in why:
                    error = UnreachableError(
                        f"{error.message} (plain http on the same port not tried)", exc.hint
                    )
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

    def base_url(self, ep: Endpoint) -> str:
        """``scheme://host[:port]`` of ``ep`` (pinged first if it was not yet)."""
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
        actions: str = "pull",
    ) -> tuple[dict[str, str], tuple[str, str, str, str] | None]:
        """Headers to authorize a request for ``ep.reference``'s repository (a token for
        ``actions``: "pull", or "pull,push" for uploads), and the token cache key used (None
        for basic/anonymous)."""
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
                scopes = [f"repository:{ep.reference.path}:{actions}"]
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
                    f"{ep.host}: token server {realm} sent no usable JSON: {reason(exc)}",
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

    def request(
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

    def upload(
        self,
        ep: Endpoint,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: Callable[[], Any] | None = None,
    ) -> requests.Response:
        """``method`` (HEAD, POST, PUT) ``target`` on ``ep``, authorized for pushing (a token
        for ``repository:PATH:pull,push``, or the basic credentials). ``target`` is a path
        (``/v2/...``) or an absolute URL the registry answered with (an upload's
        ``Location``; no credentials go to another host). ``body()`` returns the body (bytes
        or a readable file) and is called again when a 401 asks for a fresh token. The
        session does not retry POST/PUT (an upload is not idempotent); the answer streams."""
        state = self._host(ep)
        return self._request_at(ep, state, target, headers, False, method, "pull,push", body)

    def _request_at(
        self,
        ep: Endpoint,
        state: _HostState,
        path: str,
        headers: Mapping[str, str],
        fast: bool,
        method: str = "GET",
        actions: str = "pull",
        body: Callable[[], Any] | None = None,
    ) -> requests.Response:
        if path.startswith(("http://", "https://")):
            url = path
            if urlsplit(url).netloc != ep.api_host:
                # elsewhere (blob storage): no credentials of this registry go there
                return self._send(ep, method, url, headers=dict(headers), stream=True,
                                  data=body() if body else None,
                                  **self._tls_kwargs(ep, urlsplit(url).scheme))  # fmt: skip
        else:
            url = f"{state.scheme}://{ep.api_host}{path}"
        tls = self._tls_kwargs(ep, state.scheme)
        auth, key = self._authorization(ep, state.challenges, fast=fast, actions=actions)
        data = body() if body is not None else None
        resp = self._send(
            ep, method, url, fast=fast, headers={**headers, **auth}, stream=True, data=data, **tls
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
        auth2, _ = self._authorization(ep, challenges, extra, fast, actions)
        data = body() if body is not None else None
        resp = self._send(
            ep, method, url, fast=fast, headers={**headers, **auth2}, stream=True, data=data, **tls
        )
        if resp.status_code == 401:
            resp.close()
            raise self._denied(ep, self._entry(ep), f"{method} {path} answered 401")
        return resp

    def status_error(self, ep: Endpoint, resp: requests.Response, what: str) -> RegistryError:
        detail = _registry_message(resp)
        msg = f"{what} at {ep.host}: HTTP {resp.status_code}" + (f" ({detail})" if detail else "")
        if resp.status_code == 403:
            return self._denied(ep, self._entry(ep), f"HTTP 403 {detail}".strip())
        if resp.status_code == 404:
            return NotFoundError(msg, "check the repository name, tag and digest")
        if resp.status_code >= 500 or resp.status_code == 429:
            return TransientError(msg, "the registry is failing; try again later")
        return RegistryError(msg, "the registry refused the request")
