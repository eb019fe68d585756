"""The one way an image is obtained: the reference resolved, the pull policy applied, pulled.

:func:`obtain` is what ``pull``, ``checkout``, ``install``, ``update``, ``auto-update`` and
``up`` all go through. What a user typed is resolved once, the same way for each of them:
a name with a registry is normalized; a short name is looked for in the store under each of
registries.conf's aliases and ``unqualified-search-registries`` candidates (what an earlier
pull of the same text stored), and pulled through those candidates in order (the first
registry that serves it wins). The pull policy is podman's: ``missing`` pulls only what is not
stored, ``always`` pulls (the tag moves if the registry's did), ``never`` only reads the store.
A pull verifies the signature policy before any blob is stored and, with ``extract``, inflates
each layer into the layer cache as it downloads (one pass over the bytes).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bootstrap.errors import UsageError
from bootstrap.image.model import Image, Platform
from bootstrap.image.reference import Reference, has_explicit_domain
from bootstrap.image.store import Store

if TYPE_CHECKING:  # the pull path (threads, requests) is imported when a pull happens
    from bootstrap.image.apply import UnpackOptions
    from bootstrap.image.pull import ImageVerifier, PullResult
    from bootstrap.progress import Progress

log = logging.getLogger(__name__)

POLICIES = ("missing", "always", "never")


@dataclass(frozen=True)
class Obtained:
    """An image in the store. ``name``: the reference it is stored under; ``image``: its
    manifest and config; ``pulled``: what this call pulled (None when the store had it)."""

    name: str
    image: Image
    pulled: PullResult | None = None


def check_policy(policy: str) -> str:
    """``policy`` when it is one of :data:`POLICIES`, else UsageError (exit 2)."""
    if policy not in POLICIES:
        raise UsageError(
            f"--pull {policy!r}: expected missing, always or never", "e.g. --pull never"
        )
    return policy


def stored_name(store: Store, text: str) -> str:
    """The name under which what a user typed is stored: its normalized form when that is
    stored; else, for a short name, the first of registries.conf's aliases/search candidates
    that is stored (what a pull of the same text would have stored); else the normalized form
    (a later lookup then fails with the usual "bootstrap pull" hint). Invalid text:
    UsageError (exit 2)."""
    name = str(Reference.parse(text))
    if has_explicit_domain(text):
        return name  # no candidates to look for: the index is read once, by the caller
    known = {ref.name for ref in store.images()}
    if name in known:
        return name
    from bootstrap.image import registries

    try:
        candidates = registries.load().unqualified_search(text)
    except UsageError:
        return name  # a broken registries.conf does not stop local lookups
    return next((str(c) for c in candidates if str(c) in known), name)


def is_stored(store: Store, name: str) -> bool:
    """True when ``name`` (a stored name, see :func:`stored_name`) is tagged in the store."""
    try:
        store.resolve(name)
    except UsageError:
        return False
    return True


def obtain(
    store: Store,
    text: str,
    *,
    policy: str = "missing",
    platform: Platform | None = None,
    verifier: Callable[[], ImageVerifier | None] | None = None,
    extract: UnpackOptions | None = None,
    jitter: float = 0.0,
    progress: Progress | None = None,
    verify_stored: bool = False,
) -> Obtained:
    """The image ``text`` names, from the store or pulled into it as ``policy`` says (see the
    module docstring). ``verifier()`` is called once, only when a pull happens, before any
    wait (a broken policy fails at once); what it returns checks the manifest before anything
    is stored (None skips verification: library use and tests). ``extract``: the pull also
    fills the layer cache in the same pass. ``jitter``: a pull first waits a random
    0..``jitter`` seconds (nodes started together then do not reach a mirror in the same
    instant). ``platform`` selects from an index (default: the host's). ``verify_stored``: a
    pull hashes the blobs it finds stored before taking them as present (``bootstrap pull``).

    Raises UsageError (bad reference or policy; with ``never`` an image not stored, hint:
    the pull command), RegistryError, IntegrityError, BusyError, TrustError (refused by the
    signature policy) as the pull raised them."""
    check_policy(policy)
    store.init()
    name = stored_name(store, text)
    if policy == "never" or (policy == "missing" and is_stored(store, name)):
        return Obtained(name, store.image(name, platform))
    checker = verifier() if verifier is not None else None
    if jitter > 0:
        delay = random.uniform(0, jitter)
        log.info("waiting %.2fs (--jitter %g) before pulling", delay, jitter)
        time.sleep(delay)
    result = _pull(store, text, platform, checker, extract, progress, verify_stored)
    return Obtained(result.name, result.image, result)


def _pull(
    store: Store,
    text: str,
    platform: Platform | None,
    verifier: ImageVerifier | None,
    extract: UnpackOptions | None,
    progress: Progress | None,
    verify_stored: bool = False,
) -> PullResult:
    from bootstrap.image.pull import pull_image
    from bootstrap.image.registry import RegistryClient

    reference = Reference.parse(text)
    with RegistryClient.from_environment() as client:
        candidates = client.conf.unqualified_search(text)
        fetched = None
        if len(candidates) > 1:
            reference, fetched = client.resolve(text)  # the manifest found is the one pulled
        elif candidates:
            reference = candidates[0]
        return pull_image(
            store,
            reference,
            platform=platform,
            client=client,
            progress=progress,
            fetched=fetched,
            verifier=verifier,
            extract=extract,
            verify_stored=verify_stored,
        )
