"""Fixtures: real docker-registry instances on loopback (see :mod:`tests.harness.registry`).

Session-scoped, started on first use, each on its own port with its own directories:

- ``registry`` (plain HTTP), ``registry_tls``, ``registry_basic``, ``registry_token``;
- ``any_registry``: parametrized over the four (ids ``plain``/``tls``/``basic``/``token``).

They are shared by every test of the session: push under repository names unique to your test
(e.g. derived from ``request.node.name``), and if you ``stop()`` one, ``start()`` it again
before your test ends (the fixture also restarts it for the next user if you forget).

``registry_factory(mode, **kw)`` (function-scoped) makes private registries for tests that need
a fresh one or several (mirrors); they are closed at the end of the test.  Keyword arguments go
to :meth:`Registry.create` (``username``, ``password``, ``public``, ``start``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.registry import MODES, Registry

RegistryFactory = Callable[..., Registry]


def _session_registry(mode: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry.create(mode, tmp_path_factory.mktemp(f"registry-{mode}"))
    try:
        yield reg
    finally:
        reg.close()


def _ensure_running(reg: Registry) -> Registry:
    if not reg.running:
        reg.start()
    if reg.token_server is not None:
        reg.token_server.start()
    return reg


@pytest.fixture(scope="session")
def _registry_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry("plain", tmp_path_factory)


@pytest.fixture(scope="session")
def _registry_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry("tls", tmp_path_factory)


@pytest.fixture(scope="session")
def _registry_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry("basic", tmp_path_factory)


@pytest.fixture(scope="session")
def _registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry("token", tmp_path_factory)


@pytest.fixture
def registry(_registry_plain: Registry) -> Registry:
    """A plain-HTTP registry (session-shared)."""
    return _ensure_running(_registry_plain)


@pytest.fixture
def registry_tls(_registry_tls: Registry) -> Registry:
    """An HTTPS registry with its own CA (session-shared)."""
    return _ensure_running(_registry_tls)


@pytest.fixture
def registry_basic(_registry_basic: Registry) -> Registry:
    """HTTPS + htpasswd basic auth (session-shared)."""
    return _ensure_running(_registry_basic)


@pytest.fixture
def registry_token(_registry_token: Registry) -> Iterator[Registry]:
    """HTTPS + bearer tokens from its own token server (session-shared). The token server's
    recorded requests, pending faults, ``delay``, ``expires_in`` and ``fields`` are reset
    before and after each test."""
    reg = _ensure_running(_registry_token)
    ts = reg.token_server
    assert ts is not None
    defaults = (ts.expires_in, tuple(ts.fields))

    def reset() -> None:
        ts.reset()
        ts.delay = 0.0
        ts.expires_in, ts.fields = defaults

    reset()
    yield reg
    reset()


@pytest.fixture(params=MODES, ids=list(MODES))
def any_registry(request: pytest.FixtureRequest) -> Registry:
    """Each of the four registry modes in turn."""
    name = "registry" if request.param == "plain" else f"registry_{request.param}"
    reg: Registry = request.getfixturevalue(name)
    return reg


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[RegistryFactory]:
    """``registry_factory(mode, **kw) -> Registry``: a private registry, closed after the
    test."""
    made: list[Registry] = []

    def make(mode: str = "plain", **kw: Any) -> Registry:
        reg = Registry.create(mode, tmp_path / f"registry-{len(made)}-{mode}", **kw)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()
