"""Registry credentials and the parts of registry authentication that are not HTTP.

Credentials (containers-auth.json(5) and Docker's config.json), searched in this order; for each
registry the first file with a matching entry wins, and within a file the most specific key
(``host/ns/repo``, then ``host/ns``, then ``host``)::

    $REGISTRY_AUTH_FILE
    $XDG_RUNTIME_DIR/containers/auth.json   (else /run/containers/$UID/auth.json)
    ${XDG_CONFIG_HOME:-~/.config}/containers/auth.json
    /etc/containers/auth.json               ($BOOTSTRAP_AUTH_FILE when set; `up` copies a node
                                             manifest's credentials there)
    ${DOCKER_CONFIG:-~/.docker}/config.json
    ~/.dockercfg                             (legacy format)

Entries are ``{"auths": {KEY: {"auth": base64("user:password")}}}`` (``username``/``password``
and ``identitytoken`` fields are accepted too). Keys may carry ``https://`` and a path (Docker's
``https://index.docker.io/v1/``); ``docker.io`` and ``registry-1.docker.io`` mean
``index.docker.io``. Docker credential helpers (``credHelpers``/``credsStore``) are run as
``docker-credential-NAME get``. A malformed file raises :class:`UsageError` naming the file.

``parse_www_authenticate`` parses RFC 7235 challenges (several per header, as requests joins
repeated headers with commas); :class:`TokenCache` holds bearer tokens per (realm, service,
scope) until ``expires_in`` (at least 60 s, as containers/image) runs out.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootstrap.errors import BootstrapError, RegistryError, UsageError

log = logging.getLogger(__name__)

MIN_TOKEN_LIFETIME = 60.0
MAX_AUTH_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AuthEntry:
    """One credential: a username and password, or an identity (refresh) token."""

    username: str
    password: str
    source: str
    identity_token: str = ""


def _normalize_host(host: str) -> str:
    if host in ("docker.io", "registry-1.docker.io"):
        return "index.docker.io"
    return host


def normalize_key(key: str, legacy: bool = False) -> str:
    """Normalize an auth file key as containers/image ``normalizeAuthFileKey`` does."""
    stripped = key
    for scheme in ("http://", "https://"):
        if stripped.startswith(scheme):
            stripped = stripped[len(scheme) :]
    if legacy or stripped != key:
        stripped = stripped.split("/", 1)[0]
    host, slash, rest = stripped.partition("/")
    return _normalize_host(host) + slash + rest


def _decode_entry(entry: object, where: str, source: str) -> AuthEntry | None:
    if not isinstance(entry, dict):
        raise UsageError(f"auth file {source}: {where}: not an object", _AUTH_HINT)
    identity = entry.get("identitytoken") or ""
    if not isinstance(identity, str):
        raise UsageError(f"auth file {source}: {where}.identitytoken: not a string", _AUTH_HINT)
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise UsageError(f"auth file {source}: {where}.auth: not a string", _AUTH_HINT)
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise UsageError(
                f"auth file {source}: {where}.auth: not base64 of user:password", _AUTH_HINT
            ) from None
        user, colon, password = decoded.partition(":")
        if not colon:
            raise UsageError(
                f"auth file {source}: {where}.auth: decodes to no user:password pair", _AUTH_HINT
            )
        return AuthEntry(user, password, source, identity)
    user = entry.get("username") or ""
    password = entry.get("password") or ""
    if not isinstance(user, str) or not isinstance(password, str):
        raise UsageError(f"auth file {source}: {where}: username/password not strings", _AUTH_HINT)
    if user or password or identity:
        return AuthEntry(user, password, source, identity)
    return None


_AUTH_HINT = 'expected {"auths": {"HOST[:PORT]": {"auth": "BASE64(user:password)"}}}'


@dataclass(frozen=True)
class AuthFile:
    """One parsed auth file: normalized key -> entry, plus credential helper names."""

    path: str
    entries: Mapping[str, AuthEntry] = field(default_factory=dict)
    cred_helpers: Mapping[str, str] = field(default_factory=dict)
    creds_store: str = ""

    @classmethod
    def parse(cls, data: bytes, path: str, legacy: bool = False) -> AuthFile:
        """Parse a file's bytes; raises :class:`UsageError` naming ``path``."""
        try:
            doc = json.loads(data.decode("utf-8")) if data.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"auth file {path}: not valid JSON: {exc}", _AUTH_HINT) from None
        if not isinstance(doc, dict):
            raise UsageError(f"auth file {path}: not a JSON object", _AUTH_HINT)
        auths: Any = doc if legacy else doc.get("auths", {})
        if not isinstance(auths, dict):
            raise UsageError(f"auth file {path}: auths: not an object", _AUTH_HINT)
        entries: dict[str, AuthEntry] = {}
        for key, entry in auths.items():
            decoded = _decode_entry(entry, f"auths.{key}", path)
            if decoded is not None:
                entries[normalize_key(key, legacy)] = decoded
        helpers = doc.get("credHelpers", {}) if not legacy else {}
        if not isinstance(helpers, dict) or not all(isinstance(v, str) for v in helpers.values()):
            raise UsageError(f"auth file {path}: credHelpers: not a string map", _AUTH_HINT)
        store = doc.get("credsStore", "") if not legacy else ""
        if not isinstance(store, str):
            raise UsageError(f"auth file {path}: credsStore: not a string", _AUTH_HINT)
        return cls(
            path,
            entries,
            {normalize_key(k): v for k, v in helpers.items()},
            store,
        )

    def lookup(self, host: str, repository: str | None) -> AuthEntry | None:
        """The most specific entry for ``host`` and ``repository`` (the path in that host)."""
        host = _normalize_host(host)
        keys: list[str] = []
        if repository:
            parts = repository.split("/")
            keys = [host + "/" + "/".join(parts[:n]) for n in range(len(parts), 0, -1)]
        keys.append(host)
        for key in keys:
            if key in self.entries:
                return self.entries[key]
        return None


def default_auth_paths(env: Mapping[str, str] | None = None) -> list[tuple[Path, bool]]:
    """The auth files searched, in order, as (path, legacy_format)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    out: list[tuple[Path, bool]] = []
    if env.get("REGISTRY_AUTH_FILE"):
        out.append((Path(env["REGISTRY_AUTH_FILE"]), False))
    elif env.get("XDG_RUNTIME_DIR"):
        out.append((Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", False))
    else:
        out.append((Path(f"/run/containers/{os.getuid()}/auth.json"), False))
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    out.append((config_home / "containers" / "auth.json", False))
    out.append((Path(env.get("BOOTSTRAP_AUTH_FILE") or "/etc/containers/auth.json"), False))
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    out.append((docker_dir / "config.json", False))
    out.append((home / ".dockercfg", True))
    return out


class Credentials:
    """Credentials from a list of auth files (earlier files win)."""

    def __init__(self, files: Sequence[AuthFile] = ()) -> None:
        self.files = tuple(files)

    @classmethod
    def empty(cls) -> Credentials:
        return cls(())

    @classmethod
    def from_entries(cls, entries: Mapping[str, tuple[str, str]]) -> Credentials:
        """Credentials from ``{host_or_prefix: (user, password)}`` (tests, ``--creds``)."""
        return cls(
            [
                AuthFile(
                    "<given>",
                    {normalize_key(k): AuthEntry(u, p, "<given>") for k, (u, p) in entries.items()},
                )
            ]
        )

    def entry_for(self, host: str, repository: str | None = None) -> AuthEntry | None:
        """The credential for ``host`` (``host[:port]`` as in the reference) and optionally
        ``repository`` (its path in that host, e.g. ``library/busybox``; a ``host/`` prefix is
        accepted and dropped). Credential helpers are consulted where a file names one."""
        if repository and repository.startswith(host + "/"):
            repository = repository[len(host) + 1 :]
        for f in self.files:
            entry = f.lookup(host, repository)
            if entry is not None:
                return entry
            helper = f.cred_helpers.get(_normalize_host(host)) or f.creds_store
            if helper:
                found = _run_helper(helper, host, f.path)
                if found is not None:
                    return found
        return None

    def for_host(self, host: str, repository: str | None = None) -> tuple[str, str] | None:
        """``(username, password)`` for ``host`` (see :meth:`entry_for`) or None."""
        entry = self.entry_for(host, repository)
        if entry is None or (not entry.username and not entry.password):
            return None
        return entry.username, entry.password


def _run_helper(helper: str, host: str, source: str) -> AuthEntry | None:
    from bootstrap.process import run

    argv = [f"docker-credential-{helper}", "get"]
    try:
        proc = run(
            argv,
            error=RegistryError,
            hint=f"the credential helper is named in {source}",
            input=host.encode(),
            check=False,
            timeout=30,
        )
    except BootstrapError as exc:  # helper missing or hung: carry on without credentials
        log.debug("credential helper for %s skipped: %s", host, exc.message)
        return None
    if proc.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        doc = json.loads(proc.stdout)
        user, secret = str(doc.get("Username", "")), str(doc.get("Secret", ""))
    except (ValueError, AttributeError):
        raise UsageError(
            f"credential helper docker-credential-{helper}: output is not JSON",
            f"the helper is named in {source}",
        ) from None
    if user == "<token>":
        return AuthEntry("", "", f"docker-credential-{helper}", secret)
    return AuthEntry(user, secret, f"docker-credential-{helper}")


def load_credentials(
    paths: Sequence[Path | tuple[Path, bool]] | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials:
    """Read the auth files (``paths``, else :func:`default_auth_paths`); missing files are
    skipped; a file that cannot be read or parsed raises :class:`UsageError` naming it."""
    items = default_auth_paths(env) if paths is None else paths
    files: list[AuthFile] = []
    for item in items:
        path, legacy = item if isinstance(item, tuple) else (item, False)
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_AUTH_FILE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise UsageError(
                f"auth file {path}: cannot read: {exc.strerror}", "check its permissions"
            ) from exc
        if len(data) > MAX_AUTH_FILE_BYTES:
            raise UsageError(f"auth file {path}: larger than 1 MiB", "is this an auth file?")
        files.append(AuthFile.parse(data, str(path), legacy))
    return Credentials(files)


# --- WWW-Authenticate ---------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    """One auth challenge: ``scheme`` lower-cased (``bearer``, ``basic``), params with
    lower-cased names."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)


_SEPARATORS = set(' \t"(),/:;<=>?@[]\\{}')


def _is_token_char(c: str) -> bool:
    return 32 < ord(c) < 127 and c not in _SEPARATORS


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse one or more challenges (``Bearer realm="..",service="..", Basic realm=".."``).
    Malformed parts end parsing; what was parsed before is returned."""
    out: list[Challenge] = []
    s = header
    i = 0
    n = len(s)

    def skip_ws(j: int) -> int:
        while j < n and s[j] in " \t\r\n":
            j += 1
        return j

    def token(j: int) -> tuple[str, int]:
        k = j
        while k < n and (_is_token_char(s[k]) or s[k] == "/"):  # token68 may hold '/'
            k += 1
        return s[j:k], k

    def quoted(j: int) -> tuple[str | None, int]:
        # s[j] == '"'
        buf: list[str] = []
        k = j + 1
        while k < n:
            c = s[k]
            if c == "\\" and k + 1 < n:
                buf.append(s[k + 1])
                k += 2
                continue
            if c == '"':
                return "".join(buf), k + 1
            buf.append(c)
            k += 1
        return None, k

    while True:
        i = skip_ws(i)
        while i < n and s[i] == ",":
            i = skip_ws(i + 1)
        if i >= n:
            break
        scheme, i = token(i)
        if not scheme:
            break
        params: dict[str, str] = {}
        out.append(Challenge(scheme.lower(), params))
        i = skip_ws(i)
        # auth-params: name=value pairs separated by commas, until the next scheme
        while i < n:
            j = skip_ws(i)
            while j < n and s[j] == ",":
                j = skip_ws(j + 1)
            name, k = token(j)
            if not name:
                i = j
                break
            k2 = skip_ws(k)
            if k2 >= n or s[k2] != "=":
                i = j  # a new challenge starts at `name`
                break
            k2 = skip_ws(k2 + 1)
            value: str | None
            if k2 < n and s[k2] == '"':
                value, k2 = quoted(k2)
                if value is None:
                    return out
            else:
                # unquoted: a token, leniently up to the next comma or blank (servers that
                # leave URLs unquoted: realm=https://auth.example/token)
                k3 = k2
                while k3 < n and s[k3] not in ", \t\r\n":
                    k3 += 1
                value, k2 = s[k2:k3], k3
            params[name.lower()] = value
            i = skip_ws(k2)
            if i < n and s[i] != ",":
                return out
    return out


# --- bearer tokens -------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    value: str
    expires: float  # time.monotonic() deadline


def token_from_response(doc: object, now: float | None = None) -> Token:
    """Build a :class:`Token` from a token server's JSON (``token`` or ``access_token``,
    ``expires_in``); raises :class:`RegistryError` if there is no token."""
    if not isinstance(doc, dict):
        raise RegistryError("token server answer is not a JSON object", "is the realm right?")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise RegistryError("token server answer has no token", "is the realm right?")
    expires_in = doc.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, int | float) else MIN_TOKEN_LIFETIME
    lifetime = max(lifetime, MIN_TOKEN_LIFETIME)
    now = time.monotonic() if now is None else now
    return Token(value, now + lifetime)


class TokenCache:
    """Bearer tokens keyed by (realm, service, scope, account); thread-safe. A token is used
    until shortly (5 s) before it expires."""

    MARGIN = 5.0

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str, str], Token] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str, str]) -> str | None:
        with self._lock:
            tok = self._tokens.get(key)
            if tok is None:
                return None
            if time.monotonic() + self.MARGIN >= tok.expires:
                del self._tokens[key]
                return None
            return tok.value

    def put(self, key: tuple[str, str, str, str], token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, key: tuple[str, str, str, str], value: str | None = None) -> None:
        """Forget the token for ``key`` (only if it is still ``value``, when given)."""
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and (value is None or tok.value == value):
                del self._tokens[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)
