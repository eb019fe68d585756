"""Image references: the grammar and normalization of Docker's distribution/reference package.

``Reference.parse(text)`` accepts what ``docker pull`` accepts and normalizes it the way
``ParseNormalizedNamed`` + ``TagNameOnly`` do::

    busybox                      -> docker.io/library/busybox:latest
    library/busybox:1.36         -> docker.io/library/busybox:1.36
    index.docker.io/foo/bar      -> docker.io/foo/bar:latest
    127.0.0.1:5000/a/b@sha256:.. -> 127.0.0.1:5000/a/b@sha256:..      (no tag added)
    localhost/x:t@sha256:..      -> localhost/x:t@sha256:..           (tag and digest kept)

The first path component is a domain only when it is ``localhost``, contains ``.`` or ``:``, or
has upper-case letters (``Foo/bar`` is domain ``Foo``); otherwise the name is on Docker Hub.
Digests must use a registered algorithm (sha256: 64, sha512: 128 lower-case hex digits).
Invalid input raises :class:`~bootstrap.errors.UsageError` (exit 2) naming the offending part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from bootstrap.errors import UsageError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

# --- the grammar, transcribed from distribution/reference regexp.go -------------------------
_ALPHANUMERIC = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_OPTIONAL_PORT = r"(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9a-fA-F]{32,}"
_IDENTIFIER = r"[a-f0-9]{64}"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN_NAME = _DOMAIN_NAME_COMPONENT + r"(?:\." + _DOMAIN_NAME_COMPONENT + r")*"
_HOST = r"(?:" + _DOMAIN_NAME + r"|" + _IPV6 + r")"
_DOMAIN_AND_PORT = _HOST + _OPTIONAL_PORT
_PATH_COMPONENT = _ALPHANUMERIC + r"(?:" + _SEPARATOR + _ALPHANUMERIC + r")*"
_REMOTE_NAME = _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*"
_NAME = r"(?:" + _DOMAIN_AND_PORT + r"/)?" + _REMOTE_NAME

_REFERENCE_RE = re.compile(
    r"(" + _NAME + r")(?::(" + _TAG + r"))?(?:@(" + _DIGEST + r"))?", re.ASCII
)
_ANCHORED_NAME_RE = re.compile(
    r"(?:(" + _DOMAIN_AND_PORT + r")/)?(" + _REMOTE_NAME + r")", re.ASCII
)
_TAG_RE = re.compile(_TAG, re.ASCII)
_DIGEST_RE = re.compile(_DIGEST, re.ASCII)
_IDENTIFIER_RE = re.compile(_IDENTIFIER, re.ASCII)
_DOMAIN_RE = re.compile(_DOMAIN_AND_PORT, re.ASCII)
_PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT, re.ASCII)
# registered digest algorithms and the length of their lower-case hex encoding
_ALGORITHMS = {"sha256": 64, "sha512": 128}

_HINT = "expected [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST], e.g. docker.io/library/busybox:1.36"


def _bad(text: str, what: str) -> UsageError:
    return UsageError(f"invalid image reference {text[:300]!r}: {what}", _HINT)


def is_domain(text: str) -> bool:
    """True when ``text`` is a valid ``host[:port]`` (domain name, IPv4, or ``[IPv6]``)."""
    return _DOMAIN_RE.fullmatch(text) is not None


def split_docker_domain(name: str) -> tuple[str, str, bool]:
    """Split ``name`` (no validation) into (domain, remainder, explicit) as Docker does.

    ``explicit`` is False when no domain was given and Docker Hub was assumed; official images
    get the ``library/`` prefix. Mirrors distribution/reference ``splitDockerDomain``.
    """
    first, sep, rest = name.partition("/")
    if not sep:
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + name, False
    explicit = True
    if first == "localhost":
        domain, remainder = first, rest
    elif first == LEGACY_DEFAULT_DOMAIN:
        domain, remainder = DEFAULT_DOMAIN, rest
    elif "." in first or ":" in first or first.lower() != first:
        domain, remainder = first, rest
    else:
        domain, remainder, explicit = DEFAULT_DOMAIN, name, False
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder, explicit


def has_explicit_domain(text: str) -> bool:
    """True when the reference text names its registry (``Reference.parse`` would not have to
    assume Docker Hub). Short names like ``busybox`` or ``library/busybox`` give False."""
    return split_docker_domain(text)[2]


def _check_digest(text: str, digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    length = _ALGORITHMS.get(algorithm)
    if length is None:
        raise _bad(text, f"digest algorithm {algorithm!r} is not supported (use sha256 or sha512)")
    if len(encoded) != length or re.fullmatch(r"[a-f0-9]+", encoded) is None:
        raise _bad(text, f"digest {digest!r} is not {length} lower-case hex digits")
    return digest


def _diagnose(text: str) -> UsageError:
    """Name the part of an invalid reference that is wrong."""
    rest = text
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST_RE.fullmatch(digest):
            return _bad(text, f"digest {digest!r} is not ALGORITHM:HEX")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            return _bad(text, f"tag {tag!r} must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}")
    if not rest:
        return _bad(text, "the repository name is empty")
    components = rest.split("/")
    if (
        len(components) > 1
        and is_domain(components[0])
        and ("." in components[0] or ":" in components[0] or components[0] == "localhost")
    ):
        components = components[1:]
    elif len(components) > 1 and (
        "." in components[0] or ":" in components[0] or "[" in components[0]
    ):
        return _bad(text, f"registry {components[0]!r} is not a valid host[:port]")
    for comp in components:
        if comp.lower() != comp and _PATH_COMPONENT_RE.fullmatch(comp.lower()):
            return _bad(text, f"repository name component {comp!r} must be lowercase")
        if not _PATH_COMPONENT_RE.fullmatch(comp):
            return _bad(
                text,
                f"repository name component {comp!r} must be lower-case letters and digits "
                "separated by '.', '_', '__' or '-'",
            )
    return _bad(text, "invalid reference format")


@dataclass(frozen=True)
class Reference:
    """A normalized image reference. ``tag`` is "latest" when neither tag nor digest was given;
    with a digest the tag is kept if one was written (the digest decides what is fetched)."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalize ``text``; raises :class:`UsageError` naming the bad part."""
        if not isinstance(text, str) or not text:
            raise UsageError("invalid image reference '': the reference is empty", _HINT)
        if text != text.strip() or any(c.isspace() for c in text):
            raise _bad(text, "whitespace is not allowed")
        if _IDENTIFIER_RE.fullmatch(text):
            raise _bad(text, "a 64-character hex string is an image ID, not a repository name")
        domain, remainder, _ = split_docker_domain(text)
        remote = remainder.split(":", 1)[0]
        if remote.lower() != remote:
            shown = remote.split("@")[0]
            if "/" not in text.split("@")[0]:
                shown = shown.removeprefix(OFFICIAL_REPO_PREFIX)
            raise _bad(text, f"repository name {shown!r} must be lowercase")
        return cls._parse_canonical(domain + "/" + remainder, text)

    @classmethod
    def _parse_canonical(cls, full: str, original: str) -> Reference:
        m = _REFERENCE_RE.fullmatch(full)
        if m is None:
            raise _diagnose(original)
        name, tag, digest = m.group(1), m.group(2), m.group(3)
        nm = _ANCHORED_NAME_RE.fullmatch(name)
        if nm is None or nm.group(1) is None:  # pragma: no cover - the domain was prefixed
            raise _diagnose(original)
        domain, path = nm.group(1), nm.group(2)
        if len(path) > NAME_TOTAL_LENGTH_MAX:
            raise _bad(
                original,
                f"repository name is {len(path)} characters, more than {NAME_TOTAL_LENGTH_MAX}",
            )
        if digest is not None:
            _check_digest(original, digest)
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(domain, path, tag, digest)

    @classmethod
    def qualify(cls, text: str, domain: str) -> Reference:
        """Parse the short name ``text`` as if written ``domain/text`` (for search registries)."""
        return cls.parse(f"{domain}/{text}")

    def __str__(self) -> str:
        out = f"{self.domain}/{self.path}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    @property
    def repository(self) -> str:
        """``domain/path``, the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    def with_digest(self, digest: str) -> Reference:
        """This reference pinned to ``digest`` (the tag is kept); raises :class:`UsageError`."""
        _check_digest(f"{self.repository}@{digest}", digest)
        return replace(self, digest=digest)

    def with_tag(self, tag: str) -> Reference:
        """This reference with ``tag`` and no digest; raises :class:`UsageError`."""
        if not _TAG_RE.fullmatch(tag):
            raise _bad(f"{self.repository}:{tag}", f"tag {tag!r} is not valid")
        return replace(self, tag=tag, digest=None)

    def familiar(self) -> str:
        """The short form Docker shows: ``busybox:latest``, ``user/app:1``, ``host:5000/x:t``."""
        out = self.familiar_name()
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def familiar_name(self) -> str:
        """The familiar repository name without tag or digest (``busybox``, ``user/app``)."""
        if self.domain != DEFAULT_DOMAIN:
            return self.repository
        path = self.path
        if path.startswith(OFFICIAL_REPO_PREFIX):
            rest = path[len(OFFICIAL_REPO_PREFIX) :]
            if "/" not in rest:
                path = rest
        return path

    @property
    def tag_or_digest(self) -> str:
        """What a manifest GET asks for: the digest if pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG
