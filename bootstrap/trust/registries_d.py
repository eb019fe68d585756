"""registries.d(5): where an image's signatures are.

Every ``*.yaml`` file of the directory is read (in name order); a ``docker:`` scope or
``default-docker`` defined twice is an error, as in containers/image. For an image, each setting
(``lookaside``, with the older ``sigstore`` spelling as fallback, and
``use-sigstore-attachments``) comes from the most specific ``docker:`` scope that sets it (the
same scope order as the policy: full reference, repository, namespaces, host, wildcard hosts),
else from ``default-docker``; with no lookaside configured at all the built-in
``file:///var/lib/containers/sigstore`` is used. Simple signatures live at
``<lookaside>/<repository path>@<algo>=<hex>/signature-N``, N = 1, 2, ... until one is missing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from bootstrap.errors import RegistryError, UsageError
from bootstrap.image.reference import Reference
from bootstrap.trust.policy import docker_scopes

DEFAULT_LOOKASIDE = "file:///var/lib/containers/sigstore"
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024
MAX_SIGNATURES = 128
MAX_CONFIG_BYTES = 1024 * 1024
_KEYS = {
    "lookaside",
    "lookaside-staging",
    "sigstore",
    "sigstore-staging",
    "use-sigstore-attachments",
}
_HINT = "see registries.d(5)"


@dataclass(frozen=True)
class SignatureSources:
    """Where to look for one image's signatures: ``lookaside`` base URL (file:// or http(s)://)
    and whether sigstore attachments (``sha256-<hex>.sig`` tags) are read."""

    lookaside: str
    use_sigstore_attachments: bool


@dataclass(frozen=True)
class RegistriesD:
    """The merged registries.d configuration: ``default`` and per-scope settings."""

    default: Mapping[str, Any]
    docker: Mapping[str, Mapping[str, Any]]

    def sources_for(self, reference: Reference) -> SignatureSources:
        """The signature sources for ``reference`` (see the module docstring)."""
        look = self._setting(reference, "lookaside") or self._setting(reference, "sigstore")
        attach = self._setting(reference, "use-sigstore-attachments")
        return SignatureSources(str(look or DEFAULT_LOOKASIDE), bool(attach))

    def _setting(self, reference: Reference, key: str) -> Any:
        for scope in docker_scopes(reference):
            value = self.docker.get(scope, {}).get(key)
            if value not in (None, ""):
                return value
        value = self.default.get(key)
        return None if value == "" else value


def load_registries_d(directory: Path) -> RegistriesD:
    """Read every ``*.yaml`` in ``directory`` (a missing directory is an empty configuration).
    Malformed YAML, unknown keys or duplicate scopes: :class:`UsageError` naming the file."""
    default: dict[str, Any] = {}
    docker: dict[str, dict[str, Any]] = {}
    default_from = ""
    try:
        files = sorted(p for p in directory.iterdir() if p.name.endswith(".yaml"))
    except FileNotFoundError:
        return RegistriesD({}, {})
    except OSError as exc:
        raise UsageError(f"cannot read {directory}: {exc.strerror or exc}", _HINT) from exc
    if files:
        import yaml  # only with a registries.d file: most commands never read one
    for path in files:
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
            doc = yaml.safe_load(raw) if len(raw) <= MAX_CONFIG_BYTES else None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(
                f"registries.d file {path}: {' '.join(str(exc).split())}", _HINT
            ) from exc
        file_default, scopes = parse_registries_d_doc(doc, path)
        if file_default is not None:
            if default_from:
                raise UsageError(
                    f"registries.d file {path}: default-docker is also defined in {default_from}",
                    _HINT,
                )
            default = file_default
            default_from = str(path)
        for scope, ns in scopes.items():
            if scope in docker:
                raise UsageError(
                    f"registries.d file {path}: docker scope {scope!r} is defined twice", _HINT
                )
            docker[scope] = ns
    return RegistriesD(default, docker)


def parse_registries_d_doc(
    doc: Any, path: Path
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """Validate one registries.d document: its ``default-docker`` (None when absent) and its
    ``docker`` scopes. Unknown keys: :class:`UsageError` naming ``path``."""
    if doc is None:
        return None, {}
    if not isinstance(doc, dict) or set(doc) - {"default-docker", "docker"}:
        raise UsageError(
            f"registries.d file {path}: expected only 'default-docker' and 'docker'", _HINT
        )
    default = None
    if doc.get("default-docker") is not None:
        default = _namespace(doc["default-docker"], path, "default-docker")
    scopes = doc.get("docker") or {}
    if not isinstance(scopes, dict):
        raise UsageError(f"registries.d file {path}: 'docker' must be a mapping", _HINT)
    return default, {str(k): _namespace(v, path, f"docker[{k!r}]") for k, v in scopes.items()}


def _namespace(value: Any, path: Path, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"registries.d file {path}: {where} must be a mapping", _HINT)
    for key in value:
        if key not in _KEYS:
            raise UsageError(f"registries.d file {path}: {where}: unknown key {key!r}", _HINT)
    return dict(value)


def lookaside_signatures(
    base: str, reference: Reference, digest: str, session: requests.Session
) -> Iterator[bytes]:
    """Yield each simple signature of manifest ``digest`` from the lookaside ``base``:
    ``signature-1``, ``-2``, ... until one is missing (404 or no such file). Other failures:
    :class:`RegistryError` (exit 3)."""
    algo, _, hexpart = digest.partition(":")
    parts = urlsplit(base)
    for n in range(1, MAX_SIGNATURES + 1):
        rel = f"/{reference.path}@{algo}={hexpart}/signature-{n}"
        if parts.scheme == "file":
            path = Path(unquote(parts.path.rstrip("/") + rel))
            try:
                with path.open("rb") as f:
                    data = f.read(MAX_SIGNATURE_BYTES + 1)
            except FileNotFoundError:
                return
            except OSError as exc:
                raise RegistryError(
                    f"cannot read signature {path}: {exc.strerror or exc}", _HINT
                ) from exc
        elif parts.scheme in ("http", "https"):
            url = base.rstrip("/") + rel
            try:
                resp = session.get(url, stream=True)
                with resp:
                    if resp.status_code == 404:
                        return
                    if resp.status_code != 200:
                        raise RegistryError(
                            f"signature {url}: HTTP {resp.status_code}",
                            "check the lookaside server",
                        )
                    data = resp.raw.read(MAX_SIGNATURE_BYTES + 1, decode_content=True)
            except requests.RequestException as exc:
                raise RegistryError(
                    f"signature {url}: {' '.join(str(exc).split())}", "check the lookaside server"
                ) from exc
        else:
            raise UsageError(f"lookaside {base!r}: only file://, http:// and https://", _HINT)
        if len(data) > MAX_SIGNATURE_BYTES:
            raise RegistryError(f"signature-{n} of {reference.repository} is over 4 MiB", _HINT)
        yield data
