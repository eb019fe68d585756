"""The image stage's facade: the only image module other stages (and the CLI) import.

Commands: ``pull``, ``push``, ``checkout``, ``import_archive``, ``images``, ``rmi``, ``gc``,
``fsck``; each
takes the resolved :class:`~bootstrap.settings.Settings` and plain arguments as the command line
gave them and returns a frozen result with ``to_json()`` and ``to_text()``. For the stages after
this one: :func:`obtain` (the one way an image is had: resolution, pull policy, verification,
one-pass extraction), :func:`deployment_rootfs` (a deployment's view of an image, held against
gc), :func:`provenance` (what the registry served, what admitted it) and :class:`Remote` (what a
registry serves now). What they hand back are frozen dataclasses; the vocabulary
(:class:`Reference`, :class:`Image`, :class:`ImageConfig`, :class:`Platform`, :class:`Store`,
the OCI media types, :class:`Digesting`) is re-exported here. Nothing here imports the pull
path (threads, requests) until a call needs it, so commands that need no network start fast.
Errors are
:class:`~bootstrap.errors.BootstrapError` subclasses carrying the exit code (2 bad reference,
platform or policy, 3 registry, 4 integrity, 6 store busy, 7 refused by the signature policy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootstrap.errors import IntegrityError, RegistryError, UsageError
from bootstrap.image.model import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    Image,
    ImageConfig,
    Platform,
)
from bootstrap.image.store import ADMITTED_ANNOTATION, SOURCE_DIGEST_ANNOTATION, Store, StoredRef
from bootstrap.image.stream import Digesting
from bootstrap.progress import Progress, counted, human_size, make_progress, waited
from bootstrap.settings import Settings

if TYPE_CHECKING:  # the pull path (threads, registry client) is imported by the calls that pull
    from bootstrap.image.archive import ArchiveAdmitter, ImportResult
    from bootstrap.image.compose import CheckoutResult
    from bootstrap.image.export import Exported
    from bootstrap.image.maintenance import FsckReport, GcReport
    from bootstrap.image.obtain import POLICIES, Obtained, stored_name
    from bootstrap.image.pull import ImageVerifier, PullResult
    from bootstrap.image.push import PushResult
    from bootstrap.image.reference import Reference
    from bootstrap.image.registry import RegistryClient

__all__ = [
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "POLICIES",
    "REF_NAME_ANNOTATION",
    "Digesting",
    "Image",
    "ImageConfig",
    "ImageVerifier",
    "Obtained",
    "Platform",
    "Reference",
    "Store",
    "StoredRef",
    "stored_name",
]

log = logging.getLogger(__name__)

_LAZY = {
    "POLICIES": "bootstrap.image.obtain",
    "Obtained": "bootstrap.image.obtain",
    "stored_name": "bootstrap.image.obtain",
    "Reference": "bootstrap.image.reference",
}


def __getattr__(name: str) -> Any:
    """The re-exports in ``_LAZY``, imported when first asked for (reference parsing compiles
    its grammar; commands that never parse one, such as gc and fsck, do not pay for it)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


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
    ``--json`` error document. The hint is the next step for what was found: ``fsck
    --repair`` for damaged blobs and cache entries, then a pull of each image that needs a
    blob again."""

    def __init__(self, report: FsckReport) -> None:
        findings = report.findings()
        super().__init__(
            f"store is damaged: {counted(len(findings), 'problem')} ({findings[0]}"
            + (", ..." if len(findings) > 1 else "")
            + ")",
            fsck_hint(report),
        )
        self.result = report


def fsck_hint(report: FsckReport) -> str:
    """What to do about ``report``'s findings, in order."""
    fetch = report.images_to_fetch()
    pulls = "; ".join(f"bootstrap pull {name}" for name in fetch)
    again = (
        f"then pull the images that need them again ({pulls}; an imported image: import its "
        "archive again)"
        if fetch
        else "no stored image needs them"
    )
    if report.damaged:
        return f"'bootstrap fsck --repair' moves the damaged blobs aside; {again}"
    if report.missing:
        return (
            f"pull the images that need them again: {pulls} (an imported image: import its "
            "archive again)"
        )
    if any(not c.ok for c in report.layers):
        return "'bootstrap fsck --repair' extracts the damaged cache entries again from their blobs"
    return (
        "restore or remove the file named (see docs/store.md), then pull the affected images again"
    )


def open_store(settings: Settings) -> Store:
    """The store ``settings`` names (nothing is created until something is written)."""
    return Store(settings.store)


# ---- obtaining an image ------------------------------------------------------------------------


def obtain(
    store: Store,
    text: str,
    *,
    policy: str = "missing",
    verifier: Callable[[], ImageVerifier | None] | None = None,
    inflate: bool = True,
    devices: bool = False,
    platform: str | None = None,
    jitter: float = 0.0,
    progress: Progress | None = None,
    verify_stored: bool = False,
) -> Obtained:
    """The image ``text`` names, per pull ``policy`` ("missing", "always", "never"): see
    :func:`bootstrap.image.obtain.obtain`, which every command that needs an image goes
    through. ``inflate``: a pull fills the layer cache in the same pass (what a checkout or a
    deployment reads next; ``devices`` as for :func:`checkout`). ``verifier()`` is called once,
    only when a pull happens. ``verify_stored``: see :func:`bootstrap.image.obtain.obtain`."""
    from bootstrap.image import obtain as obtaining

    extract = None
    if inflate:
        from bootstrap.image.apply import UnpackOptions

        extract = UnpackOptions(devices=devices)
    return obtaining.obtain(
        store,
        text,
        policy=policy,
        platform=Platform.parse(platform) if platform else None,
        verifier=verifier,
        extract=extract,
        jitter=jitter,
        progress=progress,
        verify_stored=verify_stored,
    )


def export_archive(store: Store, image: Image, out: Any) -> Exported:
    """Stream stored ``image`` to the binary file ``out`` as an ``oci-archive`` named by its
    full reference, every blob verified on the way (how pod images are handed to a CRI
    daemon); see :func:`bootstrap.image.export.write_oci_archive` for what is raised."""
    from bootstrap.image.export import write_oci_archive

    return write_oci_archive(store, image, out)


def is_stored(store: Store, text: str) -> bool:
    """True when what ``text`` names is stored, found as :func:`obtain` finds it (short names
    through registries.conf's aliases and search registries)."""
    from bootstrap.image import obtain as obtaining

    return obtaining.is_stored(store, obtaining.stored_name(store, text))


def is_transient(err: BaseException) -> bool:
    """True for a registry failure that may pass if tried again later (unreachable, 5xx, 429);
    False for anything else (not found, unauthorized, a digest mismatch, a refused
    signature)."""
    if not isinstance(err, RegistryError):
        return False
    from bootstrap.image.transport import TransientError

    return isinstance(err, TransientError)


def pull(
    settings: Settings,
    ref: str,
    *,
    platform: str | None = None,
    verifier: ImageVerifier | None = None,
    jitter: float = 0.0,
) -> PullResult:
    """``bootstrap pull REF``: :func:`obtain` with policy "always" (the layer cache is not
    filled); every blob found stored is hashed before it counts as present (a damaged one is
    moved aside and fetched again); the result's text is the digest the tag points at.
    ``verifier`` checks signatures before anything is stored. Raises UsageError (bad
    reference/platform), RegistryError, IntegrityError, BusyError, TrustError (refused by the
    policy)."""
    store = Store(settings.store)
    with make_progress(settings) as progress:
        got = obtain(
            store,
            ref,
            policy="always",
            verifier=lambda: verifier,
            inflate=False,
            platform=platform,
            jitter=jitter,
            progress=progress,
            verify_stored=True,
        )
    result = got.pulled
    assert result is not None  # policy "always" pulls
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


def push(settings: Settings, ref: str, dest: str | None = None) -> PushResult:
    """``bootstrap push REF [DEST]``: the image stored as ``ref`` (found as :func:`rmi` finds
    it) sent to the registry ``DEST`` names (``docker://HOST/NAME:TAG`` or a plain reference;
    default: ``ref`` itself, as podman push), with the pull's credentials, certs.d and
    registries.conf; blobs the registry has are not sent, the manifest goes last, no
    signature is made or copied (see :mod:`bootstrap.image.push`). Raises UsageError (not
    stored, bad destination, blocked registry), RegistryError, IntegrityError (a damaged
    stored blob)."""
    from bootstrap.image.obtain import stored_name
    from bootstrap.image.push import parse_destination, push_image

    store = Store(settings.store)
    name = stored_name(store, ref)
    store.resolve(name)  # not stored: UsageError before anything is sent
    destination = parse_destination(dest or name)
    with make_progress(settings) as progress:
        return push_image(store, name, destination, progress=progress)


def checkout(
    settings: Settings,
    ref: str,
    dest: str,
    *,
    hardlink: bool,
    devices: bool,
    policy: str = "never",
    verifier: Callable[[], ImageVerifier | None] | None = None,
) -> CheckoutResult:
    """``bootstrap checkout REF DEST [--copy | --hardlink] [--devices] [--pull POLICY]``: the
    image :func:`obtain` finds or pulls for ``ref`` (``policy``, a pull filling the layer cache
    in the same pass), composed into the new directory DEST. DEST and the store are checked
    before anything is downloaded. Raises as :func:`~bootstrap.image.compose.checkout` and
    :func:`obtain`; a ``ref`` not stored with policy "never" is a UsageError whose hint is the
    pull command."""
    import os

    from bootstrap.image.compose import check_dest
    from bootstrap.image.compose import checkout as compose
    from bootstrap.image.obtain import check_policy

    check_policy(policy)
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
    got = obtain(store, ref, policy=policy, verifier=verifier, devices=devices)
    done = compose(store, got.image, Path(dest), hardlink=hardlink, devices=devices)
    # the figure printed is the user's wait for the command, not the compose step's
    return replace(done, pulled=got.pulled is not None, seconds=waited())


def import_archive(
    settings: Settings, path: str, *, name: str | None, admit: ArchiveAdmitter | None = None
) -> ImportResult:
    """``bootstrap import PATH [--name REF]``: a docker-archive, oci-archive or plain rootfs tar
    into the store (see :mod:`bootstrap.image.archive`)."""
    from bootstrap.image import archive

    return archive.import_command(settings, path, name=name, admit=admit)


# ---- what deployments need ---------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    """Where a stored image came from: ``name`` as stored, ``digest`` of the stored manifest,
    ``source_digest`` what the registry served for it (what ``pull`` printed; differs when a
    Docker manifest was converted or an index resolved), ``admitted`` the signature-policy
    requirement that admitted it ("" when none was recorded)."""

    name: str
    digest: str
    source_digest: str
    admitted: str


def provenance(store: Store, name: str) -> Provenance | None:
    """The provenance of stored ``name`` (a stored name), None when it is not stored."""
    for m in store.index_entries():
        ann = m.get("annotations") or {}
        if ann.get(REF_NAME_ANNOTATION) != name:
            continue
        digest = str(m.get("digest", ""))
        return Provenance(
            name,
            digest,
            str(ann.get(SOURCE_DIGEST_ANNOTATION) or digest),
            str(ann.get(ADMITTED_ANNOTATION) or ""),
        )
    return None


@dataclass(frozen=True)
class Rootfs:
    """A deployment's view of an image. ``files``: the directory holding the image's files as
    the container sees them (read ``/exports`` and users there). ``overlay``: ``lower`` in the
    slot links to the image's composed tree in the store and ``rootfs/`` is the empty mount
    point (with ``upper/`` and ``work/``), else ``rootfs/`` is a checkout with files of its
    own. ``hold``: the store's record that keeps the tree and its layers from gc while a user
    links to it (None for a checkout)."""

    files: Path
    overlay: bool
    hold: Path | None = None


def overlay_supported() -> bool:
    """True when this process can mount overlayfs (root, kernel support, not disabled by
    ``$BOOTSTRAP_NO_OVERLAY``)."""
    from bootstrap.image.compose import overlay_supported as supported

    return supported()


def deployment_rootfs(
    store: Store, image: Image, slot: Path, users: Sequence[Path], *, overlay: bool
) -> Rootfs:
    """Prepare the rootfs of a deployment being staged in ``slot`` (an existing, empty
    directory). ``overlay``: the image's tree is composed once in the store (hardlinks into the
    layer cache, never written), held for ``users`` (the paths whose ``lower`` link keeps it
    alive: the deployment's slots), ``slot/lower`` links to it and ``rootfs/``, ``upper/``,
    ``work/`` are made; else ``slot/rootfs`` is a checkout (reflinks or copies). Nothing is
    shared with the cache a write could reach either way. Raises as
    :func:`~bootstrap.image.compose.checkout`."""
    import os

    from bootstrap.image.compose import checkout as compose
    from bootstrap.image.compose import image_tree

    if overlay:
        with store.using():
            tree, _ = image_tree(store, image)
            hold = store.hold(users, image.manifest.digest, image.config.diff_ids)
            for sub in ("rootfs", "upper", "work"):
                (slot / sub).mkdir(mode=0o755)
            os.symlink(tree, slot / "lower")
        return Rootfs(tree, True, hold)
    compose(store, image, slot / "rootfs")
    return Rootfs(slot / "rootfs", False)


@dataclass(frozen=True)
class RemoteDigest:
    """What a registry serves for ``reference`` now: the manifest (or index) ``digest``, as
    ``pull`` would print it."""

    reference: str
    digest: str


class Remote:
    """Looks up what registries serve now (``HEAD`` of the manifest), through one registry
    client opened on first use and closed by :meth:`close` (or the ``with`` block)."""

    def __init__(self) -> None:
        self._client: RegistryClient | None = None

    def digest(self, text: str) -> RemoteDigest:
        """The digest the registry (or its mirrors) serves for ``text`` now. Raises
        UsageError (bad reference), RegistryError."""
        from bootstrap.image.reference import Reference
        from bootstrap.image.registry import RegistryClient

        reference = Reference.parse(text)
        if self._client is None:
            self._client = RegistryClient.from_environment()
        return RemoteDigest(str(reference), self._client.head_digest(reference))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the store ---------------------------------------------------------------------------------


def images(settings: Settings) -> ImagesResult:
    """Every reference stored, sorted by name."""
    return ImagesResult(tuple(Store(settings.store).images()))


def rmi(settings: Settings, ref: str) -> RmiResult:
    """Remove reference ``ref`` (as :func:`stored_name` finds it) from the store's index; blobs
    stay until gc. A reference that is not stored: UsageError (exit 2)."""
    store = Store(settings.store)
    from bootstrap.image.obtain import stored_name

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
    its record; ``repair`` first moves damaged blobs aside (the next pull fetches them again)
    and extracts damaged cache entries again from their blobs. Clean: the report. Damage left:
    what was repaired and each finding logged on stderr, then :class:`FsckFailed` (exit 4)
    carrying the report."""
    from bootstrap.image import maintenance

    report = maintenance.fsck(Store(settings.store), repair=repair)
    if not report.ok:
        for digest, path in report.set_aside:
            log.info("fsck: moved damaged blob %s aside to %s", digest, path)
        for line in report.findings():
            log.error("fsck: %s", line)
        raise FsckFailed(report)
    return report
