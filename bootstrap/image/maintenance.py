"""Store maintenance: gc (what nothing references or holds) and fsck (blobs, index, cached layers).

:func:`gc` runs under the store's exclusive lock and removes blobs not reachable from
index.json, cached layers and image trees nothing stored or held needs, temp files, per-blob
and per-layer lock files and the temp dirs of killed checkouts. :func:`fsck` re-hashes every
blob, walks index.json's reachability and verifies every layer-cache entry against its record
(:func:`~bootstrap.image.layercache.verify_layer`); each damaged or missing blob is named with
its path and the images that need it. With ``repair`` damaged blobs are first moved aside into
``damaged/`` (kept as evidence; the next pull of an image needing them fetches them again)
and damaged cache entries extracted again from their blobs. Both return a frozen report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootstrap.errors import IntegrityError, UsageError
from bootstrap.fsutil import fsync_dir, remove_tree
from bootstrap.image.model import (
    DIGEST_ALGORITHMS,
    DOCKER_CONFIG,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    Descriptor,
    check_digest,
)
from bootstrap.image.store import (
    CHECKOUT_RECORD,
    STORE_LOCK_WAIT,
    Store,
    hash_file,
    ref_name,
)
from bootstrap.locks import flocked
from bootstrap.progress import counted, human_size

if TYPE_CHECKING:  # the layer cache (and the tar stream below it) is imported when fsck runs
    from bootstrap.image.layercache import LayerCheck

log = logging.getLogger(__name__)

#: The name of a checkout's temp directory (see :func:`bootstrap.image.compose.checkout`).
_CHECKOUT_TEMP = re.compile(r".+\.tmp-[A-Za-z0-9_]+")


@dataclass(frozen=True)
class GcReport:
    """What :func:`gc` removed. ``kept_aside``: damaged blobs ``damaged/`` holds, which gc
    never removes (evidence: remove them by hand when no longer needed); ``damaged_dir``:
    where."""

    blobs_removed: int = 0
    bytes_freed: int = 0
    layers_removed: int = 0
    temp_removed: int = 0
    locks_removed: int = 0
    blobs_kept: int = 0
    checkouts_removed: int = 0
    kept_aside: int = 0
    damaged_dir: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "checkouts_removed": self.checkouts_removed,
            "blobs_removed": self.blobs_removed,
            "bytes_freed": self.bytes_freed,
            "layers_removed": self.layers_removed,
            "temp_removed": self.temp_removed,
            "locks_removed": self.locks_removed,
            "blobs_kept": self.blobs_kept,
            "kept_aside": self.kept_aside,
        }

    def to_text(self) -> str:
        text = (
            f"removed {counted(self.blobs_removed, 'blob')} ({human_size(self.bytes_freed)}), "
            f"{counted(self.layers_removed, 'cached layer')}, "
            f"{counted(self.temp_removed, 'temp file')}, "
            f"{counted(self.checkouts_removed, 'interrupted checkout')}; "
            f"{counted(self.blobs_kept, 'blob')} kept"
        )
        if self.kept_aside:
            text += (
                f"; {counted(self.kept_aside, 'damaged blob')} set aside in {self.damaged_dir} "
                "left alone (remove them when no longer needed)"
            )
        return text


@dataclass(frozen=True)
class FsckReport:
    """What :func:`fsck` found. ``damaged``: blobs whose content does not hash to their
    name (or that cannot be parsed although referenced as manifests/configs); ``missing``: blobs
    referenced from index.json (directly or through manifests) but absent; ``problems``: other
    findings, one line each (bad index.json, size disagreements...). ``unreferenced`` blobs are
    not damage (gc removes them). ``needed_by``: for each damaged or missing blob, the stored
    references whose image needs it; ``paths``: where each damaged or missing blob is (or
    belongs). ``set_aside``: (digest, new path) of the damaged blobs ``--repair`` moved into
    ``damaged/``; ``kept_aside``: how many blobs ``damaged/`` holds in all."""

    blobs_checked: int = 0
    bytes_checked: int = 0
    damaged: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    unreferenced: int = 0
    refs_checked: int = 0
    layers: tuple[LayerCheck, ...] = ()
    repaired: tuple[str, ...] = ()
    needed_by: dict[str, tuple[str, ...]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    set_aside: tuple[tuple[str, str], ...] = ()
    kept_aside: int = 0
    damaged_dir: str = ""
    mismatched: tuple[str, ...] = ()  # the damaged blobs that do not hash to their name

    @property
    def ok(self) -> bool:
        return not (
            self.damaged or self.missing or self.problems or any(not c.ok for c in self.layers)
        )

    def images_to_fetch(self) -> tuple[str, ...]:
        """The stored references that need a damaged or missing blob: pulling (or importing)
        each again makes the store whole (after ``fsck --repair`` for damaged blobs)."""
        return tuple(
            sorted({n for d in (*self.damaged, *self.missing) for n in self.needed_by.get(d, ())})
        )

    def _blob_line(self, state: str, digest: str) -> str:
        names = self.needed_by.get(digest, ())
        need = f"needed by {', '.join(names)}" if names else "no stored image needs it"
        return f"{state} blob {digest}: {self.paths.get(digest, '?')} ({need})"

    def findings(self) -> list[str]:
        """One human line per finding."""
        return (
            [self._blob_line("damaged", d) for d in self.damaged]
            + [self._blob_line("missing", d) for d in self.missing]
            + list(self.problems)
            + [line for c in self.layers for line in c.findings()]
        )

    def to_json(self) -> dict[str, Any]:
        def blob(state: str, digest: str) -> dict[str, Any]:
            return {
                "digest": digest,
                "state": state,
                "path": self.paths.get(digest, ""),
                "images": list(self.needed_by.get(digest, ())),
            }

        return {
            "ok": self.ok,
            "blobs_checked": self.blobs_checked,
            "bytes_checked": self.bytes_checked,
            "refs_checked": self.refs_checked,
            "damaged": list(self.damaged),
            "missing": list(self.missing),
            "blobs": [blob("damaged", d) for d in self.damaged]
            + [blob("missing", d) for d in self.missing],
            "images_to_fetch": list(self.images_to_fetch()),
            "problems": list(self.problems),
            "unreferenced": self.unreferenced,
            "layers_checked": len(self.layers),
            "layers_damaged": [c.to_json() for c in self.layers if not c.ok],
            "layers_repaired": list(self.repaired),
            "blobs_set_aside": [{"digest": d, "path": p} for d, p in self.set_aside],
            "kept_aside": self.kept_aside,
        }

    def to_text(self) -> str:
        head = (
            f"checked {counted(self.blobs_checked, 'blob')} ({human_size(self.bytes_checked)}), "
            f"{counted(self.refs_checked, 'ref')}, "
            f"{counted(len(self.layers), 'cached layer')}: "
        )
        if self.repaired:
            head = f"repaired {counted(len(self.repaired), 'cached layer')}\n" + head
        if self.set_aside:
            head = (
                f"moved {counted(len(self.set_aside), 'damaged blob')} aside to "
                f"{self.damaged_dir}\n" + head
            )
        if self.ok:
            tail = "ok"
            if self.unreferenced:
                tail += (
                    f" ({counted(self.unreferenced, 'unreferenced blob')}; "
                    "'bootstrap gc' removes them)"
                )
            if self.kept_aside:
                tail += (
                    f"; {counted(self.kept_aside, 'damaged blob')} kept aside in "
                    f"{self.damaged_dir} (remove them when no longer needed)"
                )
            return head + tail
        findings = self.findings()
        return head + f"{counted(len(findings), 'problem')}\n" + "\n".join(findings)


def _walk(
    store: Store,
    on_problem: Callable[[str, str], None] | None = None,
    users: dict[str, set[str]] | None = None,
) -> tuple[set[str], set[str], int]:
    """Reachability from index.json: (reachable blob digests, diff_ids of stored image
    configs, refs). ``on_problem(kind, text)`` gets ("missing", digest) for a required blob
    that is absent and ("damaged", digest) / ("problem", line) for unparseable content.
    ``users`` (when given) gets, for every blob reached or required, the references whose
    image needs it."""

    def problem(kind: str, text: str) -> None:
        if on_problem is not None:
            on_problem(kind, text)

    reachable: set[str] = set()
    diff_ids: set[str] = set()
    entries = store.index_entries()
    todo: list[tuple[str, str, int, bool, str]] = []
    for i, m in enumerate(entries):
        name = ref_name(m) or f"index.json manifests[{i}]"
        try:
            d = Descriptor.from_json(m, f"index.json manifests[{i}]")
        except IntegrityError as exc:
            problem("problem", exc.message)
            continue
        todo.append((d.digest, d.media_type, d.size, True, name))
    seen: set[tuple[str, str]] = set()  # per reference, so each blob learns all its users
    while todo:
        digest, media_type, size, required, where = todo.pop()
        if (digest, where) in seen:
            continue
        seen.add((digest, where))
        if users is not None and required:
            users.setdefault(digest, set()).add(where)
        path = store.blob_path(digest)
        if not path.is_file():
            if required:
                problem("missing", digest)
            continue
        reachable.add(digest)
        actual_size = path.stat().st_size
        if actual_size != size:
            problem("problem", f"{where}: blob {digest} has {actual_size} bytes, not {size}")
        if media_type not in MANIFEST_TYPES | INDEX_TYPES | {OCI_CONFIG, DOCKER_CONFIG}:
            continue  # layers and unknown blobs are leaves
        limit = (
            MAX_CONFIG_BYTES if media_type in (OCI_CONFIG, DOCKER_CONFIG) else MAX_MANIFEST_BYTES
        )
        try:
            with open(path, "rb") as fh:
                doc = json.loads(fh.read(limit + 1))
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError:
            problem("damaged", digest)
            continue
        try:
            if media_type in INDEX_TYPES:
                children = [
                    Descriptor.from_json(c, f"{digest} manifests[{j}]")
                    for j, c in enumerate(doc.get("manifests") or [])
                ]
                # an index keeps only the platforms pulled: at least one must be stored
                if children and not any(store.has_blob(c.digest) for c in children):
                    problem("problem", f"{where}: none of the manifests of {digest} stored")
                todo.extend((c.digest, c.media_type, c.size, False, where) for c in children)
            elif media_type in MANIFEST_TYPES:
                cfg = Descriptor.from_json(doc.get("config"), f"{digest} config")
                cfg_type = cfg.media_type if cfg.media_type else OCI_CONFIG
                if cfg_type not in (OCI_CONFIG, DOCKER_CONFIG):
                    cfg_type = OCI_CONFIG
                todo.append((cfg.digest, cfg_type, cfg.size, True, where))
                for j, layer in enumerate(doc.get("layers") or []):
                    ld = Descriptor.from_json(layer, f"{digest} layers[{j}]")
                    if ld.urls and not store.has_blob(ld.digest):
                        continue  # a foreign layer not pulled is not missing
                    todo.append((ld.digest, ld.media_type, ld.size, True, where))
            else:
                rootfs = doc.get("rootfs") or {}
                for j, diff in enumerate(rootfs.get("diff_ids") or []):
                    diff_ids.add(check_digest(diff, f"{digest} rootfs.diff_ids[{j}]"))
        except (IntegrityError, AttributeError) as exc:
            problem("problem", f"{where}: {getattr(exc, 'message', exc)}")
    return reachable, diff_ids, len(entries)


def _stored_blobs(store: Store) -> Iterator[tuple[str, Path]]:
    if not store.blobs.is_dir():
        return
    for algdir in sorted(store.blobs.iterdir()):
        if not algdir.is_dir():
            continue
        for p in sorted(algdir.iterdir()):
            yield f"{algdir.name}:{p.name}", p


def _remove_recorded_checkouts(store: Store) -> int:
    """Remove the ``DEST.tmp-*`` directories (and their ``.lock`` files) that records of
    killed checkouts name; a record naming anything else is dropped, never followed."""
    removed = 0
    for record in sorted(store.tmp.glob(f"{CHECKOUT_RECORD}*.path")):
        try:
            temp = Path(os.fsdecode(record.read_bytes()))
        except OSError:
            continue
        if temp.is_absolute() and _CHECKOUT_TEMP.fullmatch(temp.name) and temp.parent.is_dir():
            if os.path.lexists(temp):
                log.info("removing %s, left by a checkout that was killed", temp)
                remove_tree(temp)
                removed += 1
            temp.with_name(temp.name + ".lock").unlink(missing_ok=True)
        else:
            log.warning("ignoring checkout record %s: %s is no checkout temp", record, temp)
        record.unlink(missing_ok=True)
    return removed


def gc(store: Store, timeout: float | None = STORE_LOCK_WAIT) -> GcReport:
    """Under :meth:`exclusive`: remove blobs not reachable from index.json, cached layers
    whose diff_id no stored image lists, every temp file, the per-blob/per-layer lock
    files and the ``DEST.tmp-*`` directories of killed checkouts (as recorded by
    :meth:`Store.record_checkout_temp`). Returns counts and bytes freed."""
    if not store.oci.is_dir():
        return GcReport()  # no store here (init creates oci/ first): nothing to collect
    store.init()
    with store.exclusive(timeout=timeout):
        reachable, diff_ids, _ = _walk(store)
        held_images, held_layers = store.live_holds(drop_stale=True)
        diff_ids |= held_layers
        blobs_removed = bytes_freed = kept = 0
        for digest, path in _stored_blobs(store):
            if digest in reachable:
                kept += 1
                continue
            try:
                bytes_freed += path.lstat().st_size
            except FileNotFoundError:
                continue
            remove_tree(path)
            blobs_removed += 1
        if blobs_removed:
            for algdir in store.blobs.iterdir():
                fsync_dir(algdir)
        layers_removed = 0
        if store.layers.is_dir():
            for algdir in store.layers.iterdir():
                if not algdir.is_dir() or algdir.name not in DIGEST_ALGORITHMS:
                    remove_tree(algdir)
                    layers_removed += 1
                    continue
                for entry in algdir.iterdir():
                    if f"{algdir.name}:{entry.name}" not in diff_ids:
                        remove_tree(entry)
                        layers_removed += 1
        if store.trees.is_dir():
            for algdir in store.trees.iterdir():
                for entry in list(algdir.iterdir()) if algdir.is_dir() else [algdir]:
                    digest = f"{algdir.name}:{entry.name}"
                    if entry.name.startswith(".") or (
                        digest not in reachable and digest not in held_images
                    ):
                        remove_tree(entry)
                        layers_removed += 1
        temp_removed = 0
        checkouts_removed = 0
        if store.tmp.is_dir():
            checkouts_removed = _remove_recorded_checkouts(store)
            for entry in store.tmp.iterdir():
                remove_tree(entry)
                temp_removed += 1
        # atomic_writer temps of index.json / oci-layout left by a process killed mid-write
        # (under the index lock: init() may be writing index.json right now)
        with flocked(store.index_lock, what="the store index"):
            for entry in store.oci.glob(".*.tmp"):
                entry.unlink(missing_ok=True)
                temp_removed += 1
        locks_removed = 0
        for sub in ("blobs", "layers", "trees"):
            d = store.locks / sub
            if d.is_dir():
                for entry in d.iterdir():
                    entry.unlink(missing_ok=True)
                    locks_removed += 1
        return GcReport(
            blobs_removed,
            bytes_freed,
            layers_removed,
            temp_removed,
            locks_removed,
            kept,
            checkouts_removed,
            len(store.set_aside_blobs()),
            str(store.damaged),
        )


def fsck(store: Store, *, repair: bool = False) -> FsckReport:
    """Re-hash every blob (streamed), check index.json, the oci-layout file and that every
    blob reachable from index.json is present and parses; check every layer-cache entry
    against its record (every path, type, mode, owner, size, mtime and file content). Holds
    :meth:`reading` (pulls may run meanwhile; gc may not; a read-only store can be checked).
    Without ``repair`` it never changes anything; with ``repair`` each blob that does not hash
    to its name is moved aside into ``damaged/`` (:meth:`Store.set_aside`: kept as evidence,
    and its image's next pull fetches it again), each damaged cache entry whose blob is intact
    is extracted again from it (one whose blob is damaged or gone is removed), and the report
    describes the store after that."""
    from bootstrap.image.layercache import repair_layer, verify_layer

    if not store.oci.exists():
        return FsckReport()  # no store yet: nothing stored, nothing damaged
    repaired: list[str] = []
    set_aside: list[tuple[str, str]] = []
    if repair:
        before = fsck(store)
        bad = [c for c in before.layers if not c.ok]
        if bad or before.mismatched:
            store.init()  # a writer from here on: a read-only store fails clearly
        for digest in before.mismatched:
            moved = store.set_aside_if_damaged(digest)
            if moved is not None:
                set_aside.append((digest, str(moved)))
        with store.using():
            for check in bad:
                if check.blob in before.damaged or check.blob in before.missing:
                    check = replace(check, blob="")  # cannot be trusted: drop the entry
                with contextlib.suppress(UsageError):
                    repair_layer(store, check)
                repaired.append(check.diff_id)
        if not repaired and not set_aside:
            return before
        # image trees are hardlinked from the cache: they still hold the damaged inodes.
        # Those no deployment uses are dropped (composed again when needed); held ones are
        # kept until their deployments are updated or removed.
        with store.exclusive():
            held, _ = store.live_holds(drop_stale=False)
            for algdir in store.trees.iterdir() if store.trees.is_dir() else ():
                for entry in list(algdir.iterdir()):
                    if f"{algdir.name}:{entry.name}" not in held:
                        remove_tree(entry)
    damaged: list[str] = []
    mismatched: list[str] = []
    missing: list[str] = []
    problems: list[str] = []
    users: dict[str, set[str]] = {}
    with store.reading():
        layout = store.oci / "oci-layout"
        try:
            version = json.loads(layout.read_bytes()).get("imageLayoutVersion")
            if not isinstance(version, str):
                problems.append(f"{layout}: no imageLayoutVersion")
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{layout}: {type(exc).__name__}: {exc}")
        checked = nbytes = 0
        names: set[str] = set()
        for digest, path in _stored_blobs(store):
            try:
                check_digest(digest)
            except IntegrityError:
                problems.append(f"{path}: not a blob name")
                continue
            names.add(digest)
            checked += 1
            nbytes += path.stat().st_size
            if hash_file(path, digest) != digest:
                damaged.append(digest)
                mismatched.append(digest)

        def on_problem(kind: str, text: str) -> None:
            if kind == "missing":
                missing.append(text)
            elif kind == "damaged":
                if text not in damaged:
                    damaged.append(text)
            else:
                problems.append(text)

        try:
            reachable, _, refs = _walk(store, on_problem, users)
        except IntegrityError as exc:
            problems.append(exc.message)
            reachable, refs = set(), 0
        unreferenced = len(names - reachable)
        layers = tuple(verify_layer(path, diff_id) for diff_id, path in _cached_layers(store))
        aside = len(store.set_aside_blobs())
    bad_blobs = {*damaged, *missing}
    return FsckReport(
        checked,
        nbytes,
        tuple(sorted(set(damaged))),
        tuple(sorted(set(missing))),
        tuple(problems),
        unreferenced,
        refs,
        layers,
        tuple(repaired),
        needed_by={d: tuple(sorted(users.get(d, ()))) for d in bad_blobs},
        paths={d: str(store.blob_path(d)) for d in bad_blobs},
        set_aside=tuple(set_aside),
        kept_aside=aside,
        damaged_dir=str(store.damaged),
        mismatched=tuple(sorted(set(mismatched))),
    )


def _cached_layers(store: Store) -> Iterator[tuple[str, Path]]:
    """(diff_id, path) of every complete layer-cache entry (temp dirs of fills in progress
    start with a dot and are skipped)."""
    if not store.layers.is_dir():
        return
    for algdir in sorted(store.layers.iterdir()):
        if algdir.name not in DIGEST_ALGORITHMS or not algdir.is_dir():
            continue
        for p in sorted(algdir.iterdir()):
            if not p.name.startswith("."):
                yield f"{algdir.name}:{p.name}", p
