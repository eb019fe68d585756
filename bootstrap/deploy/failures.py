"""Remembered failures: which image digest of which container was rolled back, so that
``bootstrap auto-update`` does not try it again every day (Fedora CoreOS's updater re-applies
what the operator rolled back; this one does not).

One record per container in ``$STATE/node/failed.json`` (temp + fsync + rename, read-modify-
write under ``$STATE/locks/failed.lock``)::

    {"version": 1, "containers": {
      "kubelet": {"image": "registry.example/kubelet:1.29", "digest": "sha256:...",
                  "time": "2026-01-01T03:00:00Z", "reason": "kubelet: health check ..."}}}

``digest`` is the source digest (what the registry serves for ``image``, what ``pull``
prints). An entry is written when an update to that digest was rolled back (a node transaction
judged it, ``update NAME`` failed and rolled back, or the operator ran ``rollback NAME`` away
from it); it is removed when the container is updated successfully or uninstalled.
``auto-update`` skips a container whose reference still names the remembered digest unless
``--retry-failed``; a tag moved to any other digest is tried. ``update`` by hand always tries.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.fsutil import write_atomic
from bootstrap.locks import flocked

log = logging.getLogger(__name__)

VERSION = 1
FILE = ("node", "failed.json")
LOCK = ("locks", "failed.lock")


@dataclass(frozen=True)
class Failed:
    """A digest of ``image`` that was rolled back at ``time`` (UTC, ISO 8601) and why."""

    name: str
    image: str
    digest: str
    time: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "digest": self.digest,
            "time": self.time,
            "reason": self.reason,
        }

    def matches(self, image: str, digest: str) -> bool:
        """Whether ``image`` naming ``digest`` is what failed."""
        return self.image == image and self.digest == digest

    def skip_note(self) -> str:
        """The line auto-update and status give for it."""
        return (
            f"{self.digest[:19]} of {self.image} was rolled back at {self.time} "
            f"({self.reason}); auto-update leaves it until the tag moves (or --retry-failed)"
        )


def _path(state: Path) -> Path:
    return state.joinpath(*FILE)


def _read(state: Path) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(_path(state).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # damaged: forgetting is safe (it is only advice)
        log.warning("%s: unreadable (%s); remembered failures are forgotten", _path(state), exc)
        return {}
    containers = doc.get("containers") if isinstance(doc, dict) else None
    if not isinstance(containers, dict):
        return {}
    return {str(k): v for k, v in containers.items() if isinstance(v, dict)}


def load(state: Path) -> dict[str, Failed]:
    """Every remembered failure by container name (a damaged file is logged and ignored)."""
    out = {}
    for name, doc in _read(state).items():
        try:
            out[name] = Failed(
                name, str(doc["image"]), str(doc["digest"]), str(doc["time"]), str(doc["reason"])
            )
        except KeyError:
            continue
    return out


def get(state: Path, name: str) -> Failed | None:
    """The remembered failure of container ``name``, if any."""
    return load(state).get(name)


def _write(state: Path, containers: dict[str, dict[str, Any]]) -> None:
    path = _path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": VERSION, "containers": containers}
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def remember(state: Path, name: str, image: str, digest: str, reason: str) -> Failed:
    """Record that ``digest`` of ``image`` was rolled back in container ``name`` (replacing
    an older record of that container)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    failed = Failed(name, image, digest, now, " ".join(reason.split())[:300])
    with flocked(state.joinpath(*LOCK), timeout=60, what="the remembered failures"):
        containers = _read(state)
        containers[name] = failed.to_json()
        _write(state, containers)
    log.info("%s: remembered %s of %s as rolled back", name, digest[:19], image)
    return failed


def forget(state: Path, name: str) -> None:
    """Drop container ``name``'s record (it updated successfully, or is gone)."""
    if not _path(state).exists():
        return
    with flocked(state.joinpath(*LOCK), timeout=60, what="the remembered failures"):
        containers = _read(state)
        if containers.pop(name, None) is not None:
            _write(state, containers)
