"""What ``bootstrap up`` does for pods once the CRI daemon answers: hand it the pod images
bootstrap pulled (preload), then wait until the CRI says the node can run pods.

Preload: for every image of the manifest's ``pods.images`` (already pulled and verified by
bootstrap through its own policy, mirrors and credentials), the daemon is asked with CRI
``ImageStatus`` whether it holds that reference with the same image id (the config digest, which
containerd reports as ``sha256:HEX`` and CRI-O as the bare ``HEX``); if not, the image is
streamed out of the store as an ``oci-archive`` into the daemon's own import command, run
inside its container with ``runc exec`` (the definition's ``imageImport``, with ``IMAGE`` set
to the reference), and
``ImageStatus`` must then report it. Nothing is read from a registry here: a node whose registry
is gone after ``up`` pulled still gets its pod images, and a reboot or a second ``up`` imports
nothing.

Readiness: CRI ``Status`` must report ``RuntimeReady`` and, when the manifest asks for it
(``pods.network_ready``, the default with ``pods.network``), ``NetworkReady``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bootstrap.errors import SystemdError, UsageError
from bootstrap.process import run

log = logging.getLogger(__name__)


def same_image_id(reported: str, config_digest: str) -> bool:
    """Whether the image id a CRI daemon reports is ``config_digest``: containerd reports
    ``sha256:HEX``, CRI-O (containers/storage) the bare ``HEX``."""
    return reported.removeprefix("sha256:") == config_digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Preloaded:
    """One pod image handed to the CRI daemon: ``action`` is ``imported`` or ``held`` (the
    daemon had it already); ``size`` the bytes streamed (0 when held), ``took`` seconds."""

    image: str
    image_id: str
    action: str
    size: int = 0
    took: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "image_id": self.image_id,
            "action": self.action,
            "size": self.size,
            "took": round(self.took, 3),
        }


def preload(
    store: Any,
    daemon: Any,
    images: tuple[str, ...],
    client: Any,
    *,
    on_step: Callable[[str, float], None] | None = None,
) -> list[Preloaded]:
    """Make the CRI daemon of deployment ``daemon`` (a :class:`~bootstrap.deploy.api.Deployment`
    whose unit runs) hold every image of ``images`` (stored references), asking ``client`` (a
    CRI client on its socket). ``on_step(what, started)`` is told of each image handled.

    Raises :class:`UsageError` when the daemon's definition has no ``imageImport`` (exit 2),
    :class:`SystemdError` when the import command fails or the daemon still does not hold the
    image afterwards (exit 5), :class:`~bootstrap.errors.IntegrityError` when a stored blob is
    damaged (nothing of that image is handed over whole)."""
    from bootstrap.image.api import export_archive
    from bootstrap.runtime import runc

    out: list[Preloaded] = []
    for name in images:
        started = time.monotonic()
        image = store.image(name)
        want = image.config.digest
        held = client.image_status(name)
        if held is not None and same_image_id(held.id, want):
            log.info("up: %s already holds %s (%s)", daemon.name, name, want[:19])
            out.append(Preloaded(name, want, "held", 0, time.monotonic() - started))
            if on_step:
                on_step(f"{daemon.name}: holds pod image {name}", started)
            continue
        if not daemon.image_import:
            raise UsageError(
                f"pods.images: the definition of {daemon.name} says no imageImport, so "
                f"{name} cannot be handed to it",
                'add "imageImport": {"exec": [...]} to its manifest.json (see '
                "docs/system-containers.md)",
            )
        exe = runc.runtime_path()
        argv = [exe, "exec", "--env", f"IMAGE={name}", daemon.name, *daemon.image_import]
        log.info("up: importing %s into %s (%s)", name, daemon.name, " ".join(daemon.image_import))
        sent: list[int] = []

        def feed(pipe: Any, image: Any = image, sent: list[int] = sent) -> None:
            sent.append(export_archive(store, image, pipe).size)

        run(
            argv,
            feed=feed,
            timeout=daemon.image_import_timeout or None,
            error=SystemdError,
            hint=f"the imageImport command of {daemon.name}'s definition failed; "
            f"journalctl -u {daemon.name}.service",
        )
        held = client.image_status(name)
        if held is None or not same_image_id(held.id, want):
            seen = "does not list it" if held is None else f"lists it as {held.id[:19]}"
            raise SystemdError(
                f"imported {name} into {daemon.name}, but the CRI daemon {seen} "
                f"(expected image id {want[:19]})",
                "check that the definition's imageImport imports into the namespace or store "
                "the CRI serves (containerd: -n k8s.io)",
            )
        took = time.monotonic() - started
        size = sent[0] if sent else 0
        log.info("up: imported %s into %s: %d bytes in %.2fs", name, daemon.name, size, took)
        out.append(Preloaded(name, want, "imported", size, took))
        if on_step:
            on_step(f"{daemon.name}: imported pod image {name} ({size} bytes)", started)
    return out
