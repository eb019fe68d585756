"""Fixtures: image_fixtures (filled in by its part of the harness)."""
