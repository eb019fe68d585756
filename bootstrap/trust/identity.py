"""The signed payload (simple signing / sigstore) and ``signedIdentity`` matching.

Both signature formats sign the same JSON document::

    {"critical": {"identity": {"docker-reference": "..."},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "atomic container signature"},
     "optional": {...}}

(sigstore payloads have type "cosign container image signature").

:func:`parse_payload` reads it strictly (unknown fields in ``critical`` refused, as
containers/image does); :func:`identity_matches` applies a :class:`SignedIdentity` rule the way
containers/image's policy_reference_match.go does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bootstrap.errors import TrustError, UsageError
from bootstrap.image.reference import Reference
from bootstrap.trust.policy import SignedIdentity, identity_string, parse_named

SIMPLE_SIGNING_TYPE = "atomic container signature"
COSIGN_TYPE = "cosign container image signature"


@dataclass(frozen=True)
class Payload:
    """What a signature claims: ``reference`` (the signed docker-reference, as written) and
    ``digest`` (the signed manifest digest)."""

    reference: str
    digest: str


class BadSignature(Exception):
    """One signature that does not verify; ``reason`` is the user-facing why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_payload(data: bytes, expected_type: str) -> Payload:
    """Parse a signed payload; raise :class:`BadSignature` when it is malformed."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadSignature("the signed payload is not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("critical"), dict):
        raise BadSignature('the signed payload has no "critical" object')
    if set(doc) - {"critical", "optional"}:
        raise BadSignature("the signed payload has unknown top-level fields")
    crit: dict[str, Any] = doc["critical"]
    if set(crit) != {"identity", "image", "type"}:
        raise BadSignature('the signed payload\'s "critical" has missing or unknown fields')
    if crit.get("type") != expected_type:
        raise BadSignature(f"the signature is of type {crit.get('type')!r}, not {expected_type!r}")
    ident, image = crit.get("identity"), crit.get("image")
    if not isinstance(ident, dict) or set(ident) != {"docker-reference"}:
        raise BadSignature("the signed identity is malformed")
    if not isinstance(image, dict) or set(image) != {"docker-manifest-digest"}:
        raise BadSignature("the signed image digest is malformed")
    ref, digest = ident["docker-reference"], image["docker-manifest-digest"]
    if not isinstance(ref, str) or not isinstance(digest, str):
        raise BadSignature("the signed identity or digest is not a string")
    return Payload(ref, digest)


def check_payload(
    payload: Payload, manifest: bytes, reference: Reference, rule: SignedIdentity
) -> None:
    """Check a verified payload against the manifest as fetched and the image's reference;
    raise :class:`BadSignature` for a digest mismatch or an identity the rule refuses."""
    algo, _, hexpart = payload.digest.partition(":")
    if algo not in ("sha256", "sha512") or not hexpart:
        raise BadSignature(f"the signed digest {payload.digest!r} is not a sha256/sha512 digest")
    actual = f"{algo}:{hashlib.new(algo, manifest).hexdigest()}"
    if actual != payload.digest:
        raise BadSignature(
            f"manifest digest mismatch: the signature is for {payload.digest}, the manifest is "
            f"{actual}"
        )
    if not identity_matches(rule, reference, payload.reference):
        raise BadSignature(
            f"signature for another identity: signed {payload.reference!r}, wanted "
            f"{identity_string(reference)!r} ({rule.type})"
        )


def identity_matches(rule: SignedIdentity, intended: Reference, signed_text: str) -> bool:
    """Whether ``signed_text`` (the signature's docker-reference) satisfies ``rule`` for
    pulling ``intended``."""
    try:
        signed, signed_name_only = parse_named(signed_text, UsageError("bad"))
    except UsageError:
        return False
    signed_id = signed.repository if signed_name_only else identity_string(signed)
    kind = rule.type
    if kind == "matchExact":
        return not signed_name_only and signed_id == identity_string(intended)
    if kind == "matchRepoDigestOrExact":
        return _repo_digest_or_exact(intended, signed, signed_name_only)
    if kind == "matchRepository":
        return signed.repository == intended.repository
    if kind == "exactReference":
        return not signed_name_only and signed_id == rule.reference
    if kind == "exactRepository":
        return signed.repository == rule.reference
    if kind == "remapIdentity":
        remapped = _remap(intended, rule.prefix, rule.signed_prefix)
        return _repo_digest_or_exact(remapped, signed, signed_name_only)
    return False  # pragma: no cover - the parser admits only the types above


def _repo_digest_or_exact(intended: Reference, signed: Reference, signed_name_only: bool) -> bool:
    if intended.digest:
        return signed.repository == intended.repository
    return (
        not signed_name_only
        and not signed.digest
        and identity_string(signed) == (identity_string(intended))
    )


def _remap(intended: Reference, prefix: str, signed_prefix: str) -> Reference:
    text = identity_string(intended)
    if not _ref_matches_prefix(text, prefix):
        return intended
    try:
        return Reference.parse(signed_prefix + text[len(prefix) :])
    except UsageError:
        return intended


def _ref_matches_prefix(ref: str, prefix: str) -> bool:
    if len(ref) < len(prefix):
        return False
    if len(ref) == len(prefix):
        return ref == prefix
    return ref.startswith(prefix) and ref[len(prefix)] in ":/@"


def refusal(reference: Reference, reasons: list[str], scope: str) -> TrustError:
    """The one-line refusal for ``reference`` with the reasons of each signature tried."""
    shown = "; ".join(dict.fromkeys(reasons)) or "no signature"
    return TrustError(
        f"{reference}: signature verification failed: {shown}",
        f"the policy scope {scope} decided; sign the image with a trusted key or change the policy",
    )
