"""Configuration files ``bootstrap up`` writes onto the node from its manifest, and keeps track of.

- ``registries:`` (insecure registries, mirrors) as a containers-registries.conf.d(5) drop-in,
  ``/etc/containers/registries.conf.d/50-bootstrap-node.conf`` (the directory is
  ``$BOOTSTRAP_REGISTRIES_CONF_D`` when set): later ``bootstrap pull``/``update``/
  ``auto-update`` read it as they read every drop-in, and so do podman, skopeo and CRI-O, so
  the node keeps reaching the registry it booted from.
- ``registries.credentials`` copied to ``/etc/containers/auth.json`` (``$BOOTSTRAP_AUTH_FILE``),
  the system-wide credentials file bootstrap reads after the per-user ones, mode 0600.
- ``pods.network`` as ``/etc/cni/net.d/NAME`` (the directory is ``$BOOTSTRAP_CNI_CONF_DIR``),
  before the CRI daemon starts.

Each write is temp file + fsync + rename. What was written is recorded (path and sha256) in
``$STATE/node/written.json`` before the rename (with the previous content's sha256 too until
the write is done, so a run killed in between still knows the file as its own); a file that
exists and was not written by ``up`` (or was changed since; an identical file ``up`` did not
write stays the operator's) is never overwritten: that is a
:class:`~bootstrap.errors.UsageError` (exit 2) raised before anything is written, naming the
file, except for the credentials, where an existing file of the operator's is kept with a
warning (the manifest's file is still used for this run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootstrap.errors import UsageError
from bootstrap.fsutil import make_dirs, write_atomic
from bootstrap.node.manifest import NodeManifest

log = logging.getLogger(__name__)

DROP_IN_NAME = "50-bootstrap-node.conf"
DEFAULT_REGISTRIES_CONF_D = Path("/etc/containers/registries.conf.d")
DEFAULT_AUTH_FILE = Path("/etc/containers/auth.json")
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
RECORD = Path("node") / "written.json"


def registries_conf_d() -> Path:
    """The registries.conf.d directory (``$BOOTSTRAP_REGISTRIES_CONF_D``, else the system's)."""
    return Path(os.environ.get("BOOTSTRAP_REGISTRIES_CONF_D") or DEFAULT_REGISTRIES_CONF_D)


def system_auth_file() -> Path:
    """The system-wide credentials file (``$BOOTSTRAP_AUTH_FILE``, else the system's)."""
    return Path(os.environ.get("BOOTSTRAP_AUTH_FILE") or DEFAULT_AUTH_FILE)


def cni_conf_dir() -> Path:
    """Where CNI configurations go (``$BOOTSTRAP_CNI_CONF_DIR``, else /etc/cni/net.d)."""
    return Path(os.environ.get("BOOTSTRAP_CNI_CONF_DIR") or DEFAULT_CNI_CONF_DIR)


@dataclass(frozen=True)
class Wanted:
    """A file ``up`` wants on the node: ``path``, its bytes and mode; ``keep_foreign``: an
    existing file not written by ``up`` is kept (with a warning) instead of refused."""

    path: Path
    data: bytes
    mode: int = 0o644
    what: str = ""
    keep_foreign: bool = False


@dataclass(frozen=True)
class Written:
    """What :func:`apply` did with one file: ``action`` is ``written``, ``unchanged`` or
    ``kept`` (an operator's file left as it was)."""

    path: Path
    action: str
    what: str


def wanted_files(manifest: NodeManifest) -> list[Wanted]:
    """The files the manifest asks for (none when it asks for no registry configuration, no
    credentials and no CNI config)."""
    files: list[Wanted] = []
    reg = manifest.registries
    if reg.insecure or reg.mirrors:
        text = reg.to_registries_conf().replace(
            "# written by bootstrap up from the node manifest",
            f"# written by bootstrap up from {manifest.path}; 'bootstrap up' rewrites it",
        )
        files.append(Wanted(registries_conf_d() / DROP_IN_NAME, text.encode(), what="registries"))
    if reg.credentials is not None:
        try:
            data = reg.credentials.read_bytes()
        except OSError as exc:
            raise UsageError(
                f"registries.credentials: {reg.credentials}: {exc.strerror or exc}",
                "the credentials file must stay readable",
            ) from exc
        files.append(
            Wanted(
                system_auth_file(), data, 0o600, what="registries.credentials", keep_foreign=True
            )
        )
    if manifest.pods is not None and manifest.pods.network is not None:
        net = manifest.pods.network
        files.append(Wanted(cni_conf_dir() / net.name, net.data, what="pods.network"))
    return files


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _load_record(state: Path) -> dict[str, list[str]]:
    """Path -> the sha256 values a file ``up`` wrote there may have (one, or two while a
    rewrite is under way: a run killed between the record and the rename leaves either)."""
    path = state / RECORD
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path}: unreadable record of the files up wrote: {exc}",
            f"remove {path} (up then treats every existing file as the operator's)",
        ) from exc
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        str(k): [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in files.items()
    }


def _save_record(state: Path, record: dict[str, list[str]]) -> None:
    out = state / RECORD
    make_dirs(out.parent)
    doc = {"files": {k: v[0] if len(v) == 1 else v for k, v in record.items()}}
    write_atomic(out, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _current(path: Path) -> bytes | None:
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
            return fh.read(1 << 22)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot read it: {exc.strerror or exc}",
            "it must be a regular file (not a symlink) that root can read",
        ) from exc


def apply(state: Path, files: list[Wanted]) -> Iterator[Written]:
    """Write ``files`` (see the module doc), recording them under ``state``. Every conflict is
    found before the first write. Yields what happened to each file, in order."""
    record = _load_record(state)
    plan: list[tuple[Wanted, str]] = []
    for f in files:
        key = str(f.path)
        now = _current(f.path)
        if now is None:
            plan.append((f, "written"))
        elif now == f.data:
            plan.append((f, "unchanged"))
        elif _sha(now) in record.get(key, ()):
            plan.append((f, "written"))  # ours, as we left it: replace it
        elif f.keep_foreign:
            plan.append((f, "kept"))
        else:
            raise UsageError(
                f"{f.what}: {f.path} exists and was not written by bootstrap up",
                f"move it away (up writes {f.what} there), or remove that section from the "
                "node manifest",
            )
    for f, action in plan:
        if action == "written":
            key, sha = str(f.path), _sha(f.data)
            # first the record names both contents (a kill now leaves a file still ours)
            record[key] = [sha, *(x for x in record.get(key, ()) if x != sha)]
            _save_record(state, record)
            make_dirs(f.path.parent, 0o755)  # host configuration: never writable by others
            write_atomic(f.path, f.data, mode=f.mode)
            record[key] = [sha]
            log.info("up: wrote %s (%s)", f.path, f.what)
        elif action == "unchanged":
            pass  # ours if the record says so; an identical file of the operator's stays theirs
        else:
            log.warning(
                "up: %s: %s exists and is not bootstrap's; kept it (later commands read it, "
                "not the manifest's file)",
                f.what,
                f.path,
            )
        yield Written(f.path, action, f.what)
    _save_record(state, record)
