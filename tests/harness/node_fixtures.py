"""Fixtures: real systemd nodes (see tests/harness/node.py).

- ``node``: a freshly booted node per test (~0.5 s: extract to tmpfs + boot).
- ``shared_node``: one node per test module, for tests that leave it as they found it.
- ``make_node``: a factory, ``make_node(binds=[...], ro_binds=[...], name=...)``, for nodes with
  extra bind mounts; every node it made is torn down after the test.
- ``node_rootfs``: the cached rootfs tarball (built once, under a lock, on first use).

Inside a node: ``node.run(...)``, ``node.bootstrap(...)``, ``node.python(code)``; from the host:
``node.bus()`` (pydbus), ``node.path(p)``/``write_file``/``copy_in``; systemd jobs over D-Bus
with :class:`tests.harness.node.JobWaiter`.

Tests using these need root, ``systemd-nspawn`` and ``debootstrap`` (with the Debian mirror on
the first run); they are skipped with the reason when those are missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.node import Node, reap_stale_nodes, rootfs_tarball


def _require_node_support() -> None:
    if os.geteuid() != 0:
        pytest.skip("booting a systemd node needs root")
    for tool in ("systemd-nspawn", "nsenter", "debootstrap", "tar", "zstd"):
        if shutil.which(tool) is None:
            pytest.skip(f"booting a systemd node needs {tool}")


@pytest.fixture(scope="session")
def node_rootfs() -> Path:
    """The cached, customised node rootfs tarball. First tears down nodes that earlier test
    runs left behind when they were killed (see :func:`reap_stale_nodes`)."""
    _require_node_support()
    reap_stale_nodes()
    return rootfs_tarball()


@pytest.fixture
def node(node_rootfs: Path) -> Iterator[Node]:
    """A booted node of its own, powered off and removed after the test."""
    with Node.start() as n:
        yield n


@pytest.fixture(scope="module")
def shared_node(node_rootfs: Path) -> Iterator[Node]:
    """A booted node shared by the tests of one module; leave it as you found it."""
    with Node.start() as n:
        yield n


@pytest.fixture
def make_node(node_rootfs: Path) -> Iterator[Callable[..., Node]]:
    """Factory for booted nodes with options (see :meth:`Node.start`); all torn down after."""
    made: list[Node] = []

    def make(**kwargs: object) -> Node:
        n = Node.start(**kwargs)  # type: ignore[arg-type]
        made.append(n)
        return n

    yield make
    errors = []
    for n in reversed(made):
        try:
            n.close()
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)
