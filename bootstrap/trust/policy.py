"""containers-policy.json(5): parsing into frozen dataclasses and choosing the requirements.

:func:`load_policy` reads a policy file strictly, as containers/image does: unknown keys, a
missing ``default``, an empty requirement list, a bad scope or a requirement without its
mandatory fields are all a :class:`UsageError` (exit 2) naming the file and the JSON path.

:meth:`Policy.requirements_for` picks the requirement list for an image exactly as
containers/image orders the scopes of the ``docker`` transport: the full reference
(``host/repo:tag`` or ``host/repo@digest``), then the repository, then each parent namespace up
to the bare host, then wildcard hosts (``*.sub.example.com``, ``*.example.com``, ``*.com``; the
port is not part of them), and
finally the policy's top-level ``default``. Other transports (``docker-archive``,
``oci-archive``) look up their own scopes (the archive path, its parent directories, then ``""``)
before ``default``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.errors import UsageError
from bootstrap.image.reference import Reference

MAX_POLICY_BYTES = 4 * 1024 * 1024
MAX_KEY_BYTES = 4 * 1024 * 1024

_HINT = "see containers-policy.json(5); --insecure-policy skips verification"


@dataclass(frozen=True)
class SignedIdentity:
    """A ``signedIdentity`` rule: ``type`` is one of ``matchRepoDigestOrExact`` (the default),
    ``matchExact``, ``matchRepository``, ``exactReference`` (``reference``),
    ``exactRepository`` (``reference``), ``remapIdentity`` (``prefix``, ``signed_prefix``)."""

    type: str = "matchRepoDigestOrExact"
    reference: str = ""
    prefix: str = ""
    signed_prefix: str = ""


@dataclass(frozen=True)
class KeySource:
    """Where trusted keys come from: a file path (``path``) or inline bytes (``data``, already
    base64-decoded). ``label`` names it in messages."""

    label: str
    path: Path | None = None
    data: bytes = b""

    def read(self) -> bytes:
        """The key bytes; an unreadable file is a :class:`UsageError` naming it."""
        if self.path is None:
            return self.data
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_KEY_BYTES + 1)
        except OSError as exc:
            raise UsageError(
                f"cannot read key file {self.path}: {exc.strerror or exc}",
                "fix keyPath in the signature policy",
            ) from exc
        if len(data) > MAX_KEY_BYTES:
            raise UsageError(f"key file {self.path} is larger than 4 MiB", "is it a key?")
        return data


@dataclass(frozen=True)
class Requirement:
    """One policy requirement. ``type``: ``insecureAcceptAnything``, ``reject``, ``signedBy``
    or ``sigstoreSigned``. ``keys``: the trusted keys (signedBy: GPG keyrings; sigstoreSigned:
    PEM public keys). ``identity``: the signedIdentity rule. ``keyless``: the sigstoreSigned
    fields this tool does not implement (``fulcio``, ``rekorPublicKey*``), refused at
    verification time with a "not supported" error."""

    type: str
    keys: tuple[KeySource, ...] = ()
    identity: SignedIdentity = SignedIdentity()
    keyless: tuple[str, ...] = ()

    def describe(self) -> str:
        """Short human form, e.g. ``signedBy (GPGKeys, 1 key)``."""
        if self.type == "signedBy":
            return f"signedBy (GPGKeys, {', '.join(k.label for k in self.keys)})"
        if self.type == "sigstoreSigned":
            return f"sigstoreSigned ({', '.join(k.label for k in self.keys) or 'keyless'})"
        return self.type


@dataclass(frozen=True)
class Decision:
    """The requirements chosen for one image and the scope that chose them: ``transport``
    (``docker``, ``docker-archive``, ...) and ``scope`` (the matching key, or ``default``)."""

    transport: str
    scope: str
    requirements: tuple[Requirement, ...]

    @property
    def where(self) -> str:
        """Human form of the deciding scope, e.g. ``transports.docker["quay.io/ns"]``."""
        if self.scope == "default":
            return "default"
        return f'transports.{self.transport}["{self.scope}"]'


@dataclass(frozen=True)
class Policy:
    """A parsed policy file: ``default`` requirements and per-transport scopes."""

    path: Path
    default: tuple[Requirement, ...]
    transports: Mapping[str, Mapping[str, tuple[Requirement, ...]]]

    def requirements_for(self, reference: Reference) -> Decision:
        """The requirements for pulling ``reference`` over the docker transport."""
        return self._lookup("docker", docker_scopes(reference))

    def requirements_for_archive(self, transport: str, path: Path) -> Decision:
        """The requirements for importing the archive at ``path`` over ``transport``
        (``docker-archive`` or ``oci-archive``): the path, each parent directory, then ``""``
        (the transport's own default), then the policy's ``default``."""
        p = path.absolute()
        candidates = [str(p)] + [str(d) for d in p.parents] + [""]
        return self._lookup(transport, candidates)

    def _lookup(self, transport: str, candidates: Iterable[str]) -> Decision:
        scopes = self.transports.get(transport, {})
        for scope in candidates:
            if scope in scopes:
                return Decision(transport, scope, scopes[scope])
        return Decision(transport, "default", self.default)


def docker_scopes(reference: Reference) -> list[str]:
    """The docker-transport scopes for ``reference``, most specific first (as containers/image's
    PolicyConfigurationIdentity + PolicyConfigurationNamespaces)."""
    out = [identity_string(reference)]
    name = reference.repository
    while True:
        out.append(name)
        slash = name.rfind("/")
        if slash == -1:
            break
        name = name[:slash]
    host = name.rsplit(":", 1)[0] if ":" in name and not name.endswith("]") else name
    while "." in host:  # wildcards name the host without its port, as containers/image does
        host = host[host.index(".") + 1 :]
        out.append("*." + host)
    return out


def identity_string(reference: Reference) -> str:
    """``repo@digest`` when pinned, else ``repo:tag``: the form scopes and identities compare."""
    if reference.digest:
        return f"{reference.repository}@{reference.digest}"
    return f"{reference.repository}:{reference.tag or 'latest'}"


# ---- parsing -----------------------------------------------------------------------------------


def load_policy(path: Path) -> Policy:
    """Read and parse the policy file at ``path``. Missing, unreadable or malformed:
    :class:`UsageError` (exit 2) naming the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except FileNotFoundError as exc:
        raise UsageError(
            f"signature policy {path} does not exist",
            "create it (e.g. install.sh writes a permissive one), pass --signature-policy PATH, "
            "or --insecure-policy",
        ) from exc
    except OSError as exc:
        raise UsageError(
            f"cannot read signature policy {path}: {exc.strerror or exc}", _HINT
        ) from exc
    if len(raw) > MAX_POLICY_BYTES:
        raise UsageError(f"signature policy {path} is larger than 4 MiB", _HINT)
    return parse_policy(raw, path)


def parse_policy(raw: bytes, path: Path) -> Policy:
    """Parse policy JSON ``raw``; ``path`` names it in errors (and resolves relative keyPaths
    against the current directory, as containers/image does)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"signature policy {path}: not valid JSON ({exc})", _HINT) from exc
    p = _Parser(path)
    obj = p.obj(doc, "")
    p.keys(obj, "", {"default", "transports"})
    if "default" not in obj:
        raise p.bad("", '"default" is required')
    default = p.requirements(obj["default"], "default")
    transports: dict[str, dict[str, tuple[Requirement, ...]]] = {}
    for tname, scopes in p.obj(obj.get("transports", {}), "transports").items():
        where = f"transports.{tname}"
        parsed: dict[str, tuple[Requirement, ...]] = {}
        for scope, reqs in p.obj(scopes, where).items():
            swhere = f'{where}["{scope}"]'
            if tname == "docker":
                p.docker_scope(scope, swhere)
            parsed[scope] = p.requirements(reqs, swhere)
        transports[tname] = parsed
    return Policy(path, default, transports)


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def bad(self, where: str, what: str) -> UsageError:
        at = f" at {where}" if where else ""
        return UsageError(f"signature policy {self.path}{at}: {what}", _HINT)

    def obj(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(where, "expected a JSON object")
        return value

    def keys(self, obj: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in obj:
            if key not in allowed:
                raise self.bad(where, f"unknown field {key!r}")

    def string(self, obj: Mapping[str, Any], key: str, where: str) -> str:
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            raise self.bad(where, f'"{key}" must be a non-empty string')
        return value

    def docker_scope(self, scope: str, where: str) -> None:
        if scope.startswith("*."):
            if not scope[2:] or "/" in scope or "*" in scope[2:]:
                raise self.bad(where, "a wildcard scope is *.DOMAIN and nothing else")
            return
        try:
            ref = Reference.parse(scope)
        except UsageError as exc:
            raise self.bad(where, f"invalid scope: {exc.message}") from exc
        if ref.tag and ref.digest:
            raise self.bad(where, "a scope cannot have both a tag and a digest")
        if scope not in (ref.repository, identity_string(ref)) and not _is_host(scope, ref):
            raise self.bad(
                where, f"scope must be fully qualified (did you mean {ref.repository!r}?)"
            )

    def requirements(self, value: Any, where: str) -> tuple[Requirement, ...]:
        if not isinstance(value, list) or not value:
            raise self.bad(where, "expected a non-empty list of requirements")
        return tuple(self.requirement(r, f"{where}[{i}]") for i, r in enumerate(value))

    def requirement(self, value: Any, where: str) -> Requirement:
        obj = self.obj(value, where)
        kind = obj.get("type")
        if kind in ("insecureAcceptAnything", "reject"):
            self.keys(obj, where, {"type"})
            return Requirement(str(kind))
        if kind == "signedBy":
            self.keys(obj, where, {"type", "keyType", "keyPath", "keyPaths", "keyData",
                                   "signedIdentity"})  # fmt: skip
            key_type = obj.get("keyType")
            if key_type != "GPGKeys":
                if key_type in ("SignedByGPGKeys", "X509Certificates", "SignedByX509CAs"):
                    raise self.bad(where, f'keyType "{key_type}" is not supported; use "GPGKeys"')
                raise self.bad(where, '"keyType" must be "GPGKeys"')
            keys = self.key_sources(obj, where, {"keyPath", "keyPaths", "keyData"})
            return Requirement("signedBy", keys, self.identity(obj.get("signedIdentity"), where))
        if kind == "sigstoreSigned":
            allowed = {"type", "keyPath", "keyPaths", "keyData", "fulcio",
                       "rekorPublicKeyPath", "rekorPublicKeyPaths", "rekorPublicKeyData",
                       "signedIdentity"}  # fmt: skip
            self.keys(obj, where, allowed)
            keyless = tuple(
                k for k in ("fulcio", "rekorPublicKeyPath", "rekorPublicKeyPaths",
                            "rekorPublicKeyData") if k in obj
            )  # fmt: skip
            present = [k for k in ("keyPath", "keyPaths", "keyData") if k in obj]
            if not present and "fulcio" not in obj:
                raise self.bad(where, 'one of "keyPath", "keyPaths", "keyData" or "fulcio"')
            keys = (
                self.key_sources(obj, where, {"keyPath", "keyPaths", "keyData"}) if present else ()
            )
            ident = self.identity(obj.get("signedIdentity"), where)
            return Requirement("sigstoreSigned", keys, ident, keyless)
        if kind is None:
            raise self.bad(where, '"type" is required')
        raise self.bad(where, f"unknown requirement type {kind!r}")

    def key_sources(
        self, obj: Mapping[str, Any], where: str, names: set[str]
    ) -> tuple[KeySource, ...]:
        present = [k for k in sorted(names) if k in obj]
        if len(present) != 1:
            raise self.bad(where, 'exactly one of "keyPath", "keyPaths" or "keyData" is required')
        key = present[0]
        value = obj[key]
        if key == "keyPath":
            path = self.string(obj, key, where)
            return (KeySource(path, path=Path(path)),)
        if key == "keyPaths":
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) and v for v in value)
            ):
                raise self.bad(where, '"keyPaths" must be a non-empty list of paths')
            return tuple(KeySource(v, path=Path(v)) for v in value)
        text = self.string(obj, key, where)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise self.bad(where, '"keyData" is not valid base64') from exc
        return (KeySource("keyData", data=data),)

    def identity(self, value: Any, where: str) -> SignedIdentity:
        if value is None:
            return SignedIdentity()
        where = f"{where}.signedIdentity"
        obj = self.obj(value, where)
        kind = obj.get("type")
        if kind in ("matchExact", "matchRepoDigestOrExact", "matchRepository"):
            self.keys(obj, where, {"type"})
            return SignedIdentity(str(kind))
        if kind == "exactReference":
            self.keys(obj, where, {"type", "dockerReference"})
            text = self.string(obj, "dockerReference", where)
            ref, name_only = parse_named(text, self.bad(where, f"invalid dockerReference {text!r}"))
            if name_only:
                raise self.bad(where, "dockerReference must have a tag or digest")
            return SignedIdentity("exactReference", reference=identity_string(ref))
        if kind == "exactRepository":
            self.keys(obj, where, {"type", "dockerRepository"})
            text = self.string(obj, "dockerRepository", where)
            ref, _ = parse_named(text, self.bad(where, f"invalid dockerRepository {text!r}"))
            return SignedIdentity("exactRepository", reference=ref.repository)
        if kind == "remapIdentity":
            self.keys(obj, where, {"type", "prefix", "signedPrefix"})
            prefix = self.string(obj, "prefix", where)
            signed = self.string(obj, "signedPrefix", where)
            for what, text in (("prefix", prefix), ("signedPrefix", signed)):
                if text.startswith("*."):
                    raise self.bad(where, f"{what} cannot be a wildcard")
                self.docker_scope(text, f"{where}.{what}")
            return SignedIdentity("remapIdentity", prefix=prefix, signed_prefix=signed)
        if kind is None:
            raise self.bad(where, '"type" is required')
        raise self.bad(where, f"unknown signedIdentity type {kind!r}")


def _is_host(scope: str, ref: Reference) -> bool:
    """True when ``scope`` is a bare registry host (``example.com``, ``localhost:5000``)."""
    return "/" not in scope and (("." in scope) or (":" in scope) or scope == "localhost")


def parse_named(text: str, error: UsageError) -> tuple[Reference, bool]:
    """Parse ``text`` as containers/image's ParseNormalizedNamed; return it and whether it was
    name-only (no tag, no digest). Invalid: raise ``error``."""
    try:
        ref = Reference.parse(text)
    except UsageError as exc:
        raise error from exc
    last = text.rsplit("/", 1)[-1]
    name_only = ":" not in last and "@" not in text
    return ref, name_only
