"""GPG "simple signing" verification (``signedBy`` with ``keyType: GPGKeys``).

A simple signature is an OpenPGP signed message (not detached) whose literal data is the
signed payload JSON. It is checked with ``gpgv`` in a throwaway home directory whose only
keyring holds the requirement's keys, so nothing of the user's or root's GnuPG state is read
or written: a ``VALIDSIG`` status line then means "signed by one of the trusted keys".
Armored key files are turned into binary keyrings with ``gpg --dearmor`` in the same throwaway
home. Both run through :func:`bootstrap.process.run`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bootstrap.errors import UsageError
from bootstrap.process import run
from bootstrap.trust.identity import BadSignature
from bootstrap.trust.policy import KeySource

GPG_TIMEOUT = 60.0


class Keyring:
    """A throwaway GnuPG home holding a binary keyring of the trusted keys. Use as a context
    manager; :meth:`verify` may be called many times inside it."""

    def __init__(self, keys: Iterable[KeySource]) -> None:
        self._keys = tuple(keys)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.home = Path()
        self.keyring = Path()

    def __enter__(self) -> Keyring:
        self._tmp = tempfile.TemporaryDirectory(prefix="bootstrap-gpg-")
        self.home = Path(self._tmp.name)
        os.chmod(self.home, 0o700)
        self.keyring = self.home / "trusted.gpg"
        with self.keyring.open("wb") as out:
            for i, key in enumerate(self._keys):
                data = key.read()
                if data.lstrip().startswith(b"-----BEGIN PGP"):
                    armored = self.home / f"key-{i}.asc"
                    armored.write_bytes(data)
                    proc = run(
                        ["gpg", "--homedir", self.home, "--batch", "--dearmor", "-o", "-", armored],
                        error=UsageError,
                        hint=f"is {key.label} an OpenPGP public key?",
                        timeout=GPG_TIMEOUT,
                    )
                    data = proc.stdout
                out.write(data)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def verify(self, signature: bytes) -> tuple[bytes, str]:
        """Check ``signature`` against the keyring; return (payload, signing key fingerprint).
        Not signed by a trusted key, or not a valid signature: :class:`BadSignature`."""
        sig = self.home / "signature"
        payload = self.home / "payload"
        payload.unlink(missing_ok=True)
        sig.write_bytes(signature)
        proc = run(
            ["gpgv", "--homedir", self.home, "--keyring", self.keyring, "--status-fd", "1",
             "--output", payload, sig],
            check=False,
            timeout=GPG_TIMEOUT,
        )  # fmt: skip
        status = proc.stdout.decode(errors="replace").splitlines()
        words = [line.split() for line in status if line.startswith("[GNUPG:] ")]
        valid = [w for w in words if len(w) > 2 and w[1] == "VALIDSIG"]
        if proc.returncode == 0 and valid and payload.exists():
            return payload.read_bytes(), valid[0][-1]
        kinds = {w[1] for w in words if len(w) > 1}
        if "NO_PUBKEY" in kinds or ("ERRSIG" in kinds and "BADSIG" not in kinds):
            missing = next((w[2] for w in words if len(w) > 2 and w[1] == "NO_PUBKEY"), "")
            raise BadSignature(f"signed by an unknown key {missing}".rstrip())
        if "BADSIG" in kinds:
            raise BadSignature("invalid signature (tampered signature bytes)")
        if {"EXPKEYSIG", "REVKEYSIG", "EXPSIG"} & kinds:
            raise BadSignature("signed by an expired or revoked key")
        raise BadSignature("not a valid OpenPGP signature")
