"""System-container definitions: loading them and substituting their variables.

A definition is a directory (``--definition DIR``, an image's ``/exports``) holding:

- ``manifest.json`` — ``{"defaultValues": {"VAR": "value", ...}}`` plus optional keys
  ``"readiness": "notify"|"none"`` (the default unit uses ``Type=notify``),
  ``"stopTimeout": N`` (seconds between TERM and KILL when stopping; default 5),
  ``"startTimeout": N`` (seconds the unit may take to start, i.e. to send READY=1 for
  ``notify``; default 60), ``"init": "auto"|"always"|"never"`` (run an init as the
  container's pid 1; default ``auto``), ``"initNames": ["name", ...]`` (more executable
  names that ``auto`` treats as an init already),
  ``"autoUpdate": "registry"|"local"|"off"`` (the container's default auto-update policy),
  ``"health": {"exec": [argv...] | "http": URL, "interval": S, "timeout": S, "retries": N,
  "start_period": S}`` (a check run inside the container, or a URL fetched from the host; see
  :class:`HealthCheck`) and
  ``"type": "service"|"oneshot"`` (default ``service``: a long-running container; ``oneshot``:
  its command runs once at start, e.g. a self-check of files it puts on the host, and the unit
  stays active once it succeeded; no ``"readiness": "notify"``, no ``health`` then);
- ``config.json.template`` — an OCI runtime config (or a part of one) merged over the config
  generated from the image (see :mod:`bootstrap.runtime.config`);
- ``service.template`` — the systemd unit;
- ``tmpfiles.template`` — tmpfiles.d lines for host paths the container needs.

Every file is optional; a missing one falls back to the built-in behaviour (no defaults, the
generated config, the generated unit, no tmpfiles). The built-in definition is an empty one.

Substitution follows :class:`string.Template`: ``$VAR`` and ``${VAR}``, ``$$`` for a literal
``$``. A placeholder naming no known variable, or a ``$`` followed by anything else, is a
:class:`UsageError` naming the file and line — never an empty string. Values are escaped for the
file they land in: JSON string escapes in ``config.json.template``; in the unit and tmpfiles
files they may hold no control characters (so no newline can start a new directive), may not end
in a backslash (a line continuation), and ``%`` is doubled (systemd specifiers); on a unit's
``Exec*=`` command line a value is one argv word (see :func:`unit_escaper`).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from bootstrap.errors import UsageError
from bootstrap.runtime.health import HealthCheck
from bootstrap.systemd import units

MANIFEST = "manifest.json"
CONFIG_TEMPLATE = "config.json.template"
SERVICE_TEMPLATE = "service.template"
TMPFILES_TEMPLATE = "tmpfiles.template"
FILES = (MANIFEST, CONFIG_TEMPLATE, SERVICE_TEMPLATE, TMPFILES_TEMPLATE)

#: Largest definition file accepted (they are small text files; an image could ship anything).
MAX_FILE_SIZE = 1 << 20

VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

READINESS = ("none", "notify")
UNIT_TYPES = ("service", "oneshot")
DEFAULT_STOP_TIMEOUT = 5
AUTO_UPDATE_POLICIES = ("registry", "local", "off")
HEALTH_KEYS = ("exec", "http", "interval", "timeout", "retries", "start_period")
IMAGE_IMPORT_KEYS = ("exec", "timeout")
DEFAULT_IMPORT_TIMEOUT = 600.0
DEFAULT_START_TIMEOUT = 60
INIT_MODES = ("auto", "always", "never")
DEFAULT_INIT = "auto"


#: Prepares a value for its file: ``(value, variable, line number, text of the line before it)``.
Escaper = Callable[[str, str, int, str], str]

#: A unit line holding a command line (systemd.service(5) ``ExecStart=`` and friends).
_EXEC_KEY = re.compile(r"\s*Exec[A-Za-z]*\s*=")


def _logical_line_before(text: str, pos: int) -> str:
    """The text from the start of ``pos``'s logical line (a line ending in a backslash
    continues on the next) up to ``pos``."""
    start = text.rfind("\n", 0, pos) + 1
    while start > 0 and text[: start - 1].endswith("\\"):
        start = text.rfind("\n", 0, start - 1) + 1
    return text[start:pos]


def _quote_state(command: str) -> str | None:
    """The quote (``'`` or ``"``) open at the end of the command line text ``command``, or
    None (systemd.syntax(7): quotes may start anywhere in a word; backslash escapes)."""
    quote: str | None = None
    escaped = False
    for ch in command:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
    return quote


@dataclass(frozen=True)
class TemplateFile:
    """One template: ``where`` names it in errors (a path, or ``image:/exports/...``)."""

    where: str
    text: str

    def placeholders(self) -> list[tuple[str, int]]:
        """Every placeholder as (variable name, line number), in order of appearance.

        Raises :class:`UsageError` naming the file and line for a ``$`` that starts no valid
        placeholder (``$$`` is a literal ``$``)."""
        found: list[tuple[str, int]] = []
        for m in string.Template.pattern.finditer(self.text):
            line = self.text.count("\n", 0, m.start()) + 1
            if m.group("invalid") is not None:
                raise UsageError(
                    f"{self.where}:{line}: '$' starts no variable",
                    "write $VAR or ${VAR}; a literal dollar sign is $$",
                )
            name = m.group("named") or m.group("braced")
            if name is not None:
                found.append((name, line))
        return found

    def render(self, values: Mapping[str, str], escape: Escaper) -> str:
        """Substitute ``values`` into the text; ``escape(value, variable, line, before)``
        prepares each value for this file's syntax (and raises for a value it cannot hold);
        ``before`` is the text of the placeholder's logical line before it (continuation lines
        joined).

        Raises :class:`UsageError` naming the file and line of the first unknown variable."""
        for name, line in self.placeholders():
            if name not in values:
                raise UsageError(
                    f"{self.where}:{line}: unknown variable ${name}",
                    "give it a default in manifest.json defaultValues or pass --set "
                    f"{name}=VALUE (a literal dollar sign is $$)",
                )

        def _sub(m: re.Match[str]) -> str:
            if m.group("escaped") is not None:
                return "$"
            name = m.group("named") or m.group("braced")
            line = self.text.count("\n", 0, m.start()) + 1
            return escape(values[name], name, line, _logical_line_before(self.text, m.start()))

        return string.Template.pattern.sub(_sub, self.text)


@dataclass(frozen=True)
class ImageImport:
    """How a CRI daemon's container imports an image bootstrap hands it: ``argv`` is run inside
    the running container (``runc exec``) with an ``oci-archive`` of the image on its stdin and
    ``IMAGE`` (the image's full reference) in its environment; it must exit 0 within
    ``timeout`` seconds. The words may hold ``$VAR`` placeholders, rendered with the
    deployment's values (``$$`` for a literal ``$``, e.g. ``$$IMAGE`` for the shell)."""

    argv: tuple[TemplateFile, ...]
    timeout: float = DEFAULT_IMPORT_TIMEOUT

    def render(self, values: Mapping[str, str]) -> tuple[str, ...]:
        """The argv with ``values`` substituted (each value stays one word). Raises
        :class:`UsageError` naming the word for an unknown variable."""
        return tuple(w.render(values, _verbatim) for w in self.argv)


def _verbatim(value: str, name: str, line: int, before: str = "") -> str:
    if "\0" in value:
        raise UsageError(f"${name}: a NUL byte cannot be part of a command", "fix the value")
    return value


@dataclass(frozen=True)
class Definition:
    """A loaded definition. ``source`` is ``"builtin"``, ``"directory"`` or ``"image"``;
    ``origin`` the directory (or ``/exports``) it came from; the templates are None when absent.
    ``digest`` identifies the content (to tell whether a re-install changes anything)."""

    source: str
    origin: str
    default_values: Mapping[str, str] = field(default_factory=dict)
    readiness: str = "none"
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    auto_update: str | None = None
    health: HealthCheck | None = None
    image_import: ImageImport | None = None
    start_timeout: int = DEFAULT_START_TIMEOUT
    init: str = DEFAULT_INIT
    init_names: tuple[str, ...] = ()
    #: ``service`` or ``oneshot`` (the manifest's ``type``)
    unit_type: str = "service"
    config_template: TemplateFile | None = None
    service_template: TemplateFile | None = None
    tmpfiles_template: TemplateFile | None = None
    files: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 over the definition's files (names and contents)."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name].encode() + b"\0")
        return "sha256:" + h.hexdigest()

    def variables(self) -> set[str]:
        """Every variable any template of the definition refers to."""
        names: set[str] = set()
        for t in (self.config_template, self.service_template, self.tmpfiles_template):
            if t is not None:
                names.update(n for n, _ in t.placeholders())
        for word in self.image_import.argv if self.image_import else ():
            names.update(n for n, _ in word.placeholders())
        return names


def builtin() -> Definition:
    """The built-in default: run the image's Entrypoint/Cmd with the generated config and unit."""
    return Definition(source="builtin", origin="builtin")


def load(
    directory: str | Path, *, source: str = "directory", where: str | None = None
) -> Definition:
    """Load the definition in ``directory``.

    ``where`` is how file names are shown in errors (default: the directory path). Raises
    :class:`UsageError` (exit 2) for a missing directory, a file that is not a regular file or is
    too large or not UTF-8, bad JSON (naming file, line and column), a manifest of the wrong
    shape, and a template with a malformed ``$`` (naming file and line)."""
    path = Path(directory)
    shown = where if where is not None else str(path)
    if not path.is_dir():
        raise UsageError(
            f"definition {shown}: not a directory",
            "--definition takes a directory with manifest.json, config.json.template, "
            "service.template and/or tmpfiles.template",
        )
    files: dict[str, str] = {}
    for name in FILES:
        text = _read_text(path / name, f"{shown}/{name}")
        if text is not None:
            files[name] = text
    if not files:
        raise UsageError(
            f"definition {shown}: none of {', '.join(FILES)} found",
            "a definition needs at least one of these files",
        )
    return from_files(files, source=source, origin=shown)


def from_files(files: Mapping[str, str], *, source: str, origin: str) -> Definition:
    """Build a definition from file contents keyed by file name (see :func:`load`)."""
    manifest = Manifest()
    auto_update: str | None = None
    health: HealthCheck | None = None
    image_import: ImageImport | None = None
    if MANIFEST in files:
        where = f"{origin}/{MANIFEST}"
        doc = parse_json(files[MANIFEST], where)
        manifest = _parse_manifest(doc, where)
        auto_update = check_policy(doc.get("autoUpdate"), f"{where}: autoUpdate", allow_none=True)
        if doc.get("health") is not None:
            health = parse_health(doc["health"], f"{where}: health")
            if manifest.unit_type == "oneshot":
                raise UsageError(
                    f"{where}: a oneshot has no health check",
                    'its command exiting 0 is the check; drop "health" or use "type": "service"',
                )
        if doc.get("imageImport") is not None:
            image_import = parse_image_import(doc["imageImport"], f"{where}: imageImport")

    def _template(name: str) -> TemplateFile | None:
        if name not in files:
            return None
        t = TemplateFile(f"{origin}/{name}", files[name])
        t.placeholders()  # malformed '$' is reported at load time
        return t

    return Definition(
        source=source,
        origin=origin,
        default_values=manifest.default_values,
        readiness=manifest.readiness,
        stop_timeout=manifest.stop_timeout,
        start_timeout=manifest.start_timeout,
        init=manifest.init,
        init_names=manifest.init_names,
        unit_type=manifest.unit_type,
        auto_update=auto_update,
        health=health,
        image_import=image_import,
        config_template=_template(CONFIG_TEMPLATE),
        service_template=_template(SERVICE_TEMPLATE),
        tmpfiles_template=_template(TMPFILES_TEMPLATE),
        files=dict(files),
    )


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` with errors as :class:`UsageError` naming ``where``, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}",
            "fix the JSON syntax (a value from --set lands inside a JSON string)",
        ) from exc


@dataclass(frozen=True)
class Manifest:
    """The settings of a ``manifest.json`` (defaults when absent)."""

    default_values: Mapping[str, str] = field(default_factory=dict)
    readiness: str = "none"
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    start_timeout: int = DEFAULT_START_TIMEOUT
    init: str = DEFAULT_INIT
    init_names: tuple[str, ...] = ()
    unit_type: str = "service"


def check_init_mode(value: object, where: str) -> str:
    """Return ``value`` if it is an init mode (see :data:`INIT_MODES`), else raise
    :class:`UsageError` naming ``where``."""
    if not isinstance(value, str) or value not in INIT_MODES:
        raise UsageError(
            f"{where}: init must be one of {', '.join(INIT_MODES)}, not {value!r}",
            '"auto" runs an init as pid 1 unless the entrypoint is one; "never" runs the '
            "entrypoint as pid 1",
        )
    return value


def _positive_seconds(doc: dict[str, Any], key: str, default: int, where: str) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where}: {key} must be a positive integer", "seconds, e.g. 10")
    return value


def _parse_manifest(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: must be a JSON object", 'e.g. {"defaultValues": {}}')
    raw = doc.get("defaultValues", {})
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: defaultValues must be an object", 'e.g. {"PORT": "8080"}')
    defaults: dict[str, str] = {}
    for key, value in raw.items():
        check_variable_name(key, f"{where}: defaultValues")
        if isinstance(value, bool):
            defaults[key] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            defaults[key] = str(value)
        else:
            raise UsageError(
                f"{where}: defaultValues.{key} must be a string, number or boolean",
                "template variables are text",
            )
    readiness = doc.get("readiness", "none")
    if readiness not in READINESS:
        raise UsageError(
            f"{where}: readiness must be one of {', '.join(READINESS)}, not {readiness!r}",
            '"notify": the container tells systemd it is ready (sd_notify READY=1)',
        )
    unit_type = doc.get("type", "service")
    if unit_type not in UNIT_TYPES:
        raise UsageError(
            f"{where}: type must be one of {', '.join(UNIT_TYPES)}, not {unit_type!r}",
            '"oneshot": the command runs once at start (e.g. a container that only ships files)',
        )
    if unit_type == "oneshot" and readiness == "notify":
        raise UsageError(
            f'{where}: a oneshot cannot have readiness "notify"',
            "a oneshot is ready when its command exited 0",
        )
    names = doc.get("initNames", [])
    if not isinstance(names, list) or not all(
        isinstance(n, str) and n and "/" not in n for n in names
    ):
        raise UsageError(
            f"{where}: initNames must be a list of executable names",
            'base names without a directory, e.g. ["runsvdir"]',
        )
    return Manifest(
        default_values=defaults,
        readiness=readiness,
        stop_timeout=_positive_seconds(doc, "stopTimeout", DEFAULT_STOP_TIMEOUT, where),
        start_timeout=_positive_seconds(doc, "startTimeout", DEFAULT_START_TIMEOUT, where),
        init=check_init_mode(doc.get("init", DEFAULT_INIT), where),
        init_names=tuple(names),
        unit_type=unit_type,
    )


def check_policy(value: Any, where: str, *, allow_none: bool = False) -> str | None:
    """``value`` if it is an auto-update policy (``registry``, ``local``, ``off``); None for
    None when ``allow_none``; else :class:`UsageError` naming ``where``."""
    if value is None and allow_none:
        return None
    if value not in AUTO_UPDATE_POLICIES:
        raise UsageError(
            f"{where}: {value!r} is not an auto-update policy",
            "one of: registry (follow the tag in the registry), local (follow the tag in the "
            "store), off",
        )
    return str(value)


def _seconds(value: Any, where: str, default: float, *, zero: bool) -> float:
    if value is None:
        return default
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m)?\s*", value)
        if m is None:
            raise UsageError(
                f"{where}: {value!r} is not a duration", "seconds, or e.g. 500ms, 30s, 2m"
            )
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
        value = float(m.group(1)) * scale
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: must be a number of seconds", 'e.g. 5 or "500ms"')
    if value < 0 or (value == 0 and not zero) or value > 86400:
        raise UsageError(f"{where}: {value} is out of range", "between 0 and 86400 seconds")
    return float(value)


def parse_health(doc: Any, where: str) -> HealthCheck:
    """A :class:`HealthCheck` from a definition's ``health`` object; :class:`UsageError`
    naming the key for anything else (unknown keys, an empty or non-string ``exec``, bad
    durations, ``retries`` not a positive integer)."""
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: must be an object", '{"exec": ["/bin/check"], "interval": 2}')
    unknown = sorted(set(doc) - set(HEALTH_KEYS))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r}", f"known: {', '.join(HEALTH_KEYS)}")
    argv = doc.get("exec")
    url = doc.get("http")
    if (argv is None) == (url is None):
        raise UsageError(
            f"{where}: give exactly one of exec and http",
            '{"exec": ["/bin/check"]} runs in the container; '
            '{"http": "http://127.0.0.1:10248/healthz"} is fetched from the host',
        )
    if url is not None:
        _check_url(url, f"{where}.http")
    elif not _is_argv(argv):
        raise UsageError(
            f"{where}.exec: must be a non-empty list of strings",
            'the command run inside the container, e.g. ["/bin/check", "--quick"]',
        )
    retries = doc.get("retries", 3)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 1 <= retries <= 100:
        raise UsageError(f"{where}.retries: must be an integer from 1 to 100", "e.g. 3")
    return HealthCheck(
        argv=tuple(argv or ()),
        http=str(url or ""),
        interval=_seconds(doc.get("interval"), f"{where}.interval", 1.0, zero=False),
        timeout=_seconds(doc.get("timeout"), f"{where}.timeout", 10.0, zero=False),
        retries=retries,
        start_period=_seconds(doc.get("start_period"), f"{where}.start_period", 0.0, zero=True),
    )


def _is_argv(value: Any) -> TypeGuard[list[str]]:
    """Whether ``value`` is a command line: a non-empty list of non-empty strings without NUL."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(a, str) and a and "\0" not in a for a in value)
    )


def _check_url(url: Any, where: str) -> None:
    """Raise :class:`UsageError` naming ``where`` unless ``url`` is an http(s) URL with a host
    and no credentials, whitespace or control characters."""
    from urllib.parse import urlsplit

    hint = 'an http:// or https:// URL, e.g. "http://127.0.0.1:10248/healthz"'
    if not isinstance(url, str) or not url or _CONTROL.search(url) or " " in url:
        raise UsageError(f"{where}: must be a URL", hint)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        raise UsageError(f"{where}: {url!r} is not a URL: {exc}", hint) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{where}: {url!r} is not an http(s) URL with a host", hint)
    if parts.username is not None or parts.password is not None:
        raise UsageError(f"{where}: {url!r} holds credentials", "health URLs take none")


def parse_image_import(doc: Any, where: str) -> ImageImport:
    """An :class:`ImageImport` from a definition's ``imageImport`` object; :class:`UsageError`
    naming the key for unknown keys, an ``exec`` that is not a non-empty list of strings
    starting with an absolute path, a malformed ``$`` in a word, or a bad ``timeout``."""
    if not isinstance(doc, dict):
        raise UsageError(
            f"{where}: must be an object",
            '{"exec": ["/usr/bin/ctr", "-n", "k8s.io", "images", "import", "-"]}',
        )
    unknown = sorted(set(doc) - set(IMAGE_IMPORT_KEYS))
    if unknown:
        raise UsageError(
            f"{where}: unknown key {unknown[0]!r}", f"known: {', '.join(IMAGE_IMPORT_KEYS)}"
        )
    argv = doc.get("exec")
    if not _is_argv(argv):
        raise UsageError(
            f"{where}.exec: must be a non-empty list of strings",
            "the command run inside the CRI daemon's container, reading an oci-archive on stdin",
        )
    words = tuple(TemplateFile(f"{where}.exec[{i}]", w) for i, w in enumerate(argv))
    for w in words:
        w.placeholders()  # a malformed '$' is reported at load time
    if not argv[0].startswith("/") and not argv[0].startswith("$"):
        raise UsageError(
            f"{where}.exec[0]: {argv[0]!r} is not an absolute path",
            "name the executable inside the container by its full path, e.g. /bin/sh",
        )
    timeout = _seconds(doc.get("timeout"), f"{where}.timeout", DEFAULT_IMPORT_TIMEOUT, zero=False)
    return ImageImport(words, timeout)


def check_variable_name(name: str, where: str) -> None:
    """Raise :class:`UsageError` unless ``name`` is a valid template variable name."""
    if not VAR_NAME.match(name):
        raise UsageError(
            f"{where}: {name!r} is not a valid variable name",
            "names are letters, digits and '_', not starting with a digit",
        )


def _read_text(path: Path, where: str) -> str | None:
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise UsageError(f"{where}: not a regular file", "definition files must be plain files")
    if path.stat().st_size > MAX_FILE_SIZE:
        raise UsageError(f"{where}: larger than {MAX_FILE_SIZE} bytes", "is this the right file?")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where}: not UTF-8 text", "definition files are text") from exc


# ---- escaping per target file ------------------------------------------------------------------


def escape_json(value: str, name: str, line: int, before: str = "") -> str:
    """A value for a JSON template: escaped as the inside of a JSON string."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def unit_escaper(
    where: str, raw: frozenset[str] = frozenset(), *, commands: bool = False
) -> Escaper:
    """An escaper for a systemd unit or tmpfiles file named ``where`` in errors: rejects control
    characters and a trailing backslash, doubles ``%``. Variables named in ``raw`` already hold
    unit syntax (e.g. ``EXEC_START``, quoted by bootstrap): they are checked, not escaped.

    With ``commands`` (a unit file), a value on an ``Exec*=`` line is one argv word, quoted as
    :func:`bootstrap.systemd.units.quote_word` quotes bootstrap's own (``$`` and ``%``
    doubled; whitespace, quotes or backslashes put it in double quotes); inside a quoted string
    of the template it is escaped for that string instead. Either way systemd reads back
    exactly the value, never several words."""

    def _escape(value: str, name: str, line: int, before: str = "") -> str:
        if _CONTROL.search(value):
            raise UsageError(
                f"{where}:{line}: value of ${name} contains a control character or newline",
                "values substituted into unit files must be one line of printable text",
            )
        if value.endswith("\\"):
            raise UsageError(
                f"{where}:{line}: value of ${name} ends with a backslash",
                "a trailing backslash would continue the unit line",
            )
        if name in raw:
            return value
        key = _EXEC_KEY.match(before) if commands else None
        if key is None:
            return value.replace("%", "%%")
        quote = _quote_state(before[key.end() :])
        if quote is None:
            return units.quote_word(value)
        inner = value.replace("\\", "\\\\").replace(quote, "\\" + quote)
        return inner.replace("%", "%%").replace("$", "$$")

    return _escape
