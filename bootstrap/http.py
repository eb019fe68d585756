"""The one factory for HTTP sessions.

Sessions apply a default (connect, read) timeout to every request and retry, with exponential
backoff, only on connection errors and on 429/5xx responses (honouring ``Retry-After`` up to
:data:`MAX_RETRY_AFTER`). Reads that stall or break mid-body are not retried here: the caller
(e.g. the blob downloader, with ``Range``) decides how to resume.
"""

from __future__ import annotations

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


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After sleeps are capped, so a hostile server cannot park us."""

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        if value is None:
            return None
        return float(min(value, MAX_RETRY_AFTER))


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
    adapter = HTTPAdapter(
        max_retries=make_retry(retries, backoff, connect_retries),
        pool_connections=pool_size,
        pool_maxsize=pool_size,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session
