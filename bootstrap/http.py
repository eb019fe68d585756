"""The one factory for HTTP sessions.

Sessions apply a default (connect, read) timeout to every request and retry, with exponential
backoff, only on connection errors and on 429/5xx responses (honouring ``Retry-After`` up to
:data:`MAX_RETRY_AFTER`). Reads that stall or break mid-body are not retried here: the caller
(e.g. the blob downloader, with ``Range``) decides how to resume.

Each retry is reported as one INFO record on the :data:`RETRY_LOG` logger ("127.0.0.1:5000:
connection refused; retry 2 in 1.0s"), marked transient (``record.transient``, with
``once_key`` the host and ``once_text`` the line said once): the CLI shows it as a status line
on a TTY, as a log line with ``-v``, once per host otherwise ("127.0.0.1:5000: connection
refused; retrying (-v shows each retry)"), and not at all with ``-q``. urllib3's own
"Retrying (...)" warnings are never shown.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from bootstrap import __version__

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
MAX_RETRY_AFTER = 60.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
USER_AGENT = f"bootstrap/{__version__}"

RETRY_LOG = logging.getLogger("bootstrap.retry")


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After sleeps are capped, so a hostile server cannot park us."""

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        if value is None:
            return None
        return float(min(value, MAX_RETRY_AFTER))

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Any:
        """urllib3's increment (raises MaxRetryError when the budget is spent), plus one
        transient record saying what failed and when the next try is."""
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        host = f"{_pool.host}:{_pool.port}" if _pool is not None else "server"
        if response is not None and getattr(response, "status", None):
            reason = f"HTTP {response.status}"
            delay = self.get_retry_after(response) or new.get_backoff_time()
        else:
            reason = describe_connect_error(error)
            delay = new.get_backoff_time()
        RETRY_LOG.info(
            "%s: %s; retry %d in %.1fs",
            host,
            reason,
            len(new.history),
            delay,
            extra={
                "transient": True,
                "once_key": host,
                "once_text": f"{host}: {reason}; retrying (-v shows each retry)",
            },
        )
        return new


class _TimeoutSession(requests.Session):
    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self._default_timeout = timeout

    @property
    def default_timeout(self) -> tuple[float, float]:
        """The (connect, read) timeout applied to requests that do not pass ``timeout``."""
        return self._default_timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._default_timeout)
        return super().request(method, url, *args, **kwargs)


class ExtraCAs(str):
    """A ``verify`` value for requests: the path of a PEM file whose CA certificates are trusted
    in addition to the system roots (a registry's ``certs.d`` CAs), where a plain ``str`` path
    (e.g. from ``REQUESTS_CA_BUNDLE``) replaces them."""

    __slots__ = ()


def _system_capath() -> str | None:
    """OpenSSL's CA directory when it holds hashed links (``update-ca-certificates`` made them),
    else None. A directory is searched per verification for the one issuer needed, instead of
    parsing a whole bundle (~0.3 ms against ~35 ms for certifi's)."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for capath in (os.environ.get(paths.openssl_capath_env), paths.capath):
        if not capath or not os.path.isdir(capath):
            continue
        try:
            with os.scandir(capath) as entries:
                if any(e.name.endswith(".0") and len(e.name) == 10 for e in entries):
                    return capath
        except OSError:
            continue
    return None


def _load_cafile(ctx: Any, cafile: str) -> None:
    """Trust the certificates of ``cafile`` in ``ctx``. The system bundle (OpenSSL's default
    cafile, which ``update-ca-certificates`` builds from the same certificates as the hashed
    directory) is read through that directory instead, whichever variable named it
    (``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``...)."""
    import ssl

    system = ssl.get_default_verify_paths().cafile
    capath = _system_capath()
    if capath is not None and system and os.path.realpath(cafile) == os.path.realpath(system):
        ctx.load_verify_locations(capath=capath)
    else:
        ctx.load_verify_locations(cafile=cafile)


def _load_system_roots(ctx: Any) -> None:
    """Trust the system roots in ``ctx``: ``SSL_CERT_FILE`` if set, OpenSSL's hashed CA
    directory (``SSL_CERT_DIR`` or the default) if there is one, else certifi's bundle."""
    import ssl

    cafile = os.environ.get(ssl.get_default_verify_paths().openssl_cafile_env)
    capath = _system_capath()
    if cafile:
        _load_cafile(ctx, cafile)
    if capath is not None:
        ctx.load_verify_locations(capath=capath)
    elif not cafile:
        from requests.utils import DEFAULT_CA_BUNDLE_PATH

        ctx.load_verify_locations(cafile=DEFAULT_CA_BUNDLE_PATH)


class _ContextAdapter(HTTPAdapter):
    """An HTTPAdapter that builds one ``ssl.SSLContext`` per (verify, client cert) and hands it
    to every https connection, instead of letting urllib3 build one per connection and load a CA
    bundle into it (~35 ms of CPU each for certifi's; ~50 ms for an unverified one, which still
    loads the OS defaults).

    ``verify`` True trusts the system roots (OpenSSL's hashed CA directory, looked up lazily;
    certifi's bundle where the system has none), an :class:`ExtraCAs` path those plus its
    certificates, another path (file or hashed directory) exactly what it holds, and False
    nothing (no certificate or hostname check). Verifying contexts are ``CERT_REQUIRED`` with
    urllib3's hostname check."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contexts: dict[tuple[bool | str, bool, object], Any] = {}
        self._contexts_lock = threading.Lock()

    def _context(self, verify: bool | str, cert: Any) -> Any:
        import ssl

        from urllib3.util.ssl_ import create_urllib3_context

        key = (verify, isinstance(verify, ExtraCAs), cert)
        with self._contexts_lock:
            ctx = self._contexts.get(key)
            if ctx is not None:
                return ctx
            if verify is False:
                ctx = create_urllib3_context(cert_reqs=ssl.CERT_NONE)
                ctx.check_hostname = False
            else:
                ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                if verify is True or isinstance(verify, ExtraCAs):
                    _load_system_roots(ctx)
                if verify is not True:
                    if os.path.isdir(verify):
                        ctx.load_verify_locations(capath=verify)
                    else:
                        _load_cafile(ctx, verify)
            if isinstance(cert, tuple):
                ctx.load_cert_chain(cert[0], cert[1])
            elif cert:
                ctx.load_cert_chain(cert)
            self._contexts[key] = ctx
            return ctx

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> Any:
        host_params, typed = super().build_connection_pool_key_attributes(request, verify, cert)
        pool_kwargs: dict[str, Any] = dict(typed)
        if host_params.get("scheme") == "https":
            for name in ("ca_certs", "ca_cert_dir", "cert_file", "key_file"):
                pool_kwargs.pop(name, None)
            pool_kwargs["ssl_context"] = self._context(verify, cert)
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if url.lower().startswith("https") and conn.conn_kw.get("ssl_context"):
            # the pool's context already holds the CAs and client cert: do not load them again
            conn.ca_certs = conn.ca_cert_dir = conn.cert_file = conn.key_file = None


def describe_connect_error(error: BaseException | None) -> str:
    """A short reason for a failed connection, without urllib3's object reprs:
    "connection refused", "timed out", "name does not resolve", or the innermost OS message."""
    seen: set[int] = set()
    inner = error
    while inner is not None and id(inner) not in seen:  # walk to the root cause
        seen.add(id(inner))
        nxt = inner.__cause__ or inner.__context__
        if nxt is None:
            reason = getattr(inner, "reason", None)
            nxt = reason if isinstance(reason, BaseException) else None
        if nxt is None:
            break
        inner = nxt
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, TimeoutError) or "timed out" in str(inner).lower():
        return "timed out"
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror[0].lower() + inner.strerror[1:]
    text = str(inner) if inner is not None else "connection failed"
    return text.rsplit(": ", 1)[-1] if text else type(inner).__name__


def make_retry(retries: int = 4, backoff: float = 0.5, connect_retries: int | None = None) -> Retry:
    """The retry policy: connect errors and 429/5xx only, GET/HEAD only, Retry-After honoured.
    ``connect_retries`` (default: ``retries``) bounds the retries of connection errors."""
    connect = retries if connect_retries is None else connect_retries
    return _CappedRetry(
        total=max(retries, connect),
        connect=connect,
        read=0,
        redirect=10,
        status=retries,
        other=0,
        status_forcelist=RETRY_STATUS,
        allowed_methods=frozenset({"GET", "HEAD"}),
        backoff_factor=backoff,
        backoff_max=MAX_RETRY_AFTER,
        respect_retry_after_header=True,
        raise_on_status=False,
    )


def new_session(
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    retries: int = 4,
    backoff: float = 0.5,
    pool_size: int = 8,
    connect_retries: int | None = None,
) -> requests.Session:
    """Return a ``requests.Session`` with default timeouts, the retry policy and a User-Agent.

    Proxies come from the environment (``HTTPS_PROXY``, ``NO_PROXY``...) as requests reads them.
    TLS verification settings (CA bundle, client certs) are per request, set by the caller.
    ``connect_retries`` (default: ``retries``) bounds the retries of connection errors alone,
    e.g. 0 for a client that would rather try another server at once.
    """
    session = _TimeoutSession((connect_timeout, read_timeout))
    adapter = _ContextAdapter(
        max_retries=make_retry(retries, backoff, connect_retries),
        pool_connections=pool_size,
        pool_maxsize=pool_size,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session
