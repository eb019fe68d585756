"""The one factory for HTTP sessions.

Sessions apply a default (connect, read) timeout to every request and retry, with exponential
backoff, only on connection errors and on 429/5xx responses (honouring ``Retry-After`` up to
:data:`MAX_RETRY_AFTER`). Reads that stall or break mid-body are not retried here: the caller
(e.g. the blob downloader, with ``Range``) decides how to resume.

Each retry is reported as one INFO record on the :data:`RETRY_LOG` logger ("127.0.0.1:5000:
connection refused; retry 2 in 1.0s"), marked transient (``record.transient``): the CLI shows
it as a status line on a TTY, as a log line with ``-v``, and not at all otherwise. urllib3's
own "Retrying (...)" warnings are never shown.
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
            extra={"transient": True},
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


class _ContextAdapter(HTTPAdapter):
    """An HTTPAdapter that builds one ``ssl.SSLContext`` per (CA bundle, client cert) and hands
    it to every connection, instead of letting urllib3 load the CA file again for each new
    connection (~35 ms of CPU per connection for certifi's bundle: most of a small pull's TLS
    cost). Verification is unchanged: the same CA file, ``CERT_REQUIRED``, urllib3's own
    hostname check."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contexts: dict[tuple[str, object], Any] = {}
        self._contexts_lock = threading.Lock()

    def _context(self, verify: bool | str, cert: Any) -> Any:
        import ssl

        from requests.utils import DEFAULT_CA_BUNDLE_PATH
        from urllib3.util.ssl_ import create_urllib3_context

        ca = DEFAULT_CA_BUNDLE_PATH if verify is True else str(verify)
        key = (ca, cert)
        with self._contexts_lock:
            ctx = self._contexts.get(key)
            if ctx is None:
                ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                if os.path.isdir(ca):
                    ctx.load_verify_locations(capath=ca)
                else:
                    ctx.load_verify_locations(cafile=ca)
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
        if host_params.get("scheme") == "https" and verify is not False:
            for name in ("ca_certs", "ca_cert_dir", "cert_file", "key_file"):
                pool_kwargs.pop(name, None)
            pool_kwargs["ssl_context"] = self._context(verify, cert)
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if url.lower().startswith("https") and verify and conn.conn_kw.get("ssl_context"):
            # the pool's context already holds the CA and client cert: do not load them again
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
