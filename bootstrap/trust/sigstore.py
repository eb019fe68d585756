"""sigstore signatures (``sigstoreSigned`` with a public key), as cosign stores them.

With ``use-sigstore-attachments``, an image's signatures are an OCI manifest in the same
repository tagged ``sha256-<hex>.sig`` (the signed manifest digest); each layer is a payload
blob (the signed JSON) whose ``dev.cosignproject.cosign/signature`` annotation holds the base64
signature over the blob's bytes. Keys are PEM ``PUBLIC KEY`` (ECDSA: SHA-256; Ed25519; RSA:
PKCS#1 v1.5 with SHA-256), checked with ``cryptography``. Fulcio certificates and Rekor bundles
(keyless signing) are not supported.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.image.model import MAX_MANIFEST_BYTES, Descriptor
from bootstrap.image.reference import Reference
from bootstrap.trust.identity import BadSignature
from bootstrap.trust.policy import KeySource

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
MAX_ATTACHED = 64

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


class AttachmentClient(Protocol):
    """What reading attachments needs from the registry client."""

    def get_manifest(self, ref: Reference, digest: str | None = None) -> object: ...

    def get_blob_bytes(self, ref: Reference, desc: Descriptor, limit: int) -> bytes: ...


def load_public_keys(keys: tuple[KeySource, ...]) -> list[PublicKey]:
    """Parse PEM public keys; anything else is a :class:`UsageError` naming the key."""
    out: list[PublicKey] = []
    for key in keys:
        try:
            loaded = serialization.load_pem_public_key(key.read())
        except ValueError as exc:
            raise UsageError(
                f"sigstore key {key.label}: not a PEM public key", "use cosign's cosign.pub"
            ) from exc
        if not isinstance(loaded, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
                          | rsa.RSAPublicKey):  # fmt: skip
            raise UsageError(f"sigstore key {key.label}: unsupported key type", "use ECDSA")
        out.append(loaded)
    return out


def verify_blob(keys: list[PublicKey], payload: bytes, signature_b64: str) -> None:
    """Raise :class:`BadSignature` unless one of ``keys`` signed ``payload``."""
    try:
        sig = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadSignature("the sigstore signature is not valid base64") from exc
    for key in keys:
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(sig, payload)
            else:
                key.verify(sig, payload, padding.PKCS1v15(), hashes.SHA256())
            return
        except InvalidSignature:
            continue
    raise BadSignature("sigstore signature not made by a trusted key (unknown key or tampered)")


def attached_signatures(
    client: AttachmentClient, reference: Reference, digest: str
) -> Iterator[tuple[bytes, str]]:
    """Yield (payload, base64 signature) for each layer of the ``sha256-<hex>.sig`` manifest
    of ``digest`` in ``reference``'s repository; none when that tag does not exist."""
    from bootstrap.image.registry import FetchedManifest, NotFoundError

    algo, _, hexpart = digest.partition(":")
    tag_ref = reference.with_tag(f"{algo}-{hexpart}.sig")
    try:
        fetched = client.get_manifest(tag_ref)
    except NotFoundError:
        return
    assert isinstance(fetched, FetchedManifest)
    if len(fetched.data) > MAX_MANIFEST_BYTES:  # pragma: no cover - the client refuses it
        raise BadSignature("the signature manifest is too large")
    try:
        doc = json.loads(fetched.data)
        layers = doc.get("layers") or []
    except (ValueError, AttributeError) as exc:
        raise BadSignature("the signature manifest is not JSON") from exc
    for i, layer in enumerate(layers[:MAX_ATTACHED]):
        try:
            desc = Descriptor.from_json(layer, f"{tag_ref} layers[{i}]")
        except IntegrityError as exc:
            raise BadSignature(f"signature manifest layer {i}: {exc.message}") from exc
        sig = (desc.annotations or {}).get(SIGNATURE_ANNOTATION)
        if not isinstance(sig, str):
            continue
        yield client.get_blob_bytes(tag_ref, desc, MAX_PAYLOAD_BYTES), sig
