"""Shared pytest configuration. Fixtures live in tests/harness/*_fixtures.py, one module per
part of the harness, registered here as plugins."""

from __future__ import annotations

pytest_plugins = [
    "tests.harness.image_fixtures",
    "tests.harness.registry_fixtures",
    "tests.harness.node_fixtures",
]
