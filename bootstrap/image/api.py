"""The image stage's CLI-facing API: ``pull``, ``checkout``, ``images``, ``rmi``, ``gc``, ``fsck``.

Each function takes the resolved :class:`~bootstrap.settings.Settings` and plain arguments as the
command line gave them, does one thing, and returns a frozen result with ``to_json()`` and
``to_text()``. Errors are :class:`~bootstrap.errors.BootstrapError` subclasses carrying the exit
code (2 bad reference or platform, 3 registry, 4 integrity, 6 store busy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.image.model import Platform
from bootstrap.image.store import Store, StoredRef
from bootstrap.image.stream import Digesting
from bootstrap.progress import human_size, make_progress
from bootstrap.settings import Settings

if TYPE_CHECKING:  # the pull path (threads, registry client) is imported by pull() alone
    from bootstrap.image.apply import UnpackOptions
    from bootstrap.image.compose import CheckoutResult
    from bootstrap.image.maintenance import FsckReport, GcReport
    from bootstrap.image.model import Image
    from bootstrap.image.pull import ImageVerifier, PullResult

log = logging.getLogger(__name__)

__all__ = ["Digesting"]  # the demo's image builder counts and hashes its layers with it


@dataclass(frozen=True)
class ImagesResult:
    """The stored references, sorted by name."""

    images: tuple[StoredRef, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [ref.to_json() for ref in self.images]

    def to_text(self) -> str:
        if not self.images:
            return "no images stored (add one with 'bootstrap pull REF' or 'bootstrap import FILE')"
        width = max(len("REFERENCE"), *(len(r.name) for r in self.images))
        lines = [f"{'REFERENCE':<{width}}  {'DIGEST':<19}  {'TYPE':<8}  ADMITTED BY"]
        for r in self.images:
            kind = "index" if "index" in r.media_type or "list" in r.media_type else "manifest"
            by = r.admitted or "-"
            lines.append(f"{r.name:<{width}}  {r.digest[:19]:<19}  {kind:<8}  {by}")
        return "\n".join(lines)


@dataclass(frozen=True)
class RmiResult:
    """The reference removed and the digest it pointed at (blobs stay until ``gc``)."""

    name: str
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest}

    def to_text(self) -> str:
        return f"untagged {self.name} ({self.digest}); 'bootstrap gc' frees unreferenced blobs"


class FsckFailed(IntegrityError):
    """fsck found damage (exit 4). ``result`` is the full report; the CLI adds it to the
    ``--json`` error document."""

    def __init__(self, report: FsckReport) -> None:
        findings = report.findings()
        super().__init__(
            f"store is damaged: {len(findings)} problems ({findings[0]}"
            + (", ..." if len(findings) > 1 else "")
            + ")",
            "delete the damaged blobs named, then pull the affected images again",
        )
        self.result = report


def stored_name(store: Store, text: str) -> str:
    """The name under which what a user typed is stored: its normalized form when that is
    stored; else, for a short name, the first of registries.conf's aliases/search candidates
    that is stored (what ``pull`` of the same text would have stored); else the normalized
    form (a later lookup then fails with the usual "bootstrap pull" hint). Invalid text:
    UsageError (exit 2)."""
    from bootstrap.image import registries
    from bootstrap.image.reference import Reference, has_explicit_domain

    name = str(Reference.parse(text))
    if has_explicit_domain(text):
        return name  # no candidates to look for: the index is read once, by the caller
    known = {ref.name for ref in store.images()}
    if name in known:
        return name
    try:
        candidates = registries.load().unqualified_search(text)
    except UsageError:
        return name  # a broken registries.conf does not stop local lookups
    return next((str(c) for c in candidates if str(c) in known), name)


def pull(
    settings: Settings,
    ref: str,
    *,
    platform: str | None = None,
    verifier: ImageVerifier | None = None,
    extract: UnpackOptions | None = None,
    jitter: float = 0.0,
) -> PullResult:
    """Pull ``ref`` into the store; the result's text is the digest the tag points at.

    A short name (no registry) is tried against registries.conf's aliases and
    ``unqualified-search-registries`` in order, else normalized as Docker does. ``verifier``
    checks signatures before anything is stored. ``extract``: also fill the layer cache with
    these options as the layers download (one pass; see
    :func:`~bootstrap.image.pull.pull_image`). ``jitter``: first wait a random 0..``jitter``
    seconds (nodes started together then do not reach a mirror in the same instant). Raises
    UsageError (bad reference/platform), RegistryError, IntegrityError, BusyError, TrustError
    (refused by the policy)."""
    from bootstrap.image.pull import pull_image
    from bootstrap.image.reference import Reference
    from bootstrap.image.registry import RegistryClient

    reference = Reference.parse(ref)
    plat = Platform.parse(platform) if platform else None
    store = Store(settings.store)
    if jitter > 0:
        import random
        import time

        delay = random.uniform(0, jitter)
        log.info("waiting %.2fs (--jitter %g) before pulling", delay, jitter)
        time.sleep(delay)
    with RegistryClient.from_environment() as client:
        candidates = client.conf.unqualified_search(ref)
        fetched = None
        if len(candidates) > 1:
            reference, fetched = client.resolve(ref)  # the manifest found is the one pulled
        elif candidates:
            reference = candidates[0]
        with make_progress(settings) as progress:
            result = pull_image(
                store,
                reference,
                platform=plat,
                client=client,
                progress=progress,
                fetched=fetched,
                verifier=verifier,
                extract=extract,
            )
    # logged after the bars are gone, so the line is not drawn over
    log.info(
        "pulled %s (%s): %s",
        result.name,
        result.digest,
        f"{human_size(result.downloaded)} downloaded in {result.elapsed:.1f}s"
        if result.downloaded
        else "up to date",
    )
    return result


def images(settings: Settings) -> ImagesResult:
    """Every reference stored, sorted by name."""
    return ImagesResult(tuple(Store(settings.store).images()))


def rmi(settings: Settings, ref: str) -> RmiResult:
    """Remove reference ``ref`` (as :func:`stored_name` finds it) from the store's index; blobs
    stay until gc. A reference that is not stored: UsageError (exit 2)."""
    store = Store(settings.store)
    name = stored_name(store, ref)
    desc = store.untag(name)
    return RmiResult(name, desc.digest)


def gc(settings: Settings) -> GcReport:
    """Remove unreferenced blobs, unused cached layers and temp files; waits for running pulls
    and checkouts to finish first."""
    from bootstrap.image import maintenance

    return maintenance.gc(Store(settings.store))


def fsck(settings: Settings, *, repair: bool = False) -> FsckReport:
    """Re-hash every blob, check index.json and reachability and every layer-cache entry against
    its record; ``repair`` first extracts damaged cache entries again from their blobs. Clean:
    the report. Damage left: each finding logged on stderr, then :class:`FsckFailed` (exit 4)
    carrying the report."""
    from bootstrap.image import maintenance

    report = maintenance.fsck(Store(settings.store), repair=repair)
    if not report.ok:
        for line in report.findings():
            log.error("fsck: %s", line)
        raise FsckFailed(report)
    return report


def checkout(
    settings: Settings,
    ref: str,
    dest: str,
    *,
    hardlink: bool,
    devices: bool,
    policy: str = "never",
    verifier: Callable[[], ImageVerifier] | None = None,
) -> CheckoutResult:
    """CLI entry: ``bootstrap checkout REF DEST [--copy | --hardlink] [--devices]
    [--pull missing|always|never]``. ``ref`` is looked up as ``pull`` of the same text stored
    it (registries.conf aliases, search registries). ``policy`` (``--pull``): "missing" pulls
    ``ref`` when it is not stored, "always" pulls it first (the tag moves if the registry's
    did), "never" only uses the store; a pull streams each layer into the layer cache as it
    downloads (one pass over the bytes) and checks it against ``verifier()`` (built only when a
    pull happens). DEST and the store are checked before anything is downloaded. Raises as
    :func:`~bootstrap.image.compose.checkout` and :func:`pull`; a ``ref`` not stored with
    policy "never" is a UsageError whose hint is the pull command."""
    import dataclasses
    import os
    from pathlib import Path

    from bootstrap.image.apply import UnpackOptions
    from bootstrap.image.compose import check_dest
    from bootstrap.image.compose import checkout as compose

    if policy not in ("missing", "always", "never"):
        raise UsageError(
            f"--pull {policy!r}: expected missing, always or never", "e.g. --pull never"
        )
    store = Store(settings.store)
    # a DEST inside the store's own dirs would be taken for a blob (fsck: damage) or removed
    # by gc as an unused cache entry
    real = Path(os.path.realpath(dest))
    for own in (store.oci, store.tmp, store.locks, store.layers):
        own_real = Path(os.path.realpath(own))
        if real == own_real or own_real in real.parents:
            raise UsageError(
                f"{dest} is inside the store's {own.name}/ directory",
                "check out somewhere outside the store",
            )
    check_dest(Path(os.path.abspath(dest)))  # before a pull, not only after it
    store.init()
    name = stored_name(store, ref)
    image: Image | None = None
    if policy != "never":
        stored = True
        try:
            store.resolve(name)
        except UsageError:
            stored = False
        if policy == "always" or not stored:
            result = pull(
                settings,
                ref,
                verifier=verifier() if verifier is not None else None,
                extract=UnpackOptions(devices=devices),
            )
            image = result.image
    pulled = image is not None
    if image is None:
        image = store.image(name)
    done = compose(store, image, Path(dest), hardlink=hardlink, devices=devices)
    return dataclasses.replace(done, pulled=True) if pulled else done
