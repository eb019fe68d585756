"""The layer cache: each layer extracted once by diff_id, verified against its record, repaired.

:func:`ensure_layer` is the one way a layer enters ``store.layer_cache_dir(diff_id)``:
``rootfs/`` (the layer's tree, extracted by :func:`~bootstrap.image.apply.run_layer` in record
mode) plus ``layer.json`` (the :class:`~bootstrap.image.apply.LayerRecord`: whiteouts, opaque
directories, implicit parents, hardlinks to lower layers, device nodes, and every path's type,
mode, owner, size, mtime and content digest). The diff_id is verified while extracting; a
mismatch caches nothing. :func:`ensure_all` caches an image's layers (in parallel threads),
:func:`verify_layer` checks an entry against its record (fsck), :func:`repair_layer` extracts a
damaged one again from its blob.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.fsutil import make_dirs, remove_tree, write_atomic
from bootstrap.image.apply import (
    RECORD_VERSION,
    LayerRecord,
    UnpackOptions,
    diff_id_error,
    file_digest,
    record_row,
    run_layer,
)
from bootstrap.image.model import LAYER_COMPRESSION, Descriptor
from bootstrap.image.tarstream import MAX_DEPTH
from bootstrap.image.tree import syncfs

if TYPE_CHECKING:
    from bootstrap.image.store import Store

log = logging.getLogger(__name__)

RECORD_FILE = "layer.json"


@dataclass(frozen=True)
class CachedLayer:
    """A layer extracted in the cache: ``rootfs`` is its tree, ``record`` what composition
    needs beyond it."""

    diff_id: str
    path: Path
    record: LayerRecord

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"


# records this process wrote or read, by path: a cold pull + checkout composes what it just
# extracted without parsing the records again; the key is the record file's identity (inode,
# mtime, size), so a replaced or rewritten record is read anew
_RECORDS: dict[str, tuple[tuple[int, int, int], LayerRecord, bool]] = {}


def _record_key(path: Path) -> tuple[int, int, int]:
    st = os.stat(path / RECORD_FILE)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _load_cached(path: Path, diff_id: str, options: UnpackOptions) -> CachedLayer | None:
    try:
        key = _record_key(path)
    except FileNotFoundError:
        return None
    known = _RECORDS.get(str(path))
    if known is not None and known[0] == key:
        _, record, owners = known
        if options.same_owner and not owners:
            return None
        return CachedLayer(diff_id, path, record)
    try:
        doc = json.loads((path / RECORD_FILE).read_text())
        if isinstance(doc, dict) and doc.get("version") != RECORD_VERSION:
            return None  # written by an older bootstrap: extracted again, silently
        record = LayerRecord.from_json(doc)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("layer cache %s unreadable (%s): extracting again", path, exc)
        return None
    _RECORDS[str(path)] = (key, record, bool(doc.get("owners")))
    if options.same_owner and not doc.get("owners"):
        return None  # filled without owners (not as root): not good enough
    return CachedLayer(diff_id, path, record)


#: Opens a layer's compressed bytes: a context manager yielding a readable binary stream.
LayerSource = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


def cached_layer(store: Store, diff_id: str, options: UnpackOptions) -> CachedLayer | None:
    """The layer cache entry of ``diff_id`` when one usable with ``options`` exists, else None
    (no lock taken: an entry is only ever renamed in whole)."""
    return _load_cached(Path(store.layer_cache_dir(diff_id)), diff_id, options)


def ensure_layer(
    store: Store,
    desc: Descriptor,
    diff_id: str,
    options: UnpackOptions,
    *,
    source: LayerSource | None = None,
    replace: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> tuple[CachedLayer, bool]:
    """The cached extraction of layer ``desc`` (whose uncompressed digest must be ``diff_id``),
    extracting it first when missing. Returns (layer, extracted_now).

    This is the one way a layer enters the cache. ``source`` opens the compressed bytes (default:
    the stored blob ``desc.digest``); a caller streaming from elsewhere (a registry response)
    passes its own and owns verifying ``desc.digest`` over those bytes. ``replace`` extracts
    again even when an entry exists (repair). ``before_commit`` (when given) is called once the
    extraction is complete and its diff_id matched, just before the rename; whatever it raises
    propagates and nothing is cached (a streaming caller verifies ``desc.digest`` there).
    The fill is atomic: a temp dir beside the cache
    entry, its record (``layer.json``: every path with type, mode, owner, size, mtime and
    content digest) written, ``syncfs``, renamed in; ``store.layer_lock(diff_id)`` makes
    concurrent callers extract once. The caller holds ``store.using()``. Raises IntegrityError
    for a hostile layer or a diff_id mismatch (nothing is cached then)."""
    compression = LAYER_COMPRESSION.get(desc.media_type)
    if compression is None:
        raise IntegrityError(
            f"layer {desc.digest}: unsupported media type {desc.media_type!r}",
            "bootstrap unpacks tar, tar+gzip and tar+zstd layers",
        )
    path = Path(store.layer_cache_dir(diff_id))
    if not replace:
        cached = _load_cached(path, diff_id, options)
        if cached is not None:
            return cached, False
    make_dirs(path.parent)
    with store.layer_lock(diff_id):
        if not replace:
            cached = _load_cached(path, diff_id, options)
            if cached is not None:
                return cached, False
        opener: LayerSource = source or (lambda: store.open_blob(desc.digest))
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        try:
            rootfs = tmp / "rootfs"
            rootfs.mkdir(mode=0o755)  # a layer's "./" entry, when it has one, sets it
            with opener() as fh:
                digest, record = run_layer(
                    fh, compression, str(rootfs), options, desc.digest, record=True
                )
            if digest != diff_id:
                raise diff_id_error(desc.digest, diff_id, digest)
            doc = record.to_json()
            doc["owners"] = options.same_owner
            doc["diff_id"] = diff_id
            doc["blob"] = desc.digest
            doc["media_type"] = desc.media_type
            write_atomic(tmp / RECORD_FILE, json.dumps(doc, separators=(",", ":")))
            syncfs(tmp)
            if before_commit is not None:
                before_commit()
            if os.path.lexists(path):
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
                os.rename(path, old / "entry")  # stale, insufficient or damaged entry
                os.rename(tmp, path)
                remove_tree(old)
            else:
                os.rename(tmp, path)
            _RECORDS[str(path)] = (_record_key(path), record, options.same_owner)
        except BaseException:
            remove_tree(tmp)
            raise
    return CachedLayer(diff_id, path, record), True


@dataclass(frozen=True)
class LayerCheck:
    """What :func:`verify_layer` found in one cache entry: ``changed`` paths (relative to the
    layer's rootfs) whose type, mode, owner, size, mtime or content differ from the record,
    ``missing`` recorded paths that are gone, ``extra`` paths the record does not list;
    ``problem`` a record that cannot be read (then nothing else was checked); ``stale`` an entry
    without a current record (no ``layer.json`` or an older format): not damage, the next
    checkout needing it extracts it again."""

    diff_id: str
    blob: str
    media_type: str
    files: int = 0
    bytes: int = 0
    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    problem: str = ""
    stale: bool = False

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.problem)

    def findings(self) -> list[str]:
        """One human line per finding."""
        name = f"cached layer {self.diff_id}"
        if self.problem:
            return [f"{name}: {self.problem}"]
        return (
            [f"{name}: changed {p}" for p in self.changed]
            + [f"{name}: missing {p}" for p in self.missing]
            + [f"{name}: unexpected {p}" for p in self.extra]
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "diff_id": self.diff_id,
            "blob": self.blob,
            "ok": self.ok,
            "files": self.files,
            "changed": list(self.changed),
            "missing": list(self.missing),
            "extra": list(self.extra),
            "problem": self.problem,
            "stale": self.stale,
        }


def verify_layer(path: Path, diff_id: str) -> LayerCheck:
    """Check the cache entry at ``path`` against its ``layer.json``: every recorded path present
    with the recorded type, mode, owner (when recorded), size, mtime and content (regular files
    re-hashed, symlink targets read), nothing unrecorded. Reads only; never raises for damage
    (it is reported in the result); OSError other than a vanished file propagates."""
    try:
        doc = json.loads((path / RECORD_FILE).read_text())
        if not isinstance(doc, dict) or doc.get("version") != RECORD_VERSION:
            return LayerCheck(diff_id, "", "", stale=True)
        record = LayerRecord.from_json(doc)
        blob, media_type = str(doc["blob"]), str(doc["media_type"])
        owners = bool(doc.get("owners"))
    except FileNotFoundError:
        return LayerCheck(diff_id, "", "", stale=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return LayerCheck(diff_id, "", "", problem=f"record unreadable ({exc})")
    root = str(path / "rootfs")
    changed: list[str] = []
    missing: list[str] = []
    seen: set[str] = set()
    files = nbytes = 0
    for row in record.entries:
        rel = str(row[0])
        seen.add(rel)
        full = root + "/" + rel
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            missing.append(rel)
            continue
        data = ""
        try:
            if stat.S_ISREG(st.st_mode):
                files += 1
                nbytes += st.st_size
                data = file_digest(full) if st.st_size == row[5] else "?"
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(full)
        except FileNotFoundError:
            missing.append(rel)
            continue
        if record_row(rel, st, owners, data) != row:
            changed.append(rel)
    extra: list[str] = []

    def walk(full_dir: str, rel_dir: str, depth: int) -> None:
        with os.scandir(full_dir) as it:
            ents = list(it)
        for ent in ents:
            rel = rel_dir + "/" + ent.name if rel_dir else ent.name
            if rel not in seen:
                extra.append(rel)
            elif ent.is_dir(follow_symlinks=False) and depth < MAX_DEPTH:
                walk(ent.path, rel, depth + 1)

    try:
        walk(root, "", 0)
    except FileNotFoundError:
        return LayerCheck(diff_id, blob, media_type, problem="rootfs/ is missing")
    return LayerCheck(
        diff_id,
        blob,
        media_type,
        files,
        nbytes,
        tuple(changed),
        tuple(missing),
        tuple(sorted(extra)),
    )


def repair_layer(store: Store, check: LayerCheck) -> None:
    """Extract the layer of a damaged cache entry again from its stored blob (atomically
    replacing the entry) with the owners policy of this process. The caller holds
    ``store.using()``. Raises UsageError when the blob is not stored (the entry is removed
    then: the next checkout needing it pulls and extracts), IntegrityError when the blob does not
    give the diff_id."""
    path = store.layer_cache_dir(check.diff_id)
    if not check.blob or not store.has_blob(check.blob):
        with store.layer_lock(check.diff_id):
            remove_tree(path)
        raise UsageError(
            f"cached layer {check.diff_id}: its blob is not stored; the damaged entry was removed",
            "pull the images using it again",
        )
    desc = Descriptor(check.media_type, check.blob, store.blob_path(check.blob).stat().st_size)
    ensure_layer(store, desc, check.diff_id, UnpackOptions(), replace=True)


def ensure_all(
    store: Store,
    layers: tuple[Descriptor, ...],
    diff_ids: tuple[str, ...],
    options: UnpackOptions,
) -> tuple[list[CachedLayer], int]:
    unique: dict[str, Descriptor] = {}
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        unique.setdefault(diff_id, desc)
    done: dict[str, CachedLayer] = {}
    extracted = 0
    workers = max(1, min(len(unique), os.cpu_count() or 1, 4))
    if workers == 1:
        for diff_id, desc in unique.items():
            done[diff_id], now = ensure_layer(store, desc, diff_id, options)
            extracted += now
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unpack") as pool:
            futures = {
                diff_id: pool.submit(ensure_layer, store, desc, diff_id, options)
                for diff_id, desc in unique.items()
            }
            try:
                for diff_id, fut in futures.items():
                    done[diff_id], now = fut.result()
                    extracted += now
            except BaseException:
                for fut in futures.values():
                    fut.cancel()
                raise
    return [done[d] for d in diff_ids], extracted
