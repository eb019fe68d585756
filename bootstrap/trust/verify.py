"""The verifier the pull and import paths call: policy + registries.d -> admitted or refused.

:meth:`Verifier.from_settings` loads the policy file (missing or malformed: exit 2 naming it,
unless ``--insecure-policy``) and the registries.d directory. :meth:`Verifier.check_pull` is
called with the manifest exactly as fetched (for an index: the index, which is what is signed)
and returns an :class:`Admission` saying which requirement admitted it, or raises
:class:`TrustError` (exit 7) naming the image, the reason and the deciding scope. Every
requirement of the chosen list must accept (as containers/image requires); a signature-based
requirement accepts when any one of the signatures found verifies.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from bootstrap.errors import TrustError
from bootstrap.image.reference import Reference
from bootstrap.trust.identity import (
    COSIGN_TYPE,
    SIMPLE_SIGNING_TYPE,
    BadSignature,
    check_payload,
    parse_payload,
    refusal,
)
from bootstrap.trust.policy import Decision, Policy, Requirement, load_policy
from bootstrap.trust.registries_d import RegistriesD, load_registries_d, lookaside_signatures

if TYPE_CHECKING:
    from bootstrap.settings import Settings
    from bootstrap.trust.sigstore import AttachmentClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """Why an image was let in: ``requirement`` (e.g. ``signedBy (GPGKeys, /k.gpg)``),
    ``scope`` (the deciding policy scope) and ``elapsed`` seconds spent verifying."""

    requirement: str
    scope: str
    elapsed: float = field(default=0.0, compare=False)

    def __str__(self) -> str:
        return f"{self.requirement} [{self.scope}]"


class Verifier:
    """Checks images against one policy; ``policy`` None means ``--insecure-policy``. Safe to
    call from several threads (each check uses its own throwaway GnuPG home)."""

    def __init__(self, policy: Policy | None, registries_d: RegistriesD) -> None:
        self.policy = policy
        self.registries_d = registries_d
        self._session: requests.Session | None = None
        self._lock = threading.Lock()  # up verifies its pulls from several threads

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        """Load the policy and registries.d named by ``settings``; raise UsageError (exit 2)
        for a missing or malformed policy unless ``settings.insecure_policy``."""
        if settings.insecure_policy:
            print(
                "bootstrap: warning: --insecure-policy: image signatures are not verified",
                file=sys.stderr,
            )
            return cls(None, RegistriesD({}, {}))
        return cls(load_policy(settings.signature_policy), load_registries_d(settings.registries_d))

    def _http(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                from bootstrap.http import new_session

                self._session = new_session()
            return self._session

    def check_pull(
        self, reference: Reference, manifest: bytes, digest: str, client: AttachmentClient
    ) -> Admission:
        """Verify ``manifest`` (bytes as fetched, digest ``digest``) of ``reference`` pulled
        through ``client``; return the admission or raise :class:`TrustError`."""
        started = time.monotonic()
        if self.policy is None:
            return Admission("none (--insecure-policy)", "-")
        decision = self.policy.requirements_for(reference)
        for req in decision.requirements:
            self._check_one(req, decision, reference, manifest, digest, client)
        admission = Admission(
            _describe(decision), decision.where, elapsed=time.monotonic() - started
        )
        log.debug("%s admitted by %s in %.1f ms", reference, admission, admission.elapsed * 1e3)
        return admission

    def check_archive(self, transport: str, path: Path, name: str) -> Admission:
        """Admit an archive import (archives carry no signatures): only when every
        requirement for ``transport``/``path`` is ``insecureAcceptAnything``."""
        if self.policy is None:
            return Admission("none (--insecure-policy)", "-")
        decision = self.policy.requirements_for_archive(transport, path)
        for req in decision.requirements:
            if req.type == "reject":
                raise TrustError(
                    f"{name}: {transport} {path} rejected by policy (scope {decision.where})",
                    _accept_archive_hint(self.policy.path, transport, path),
                )
            if req.type != "insecureAcceptAnything":
                raise TrustError(
                    f"{name}: {path} carries no signatures and the policy requires "
                    f"{req.describe()} (scope {decision.where})",
                    "pull the signed image from a registry instead, or "
                    + _accept_archive_hint(self.policy.path, transport, path),
                )
        return Admission(_describe(decision), decision.where)

    def _check_one(
        self,
        req: Requirement,
        decision: Decision,
        reference: Reference,
        manifest: bytes,
        digest: str,
        client: AttachmentClient,
    ) -> None:
        if req.type == "insecureAcceptAnything":
            return
        if req.type == "reject":
            raise _rejected(str(reference), decision)
        sources = self.registries_d.sources_for(reference)
        reasons: list[str] = []
        if req.type == "signedBy":
            from bootstrap.trust.gpg import Keyring

            sigs = list(lookaside_signatures(sources.lookaside, reference, digest, self._http()))
            if not sigs:
                raise refusal(reference, [f"no signature (looked in {sources.lookaside})"],
                              decision.where)  # fmt: skip
            with Keyring(req.keys) as keyring:
                for sig in sigs:
                    try:
                        payload, _fpr = keyring.verify(sig)
                        check_payload(
                            parse_payload(payload, SIMPLE_SIGNING_TYPE),
                            manifest,
                            reference,
                            req.identity,
                        )
                        return
                    except BadSignature as exc:
                        reasons.append(exc.reason)
            raise refusal(reference, reasons, decision.where)
        # sigstoreSigned
        from bootstrap.trust.sigstore import attached_signatures, load_public_keys, verify_blob

        if req.keyless:
            raise TrustError(
                f"{reference}: sigstoreSigned with {', '.join(req.keyless)} (Fulcio/Rekor "
                "keyless signing) is not supported",
                f"the policy scope {decision.where} decided; use keyPath/keyData with a "
                "cosign public key",
            )
        if not sources.use_sigstore_attachments:
            raise refusal(
                reference,
                ["no signature (use-sigstore-attachments is not enabled in registries.d)"],
                decision.where,
            )
        keys = load_public_keys(req.keys)
        found = False
        for payload, b64 in attached_signatures(client, reference, digest):
            found = True
            try:
                verify_blob(keys, payload, b64)
                check_payload(parse_payload(payload, COSIGN_TYPE), manifest, reference,
                              req.identity)  # fmt: skip
                return
            except BadSignature as exc:
                reasons.append(exc.reason)
        if not found:
            reasons.append("no signature (no sigstore attachment)")
        raise refusal(reference, reasons, decision.where)


def _describe(decision: Decision) -> str:
    return ", ".join(r.describe() for r in decision.requirements)


def _accept_archive_hint(policy: Path, transport: str, path: Path) -> str:
    """How to admit archives like ``path``: a scope under the archive's own transport (what
    containers-policy.json(5) looks up for it), with an example."""
    example = json.dumps(
        {"transports": {transport: {str(path.absolute().parent): [ACCEPT]}}}, separators=(",", ":")
    )
    return (
        f"archives carry no signatures: to import {transport} files from that directory, add "
        f'its scope to {policy}, e.g. {example} ("" as the scope: every {transport})'
    )


ACCEPT = {"type": "insecureAcceptAnything"}


def _rejected(name: str, decision: Decision) -> TrustError:
    return TrustError(
        f"{name}: rejected by policy",
        f"the policy scope {decision.where} rejects it; add a scope for this image",
    )
