"""Signature verification per containers-policy.json(5) and registries.d(5).

The pull and import paths call :class:`bootstrap.trust.verify.Verifier` between fetching a
manifest and tagging it in the store; this package knows nothing of deploy or systemd.
"""
