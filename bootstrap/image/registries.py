"""Where to pull from: ``registries.conf`` (containers-registries.conf(5)) and ``certs.d``.

``load()`` reads the v2 TOML format (and the old v1 ``[registries.search|insecure|block]`` tables)
with :mod:`tomllib`, from ``path``, else ``$REGISTRIES_CONFIG_PATH``, else
``/etc/containers/registries.conf`` plus ``/etc/containers/registries.conf.d/*.conf`` drop-ins
(later files override earlier ones per prefix, as in containers/image), else nothing.

``RegistriesConf.endpoints(ref)`` returns, like containers/image's ``PullSourcesFromReference``,
the places to try in order: the mirrors of the ``[[registry]]`` whose ``prefix`` matches the
reference longest (skipped per ``mirror-by-digest-only`` / ``pull-from-mirror``), then the
registry's ``location``; each with the reference rewritten (prefix replaced by the location), its
``insecure`` flag and the TLS material found in ``certs.d``.

Insecure endpoints are tried over https without certificate verification first and then over
plain http (as containers/image does); ``127.0.0.1`` and ``localhost`` are not insecure unless
configured. Docker Hub (``docker.io``) is reached at ``registry-1.docker.io``.

Short names: ``unqualified_search(text)`` returns the candidates to try for a reference without
a registry: ``[aliases]`` first, then each ``unqualified-search-registries`` entry in order; with
none configured, Docker's normalization (``docker.io/library/...``) applies. References that name
their registry are returned as they are.

certs.d: directories from ``$BOOTSTRAP_CERTS_D`` (colon-separated), else
``/etc/containers/certs.d`` then ``/etc/docker/certs.d``; the first that has a ``HOST[:PORT]``
subdirectory is used. In it every ``*.crt`` is a CA certificate and each ``NAME.cert`` must come
with ``NAME.key`` (a client certificate), as in containers/image's tlsclientconfig.
Configuration errors raise :class:`~bootstrap.errors.UsageError` naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.errors import UsageError
from bootstrap.image.reference import (
    DEFAULT_DOMAIN,
    Reference,
    has_explicit_domain,
    is_domain,
)

SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
SYSTEM_REGISTRIES_CONF_D = Path("/etc/containers/registries.conf.d")
SYSTEM_CERTS_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))
DOCKER_HUB_API_HOST = "registry-1.docker.io"

PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")


@dataclass(frozen=True)
class Mirror:
    """One ``[[registry.mirror]]``: ``location`` is ``host[:port][/namespace...]``."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryConfig:
    """One ``[[registry]]`` table. ``prefix`` defaults to ``location``; a ``*.example.com``
    prefix matches subdomains and may leave ``location`` empty (the reference is kept)."""

    prefix: str
    location: str
    mirrors: tuple[Mirror, ...] = ()
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False


@dataclass(frozen=True)
class TLSFiles:
    """TLS material for one host from certs.d: CA files and (cert, key) client pairs."""

    directory: str | None = None
    ca_files: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Endpoint:
    """One place to pull ``reference`` (already rewritten for this endpoint) from.

    ``host`` is the ``host[:port]`` from the rewritten reference (certs.d and auth use it);
    ``api_host`` is where HTTP goes (``registry-1.docker.io`` for ``docker.io``). ``insecure``
    means: skip TLS verification and fall back to plain http.
    """

    host: str
    reference: Reference
    insecure: bool = False
    mirror: bool = False
    tls: TLSFiles = field(default_factory=TLSFiles)

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API_HOST if self.host == DEFAULT_DOMAIN else self.host


def certs_dirs(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The certs.d directories searched, in order."""
    env = os.environ if env is None else env
    value = env.get("BOOTSTRAP_CERTS_D")
    if value:
        return tuple(Path(p) for p in value.split(":") if p)
    return SYSTEM_CERTS_DIRS


def tls_files(host: str, dirs: Sequence[Path] | None = None) -> TLSFiles:
    """Collect ``*.crt`` CA files and ``*.cert``/``*.key`` pairs for ``host`` from the first
    certs.d directory that has a ``host`` subdirectory. A ``.cert`` without its ``.key`` (or the
    other way round) raises :class:`UsageError` naming the file."""
    for base in certs_dirs() if dirs is None else dirs:
        hostdir = base / host
        if not hostdir.is_dir():
            continue
        try:
            names = sorted(os.listdir(hostdir))
        except OSError as exc:
            raise UsageError(
                f"certs.d {hostdir}: cannot list: {exc.strerror}", "check its permissions"
            ) from exc
        cas: list[str] = []
        pairs: list[tuple[str, str]] = []
        for name in names:
            full = hostdir / name
            if name.endswith(".crt"):
                cas.append(str(full))
            elif name.endswith(".cert"):
                key = hostdir / (name[: -len(".cert")] + ".key")
                if not key.exists():
                    raise UsageError(
                        f"certs.d {full}: client certificate without its key {key.name}",
                        "put the private key next to it or remove the certificate",
                    )
                pairs.append((str(full), str(key)))
            elif name.endswith(".key"):
                cert = hostdir / (name[: -len(".key")] + ".cert")
                if not cert.exists():
                    raise UsageError(
                        f"certs.d {full}: key without its client certificate {cert.name}",
                        "put the certificate next to it or remove the key",
                    )
        return TLSFiles(str(hostdir), tuple(cas), tuple(pairs))
    return TLSFiles()


def _match_prefix(ref: str, prefix: str) -> int:
    """Length of ``ref`` matched by ``prefix`` (containers/image ``refMatchingPrefix``), or -1."""
    if prefix.startswith("*."):
        index = ref.find(prefix[1:])
        if index == -1 or "/" in ref[:index]:
            return -1
        index += len(prefix) - 1
        if index == len(ref) or ref[index] in ":/@":
            return index
        return -1
    if len(ref) < len(prefix) or not ref.startswith(prefix):
        return -1
    if (
        len(ref) == len(prefix)
        or ref[len(prefix)] in "/@"
        or (ref[len(prefix)] == ":" and "/" in prefix)
    ):
        # "example.com" must not match "example.com:5000/x" (a different registry); a
        # repository prefix "example.com/ns/repo" does match "example.com/ns/repo:tag".
        return len(prefix)
    return -1


class _ConfError(Exception):
    pass


def _location(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise _ConfError(f"{key}: expected a string")
    trimmed = value.rstrip("/")
    if trimmed.startswith(("http://", "https://")):
        raise _ConfError(f"{key}: {value!r}: URI schemes are not supported, write host[/path]")
    return trimmed


def _bool(table: Mapping[str, Any], name: str, key: str) -> bool:
    value = table.get(name, False)
    if not isinstance(value, bool):
        raise _ConfError(f"{key}.{name}: expected true or false")
    return value


_REGISTRY_KEYS = {"prefix", "location", "insecure", "blocked", "mirror", "mirror-by-digest-only"}
_MIRROR_KEYS = {"location", "insecure", "pull-from-mirror"}
_TOP_KEYS = {
    "registry",
    "unqualified-search-registries",
    "short-name-mode",
    "credential-helpers",
    "aliases",
    "additional-layer-store-auth-helper",
    "registries",  # v1
}


def _parse_registry(table: object, key: str) -> RegistryConfig:
    if not isinstance(table, dict):
        raise _ConfError(f"{key}: expected a table")
    unknown = sorted(set(table) - _REGISTRY_KEYS)
    if unknown:
        raise _ConfError(f"{key}.{unknown[0]}: unknown key")
    location = _location(table.get("location", ""), f"{key}.location")
    prefix = _location(table.get("prefix", ""), f"{key}.prefix") or location
    if not prefix:
        raise _ConfError(f"{key}: both location and prefix are unset")
    if prefix.startswith("*."):
        if any(c in prefix for c in "/@:"):
            raise _ConfError(f"{key}.prefix: {prefix!r}: a wildcard prefix must be *.domain only")
    elif not location:
        raise _ConfError(f"{key}.location: unset and prefix is not of the form *.example.com")
    elif not _valid_location(prefix):
        raise _ConfError(f"{key}.prefix: {prefix!r} is not host[:port][/namespace...]")
    if location and not _valid_location(location):
        raise _ConfError(f"{key}.location: {location!r} is not host[:port][/namespace...]")
    digest_only = _bool(table, "mirror-by-digest-only", key)
    mirrors_doc = table.get("mirror", [])
    if not isinstance(mirrors_doc, list):
        raise _ConfError(f"{key}.mirror: expected an array of tables ([[registry.mirror]])")
    mirrors = []
    for j, mdoc in enumerate(mirrors_doc):
        mkey = f"{key}.mirror[{j}]"
        if not isinstance(mdoc, dict):
            raise _ConfError(f"{mkey}: expected a table")
        unknown = sorted(set(mdoc) - _MIRROR_KEYS)
        if unknown:
            raise _ConfError(f"{mkey}.{unknown[0]}: unknown key")
        mloc = _location(mdoc.get("location", ""), f"{mkey}.location")
        if not mloc:
            raise _ConfError(f"{mkey}.location: unset")
        if not _valid_location(mloc):
            raise _ConfError(f"{mkey}.location: {mloc!r} is not host[:port][/namespace...]")
        pfm = mdoc.get("pull-from-mirror", "")
        if pfm not in ("", *PULL_FROM_MIRROR):
            raise _ConfError(
                f"{mkey}.pull-from-mirror: {pfm!r} is not one of {', '.join(PULL_FROM_MIRROR)}"
            )
        if pfm and digest_only:
            raise _ConfError(
                f"{mkey}.pull-from-mirror: cannot be combined with mirror-by-digest-only"
            )
        mirrors.append(Mirror(mloc, _bool(mdoc, "insecure", mkey), pfm or "all"))
    return RegistryConfig(
        prefix=prefix,
        location=location,
        mirrors=tuple(mirrors),
        insecure=_bool(table, "insecure", key),
        blocked=_bool(table, "blocked", key),
        mirror_by_digest_only=digest_only,
    )


def _valid_location(location: str) -> bool:
    """``host[:port]`` or ``host[:port]/namespace...`` (no tag, no digest)."""
    if "/" not in location:
        return is_domain(location)
    if "@" in location or ":" in location.rsplit("/", 1)[1]:
        return False
    try:
        Reference.parse(location)
    except UsageError:
        return False
    return has_explicit_domain(location)


def _string_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _ConfError(f"{key}: expected an array of strings")
    return tuple(value)


@dataclass(frozen=True)
class RegistriesConf:
    """The parsed configuration; ``RegistriesConf()`` is the empty one (Docker defaults)."""

    registries: tuple[RegistryConfig, ...] = ()
    unqualified_search_registries: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    certs_dirs: tuple[str, ...] | None = None  # None: from the environment at lookup time

    @classmethod
    def parse(cls, text: str, source: str = "registries.conf") -> RegistriesConf:
        """Parse one document; raises :class:`UsageError` naming ``source`` and the key."""
        return cls()._merged(_parse_doc(text, source), source)

    def _merged(self, doc: _Doc, source: str) -> RegistriesConf:
        regs = {r.prefix: r for r in self.registries}
        for reg in doc.registries:
            regs[reg.prefix] = reg  # a later file overrides the same prefix
        search = doc.unqualified_search
        aliases = dict(self.aliases)
        aliases.update(doc.aliases)
        return RegistriesConf(
            registries=tuple(regs.values()),
            unqualified_search_registries=(
                search if search is not None else self.unqualified_search_registries
            ),
            aliases=aliases,
            sources=(*self.sources, source),
            certs_dirs=self.certs_dirs,
        )

    def find(self, text: str) -> RegistryConfig | None:
        """The ``[[registry]]`` whose prefix matches ``text`` (a normalized reference string,
        repository or host) longest; first one wins among equal lengths."""
        best: RegistryConfig | None = None
        best_len = -1
        for reg in self.registries:
            n = _match_prefix(text, reg.prefix)
            if n > best_len:
                best, best_len = reg, n
        return best

    def _tls(self, host: str) -> TLSFiles:
        dirs = None if self.certs_dirs is None else tuple(Path(d) for d in self.certs_dirs)
        return tls_files(host, dirs)

    def endpoint_for(
        self, ref: Reference, *, mirror: bool = False, insecure: bool = False
    ) -> Endpoint:
        """An endpoint for ``ref`` as it is (no rewriting); ``insecure`` is OR-ed with the
        ``insecure`` of any ``[[registry]]`` matching its host."""
        reg = self.find(ref.domain)  # only host-wide entries ("host" or "*.domain") match
        insecure = insecure or (reg is not None and reg.insecure)
        return Endpoint(ref.domain, ref, insecure, mirror, self._tls(ref.domain))

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """Mirrors in order (as allowed for this reference), then the registry itself.

        Raises :class:`UsageError` if the matching registry is ``blocked``."""
        reg = self.find(str(ref))
        if reg is None:
            return [self.endpoint_for(ref)]
        if reg.blocked:
            raise UsageError(
                f"{ref}: registry {reg.prefix} is blocked in registries.conf",
                f"remove 'blocked = true' for {reg.prefix} in "
                f"{', '.join(self.sources) or 'registries.conf'} or use another registry",
            )
        digested = ref.digest is not None
        out: list[Endpoint] = []
        if not reg.mirror_by_digest_only or digested:
            for m in reg.mirrors:
                if (m.pull_from_mirror == "digest-only" and not digested) or (
                    m.pull_from_mirror == "tag-only" and digested
                ):
                    continue
                rewritten = _rewrite(ref, reg.prefix, m.location)
                out.append(self.endpoint_for(rewritten, mirror=True, insecure=m.insecure))
        rewritten = _rewrite(ref, reg.prefix, reg.location)
        tls = self._tls(rewritten.domain)
        out.append(Endpoint(rewritten.domain, rewritten, reg.insecure, False, tls))
        return out

    def unqualified_search(self, text: str) -> list[Reference]:
        """The references to try, in order, for what the user typed.

        A reference naming its registry gives itself. A short name gives its ``[aliases]``
        entry if there is one, else one candidate per ``unqualified-search-registries`` entry,
        else Docker's normalization (``docker.io/library/NAME``). Invalid text raises
        :class:`UsageError`."""
        ref = Reference.parse(text)
        if has_explicit_domain(text):
            return [ref]
        name, suffix = _split_suffix(text)
        alias = self.aliases.get(name)
        if alias is not None:
            return [Reference.parse(alias + suffix)]
        if not self.unqualified_search_registries:
            return [ref]
        return [Reference.qualify(text, reg) for reg in self.unqualified_search_registries]


def _split_suffix(text: str) -> tuple[str, str]:
    """Split a short name into (name, ':tag@digest' suffix)."""
    name, at, digest = text.partition("@")
    suffix = at + digest
    if ":" in name:
        name, tag = name.split(":", 1)
        suffix = ":" + tag + suffix
    return name, suffix


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    if not location:
        return ref
    text = str(ref)
    n = _match_prefix(text, prefix)
    if n < 0:  # pragma: no cover - find() matched it
        raise UsageError(f"{ref}: prefix {prefix!r} does not match", "check registries.conf")
    try:
        return Reference.parse(location + text[n:])
    except UsageError as exc:
        raise UsageError(
            f"{ref}: rewriting with registries.conf location {location!r} gives an invalid "
            f"reference: {exc.message}",
            "fix the prefix/location in registries.conf",
        ) from exc


@dataclass
class _Doc:
    registries: list[RegistryConfig]
    unqualified_search: tuple[str, ...] | None
    aliases: dict[str, str]


def _parse_doc(text: str, source: str) -> _Doc:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(
            f"registries.conf {source}: not valid TOML: {exc}",
            "see containers-registries.conf(5) for the format",
        ) from exc
    try:
        return _interpret(doc)
    except _ConfError as exc:
        raise UsageError(
            f"registries.conf {source}: {exc}", "see containers-registries.conf(5) for the format"
        ) from None


def _interpret(doc: dict[str, Any]) -> _Doc:
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise _ConfError(f"{unknown[0]}: unknown key")
    regs: list[RegistryConfig] = []
    search: tuple[str, ...] | None = None
    v1 = doc.get("registries")
    if v1 is not None:
        if "registry" in doc or "unqualified-search-registries" in doc:
            raise _ConfError("registries: mixing the v1 [registries.*] tables with v2 keys")
        if not isinstance(v1, dict):
            raise _ConfError("registries: expected a table")
        by_loc: dict[str, dict[str, bool]] = {}
        for kind in ("block", "insecure"):
            table = v1.get(kind, {})
            if not isinstance(table, dict):
                raise _ConfError(f"registries.{kind}: expected a table")
            for loc in _string_list(table.get("registries", []), f"registries.{kind}.registries"):
                loc = _location(loc, f"registries.{kind}.registries")
                by_loc.setdefault(loc, {})[kind] = True
        for loc, flags in by_loc.items():
            regs.append(
                RegistryConfig(
                    loc, loc, (), flags.get("insecure", False), flags.get("block", False)
                )
            )
        stable = v1.get("search", {})
        if not isinstance(stable, dict):
            raise _ConfError("registries.search: expected a table")
        if "registries" in stable:
            search = _string_list(stable["registries"], "registries.search.registries")
    entries = doc.get("registry", [])
    if not isinstance(entries, list):
        raise _ConfError("registry: expected an array of tables ([[registry]])")
    for i, table in enumerate(entries):
        regs.append(_parse_registry(table, f"registry[{i}]"))
    seen: dict[str, RegistryConfig] = {}
    for reg in regs:
        other = seen.get(reg.location or reg.prefix)
        if other is not None and (other.insecure, other.blocked) != (reg.insecure, reg.blocked):
            raise _ConfError(
                f"registry {reg.location or reg.prefix!r} is defined twice with conflicting "
                "insecure/blocked settings"
            )
        seen[reg.location or reg.prefix] = reg
    if "unqualified-search-registries" in doc:
        search = _string_list(doc["unqualified-search-registries"], "unqualified-search-registries")
    if search is not None:
        cleaned = []
        for i, s in enumerate(search):
            s = s.rstrip("/")
            if not is_domain(s):
                raise _ConfError(f"unqualified-search-registries[{i}]: {s!r} is not host[:port]")
            cleaned.append(s)
        search = tuple(cleaned)
    mode = doc.get("short-name-mode", "")
    if mode not in ("", "enforcing", "permissive", "disabled"):
        raise _ConfError(f"short-name-mode: {mode!r} is not enforcing, permissive or disabled")
    aliases_doc = doc.get("aliases", {})
    if not isinstance(aliases_doc, dict):
        raise _ConfError("aliases: expected a table")
    aliases: dict[str, str] = {}
    for name, value in aliases_doc.items():
        if not isinstance(value, str):
            raise _ConfError(f"aliases.{name}: expected a string")
        if has_explicit_domain(name) or not has_explicit_domain(value):
            raise _ConfError(
                f"aliases.{name}: the key must be a short name and the value a fully "
                "qualified repository"
            )
        try:
            Reference.parse(value)
        except UsageError as exc:
            raise _ConfError(f"aliases.{name}: {exc.message}") from None
        aliases[name] = value
    return _Doc(regs, search, aliases)


def insecure_hint(host: str, env: Mapping[str, str] | None = None) -> str:
    """How to mark ``host`` insecure (plain http or an unverified certificate), as one line:
    the entry to add and the file to add it to — ``$REGISTRIES_CONFIG_PATH`` when set (the only
    file read then), else a drop-in in the registries.conf.d directory :func:`load` reads."""
    env = os.environ if env is None else env
    if env.get("REGISTRIES_CONFIG_PATH"):
        where = env["REGISTRIES_CONFIG_PATH"]
    else:
        conf_d = env.get("BOOTSTRAP_REGISTRIES_CONF_D") or str(SYSTEM_REGISTRIES_CONF_D)
        where = f"{conf_d}/{host.replace(':', '-')}.conf"
    return f'add [[registry]] location = "{host}" insecure = true to {where}'


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    system_file: Path = SYSTEM_REGISTRIES_CONF,
    system_dir: Path | None = None,
) -> RegistriesConf:
    """Load the configuration (see the module docstring for where from). A file that is given
    explicitly (argument or ``$REGISTRIES_CONFIG_PATH``) must exist and is the only one read;
    otherwise ``system_file`` (if present) and then ``system_dir/*.conf`` in name order
    (``system_dir`` default: ``$BOOTSTRAP_REGISTRIES_CONF_D``, else
    /etc/containers/registries.conf.d)."""
    env = os.environ if env is None else env
    if system_dir is None:
        system_dir = Path(env.get("BOOTSTRAP_REGISTRIES_CONF_D") or SYSTEM_REGISTRIES_CONF_D)
    explicit = path
    if explicit is None and env.get("REGISTRIES_CONFIG_PATH"):
        explicit = Path(env["REGISTRIES_CONFIG_PATH"])
    files: list[Path] = []
    if explicit is not None:
        files.append(explicit)
    else:
        if system_file.exists():
            files.append(system_file)
        if system_dir.is_dir():
            files.extend(sorted(system_dir.glob("*.conf")))
    conf = RegistriesConf()
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"registries.conf {f}: cannot read: {exc.strerror}",
                "check the path ($REGISTRIES_CONFIG_PATH) and its permissions",
            ) from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"registries.conf {f}: not UTF-8 text", "fix the file") from exc
        conf = conf._merged(_parse_doc(text, str(f)), str(f))
    return conf
