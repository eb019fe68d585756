"""Content-addressed storage: blobs, the index and its tags, locks, the store's directories.

Layout under ``root`` (``Settings.store``)::

    oci/                 a real OCI image layout (``skopeo inspect oci:ROOT/oci:REF`` and
      oci-layout         ``umoci unpack --image ROOT/oci:REF`` read it); index.json entries are
      index.json         annotated ``org.opencontainers.image.ref.name`` = the normalized reference
      blobs/<alg>/<hex>
    tmp/                 temp files of blobs being written (stale ones are removed by gc)
    locks/               store.lock (using/exclusive), index.lock, blobs/*.lock, layers/*.lock
    layers/<alg>/<hex>   extracted-layer cache dirs keyed by diff_id (written by image.layercache)
    trees/<alg>/<hex>    composed read-only lower trees of images, keyed by manifest digest
    holds/<key>.json     what deployments use (gc keeps those trees and layers)
    damaged/             blobs found damaged, moved aside (evidence; neither gc nor fsck
                         removes them)

Lock discipline (``fcntl.flock`` via :func:`bootstrap.locks.flocked` only):

- ``locks/store.lock`` shared = :meth:`Store.using` (any operation that reads blobs or adds
  blobs, caches or tags); exclusive = :meth:`Store.exclusive` (gc). So gc never deletes anything
  that a concurrent pull, checkout or import is reading or about to reference. Both are
  re-entrant within a thread (nested ``using()`` in an ``exclusive()`` block is allowed; asking
  for ``exclusive()`` while the thread holds ``using()`` is a :class:`BusyError`); other threads
  take their own flock, so they are excluded like other processes.
- ``locks/index.lock`` exclusive while index.json is rewritten (temp + fsync + rename, so readers
  never see a partial file and need no lock).
- ``locks/blobs/<alg>-<hex>.lock`` exclusive while one blob is fetched: concurrent pullers of a
  shared layer wait and then find it present, so each blob is downloaded once.
- ``locks/layers/<alg>-<hex>.lock`` exclusive while a layer cache dir is built
  (:meth:`Store.layer_lock`).

Per-blob and per-layer lock files are only taken inside ``using()``, so gc (exclusive) may
delete them safely.

A blob appears under ``blobs/`` only complete and verified (temp file, digest and size checked,
fsync, rename, fsync dir), and index.json is replaced whole, so a process killed at any point
leaves a valid store: at worst unreferenced blobs and temp files, which gc
(:mod:`bootstrap.image.maintenance`) removes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bootstrap.errors import BootstrapError, BusyError, IntegrityError, UsageError
from bootstrap.fsutil import fsync_dir, make_dirs, make_private, write_atomic
from bootstrap.image.model import (
    DIGEST_ALGORITHMS,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    REF_NAME_ANNOTATION,
    Descriptor,
    Image,
    Platform,
    check_digest,
    digest_of,
    new_hasher,
    split_digest,
)
from bootstrap.locks import flocked

log = logging.getLogger(__name__)

OCI_LAYOUT_VERSION = "1.0.0"
SOURCE_DIGEST_ANNOTATION = "io.bootstrap.source.digest"
"""On an index.json entry whose manifest was converted (Docker v2s2 -> OCI) when pulled: the
digest the registry served (what ``pull`` printed and what ``REF@DIGEST`` pins)."""
ADMITTED_ANNOTATION = "io.bootstrap.trust.admitted"
"""On an index.json entry: the signature-policy requirement (and its scope) that admitted the
image when it was pulled or imported."""
_CHUNK = 1024 * 1024
# How long to wait for a lock before BusyError (exit 6). The store lock waits out a running gc
# (or, for gc, running pulls/checkouts); a blob lock waits while another process downloads that
# blob; a layer lock while another process extracts that layer; the index lock is held briefly.
STORE_LOCK_WAIT = 600.0
BLOB_LOCK_WAIT = 3600.0
LAYER_LOCK_WAIT = 1800.0
INDEX_LOCK_WAIT = 60.0
#: Prefix of the files under ``tmp/`` recording a running checkout's temp directory.
CHECKOUT_RECORD = "checkout-"


# ---- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRef:
    """One index.json entry: the normalized reference and the descriptor it names.
    ``source_digest``: the digest the registry served when the stored manifest is a conversion
    of it (annotation ``io.bootstrap.source.digest``), else "". ``admitted``: the policy
    requirement that admitted it (annotation ``io.bootstrap.trust.admitted``), else ""."""

    name: str
    digest: str
    media_type: str
    size: int
    source_digest: str = ""
    admitted: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "digest": self.digest,
            "media_type": self.media_type,
            "size": self.size,
        }
        if self.source_digest:
            doc["source_digest"] = self.source_digest
        if self.admitted:
            doc["admitted"] = self.admitted
        return doc


# ---- process-wide re-entrant holds of the store lock -------------------------------------------


@dataclass
class _Hold:
    shared: bool
    count: int
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


_thread_holds = threading.local()


# ---- the store ----------------------------------------------------------------------------------


class Store:
    """The shared store rooted at ``root`` (see the module docstring for layout and locks)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.oci = self.root / "oci"
        self.blobs = self.oci / "blobs"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.layers = self.root / "layers"
        self.trees = self.root / "trees"
        self.holds = self.root / "holds"
        self.damaged = self.root / "damaged"
        self._index_path = self.oci / "index.json"
        self._store_lock = self.locks / "store.lock"
        #: held exclusively while index.json (or oci-layout) is rewritten
        self.index_lock = self.locks / "index.lock"
        self._initialized = False
        self.check_root()

    def check_root(self) -> None:
        """Raise :class:`UsageError` (exit 2) when ``root``, or a directory above it, exists but
        is not a directory (``--store`` naming a file). A missing root is fine: writers create
        it, readers find nothing stored."""
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is None or existing.is_dir():
            return
        raise UsageError(
            f"the store {self.root} is not a directory",
            "point --store (or $BOOTSTRAP_STORE) at a directory, or at a path that does not "
            "exist yet",
        )

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- setup ---------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the layout if missing (idempotent; safe to race with other processes).
        Every command that writes to the store calls this first, so a store on a read-only
        filesystem fails here, before any work, with :func:`store_os_error`'s hint."""
        if self._initialized:
            return
        self.check_root()
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing is not None and os.statvfs(existing).f_flag & os.ST_RDONLY:
            err = store_os_error(self.root, "write", OSError(errno.EROFS, "read-only"))
            raise type(err)(f"the store {self.root} is on a read-only filesystem", err.hint)
        with self._io("create directories"):
            # root's alone whatever the umask (a local user must not plant content in the
            # layer cache that root later runs); an older store is closed on its first write
            self._private_root()
            for d in (
                self.oci,
                self.blobs,
                self.blobs / "sha256",
                self.tmp,
                self.locks,
                self.layers,
                self.trees,
                self.holds,
            ):
                make_private(d)
        layout = self.oci / "oci-layout"
        if not layout.exists():
            with flocked(self.index_lock, timeout=INDEX_LOCK_WAIT, what="the store index"):
                if not layout.exists():
                    data = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode()
                    write_atomic(layout, data)
        if not self._index_path.exists():
            with flocked(self.index_lock, timeout=INDEX_LOCK_WAIT, what="the store index"):
                if not self._index_path.exists():
                    self._write_index([])
        self._initialized = True

    def _private_root(self) -> None:
        """Create the root 0700 (with any missing parents). A root that exists is closed
        (0700) when it is ours and already a store (an older version left it open); another
        existing directory (``--store`` naming one made by hand) keeps its mode, with a warning
        when other users can write to it (they could replace what root later runs)."""
        if not self.root.is_dir():
            make_dirs(self.root)
            return
        if self.oci.is_dir():
            make_private(self.root)
            return
        st = self.root.stat()
        if st.st_mode & 0o022:
            log.warning(
                "warning: the store %s is writable by other users (mode %o): they could "
                "replace what is run from it; use a directory only root can write",
                self.root,
                st.st_mode & 0o7777,
            )

    # -- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, timeout: float | None = STORE_LOCK_WAIT) -> Iterator[None]:
        """Hold the store lock shared for the block: gc cannot delete anything meanwhile.

        Re-entrant within a thread (and a no-op inside :meth:`exclusive`). Waits for a
        running gc (``timeout`` None: forever; else :class:`BusyError` after it)."""
        with self._hold(shared=True, timeout=timeout):
            yield

    @contextlib.contextmanager
    def reading(self, timeout: float | None = STORE_LOCK_WAIT) -> Iterator[None]:
        """:meth:`using` for commands that only read (fsck), creating nothing: on a store that
        does not exist yet, or whose lock file does not exist and cannot be created (a
        read-only filesystem: nobody can write it), the block runs without a lock."""
        lock_dir_writable = self.locks.is_dir() and os.access(self.locks, os.W_OK)
        if not self._store_lock.exists() and not lock_dir_writable:
            yield
            return
        with self.using(timeout):
            yield

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = STORE_LOCK_WAIT) -> Iterator[None]:
        """Hold the store lock exclusively (no pull, checkout or import runs meanwhile).

        Raises :class:`BusyError` if this thread already holds :meth:`using` (an upgrade would
        deadlock), or after ``timeout`` seconds of waiting for other processes."""
        with self._hold(shared=False, timeout=timeout):
            yield

    @contextlib.contextmanager
    def _hold(self, *, shared: bool, timeout: float | None) -> Iterator[None]:
        # Holds are per thread: each thread takes the flock on its own descriptor, so a thread
        # of this process running gc excludes the others just as other processes are excluded,
        # and a thread re-entering (using() inside using() or exclusive()) only counts. Worker
        # threads of a pull take their own shared hold while the pull's thread holds one: Linux
        # grants a shared flock while an exclusive request (a waiting gc) is queued, so this
        # cannot deadlock behind that gc.
        holds: dict[str, _Hold] = _thread_holds.__dict__.setdefault("holds", {})
        key = str(self._store_lock)
        hold = holds.get(key)
        if hold is not None:
            if not shared and hold.shared:
                raise BusyError(
                    f"store {self.root} is in use by this thread; cannot lock it exclusively",
                    "run the command on its own",
                )
            hold.count += 1
        else:
            hold = _Hold(shared=shared, count=1)
            what = f"the store {self.root}"
            with self._io("lock"):
                try:
                    hold.stack.enter_context(
                        flocked(self._store_lock, shared=shared, timeout=0, what=what)
                    )
                except BusyError:
                    log.info(
                        "waiting for %s",
                        "a running 'bootstrap gc'"
                        if shared
                        else "other bootstrap commands using the store",
                    )
                    hold.stack.enter_context(
                        flocked(self._store_lock, shared=shared, timeout=timeout, what=what)
                    )
            holds[key] = hold
        try:
            yield
        finally:
            hold.count -= 1
            if hold.count == 0:
                del holds[key]
                hold.stack.close()

    @contextlib.contextmanager
    def layer_lock(self, diff_id: str) -> Iterator[None]:
        """Hold the store shared and the lock of one layer cache dir exclusively: whoever builds
        :meth:`layer_cache_dir` ``(diff_id)`` does it inside this block (build in a temp name
        under ``layers/``, rename into place)."""
        with self._named_lock("layers", _split(diff_id, "diff_id"), f"layer {diff_id}"):
            yield

    @contextlib.contextmanager
    def tree_lock(self, manifest_digest: str) -> Iterator[None]:
        """Hold the store shared and the lock of one image tree exclusively (whoever builds
        :meth:`tree_dir` does it inside this block)."""
        with self._named_lock("trees", _split(manifest_digest), f"image tree {manifest_digest}"):
            yield

    @contextlib.contextmanager
    def _named_lock(self, kind: str, digest: tuple[str, str], what: str) -> Iterator[None]:
        """The store held shared (:meth:`using`) plus ``locks/KIND/ALG-HEX.lock`` exclusively,
        waiting up to :data:`LAYER_LOCK_WAIT` seconds (then :class:`BusyError` naming
        ``what``). ``digest`` is the (algorithm, hex) pair of a checked digest."""
        alg, hexpart = digest
        with (
            self.using(),
            flocked(
                self.locks / kind / f"{alg}-{hexpart}.lock", timeout=LAYER_LOCK_WAIT, what=what
            ),
        ):
            yield

    @contextlib.contextmanager
    def _blob_lock(self, digest: str) -> Iterator[None]:
        alg, hexpart = _split(digest)
        with flocked(
            self.locks / "blobs" / f"{alg}-{hexpart}.lock",
            timeout=BLOB_LOCK_WAIT,
            what=f"blob {digest} (being downloaded by another process)",
        ):
            yield

    # -- blobs ---------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """``oci/blobs/<alg>/<hex>``; raises :class:`IntegrityError` for a malformed digest."""
        alg, hexpart = _split(digest)
        return self.blobs / alg / hexpart

    def has_blob(self, digest: str) -> bool:
        """True if the blob is stored (complete and verified when written)."""
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a stored blob for reading. A missing blob is store damage:
        :class:`IntegrityError` (exit 4). The caller should hold :meth:`using`."""
        path = self.blob_path(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise IntegrityError(
                f"blob {digest} is missing from the store {self.root}",
                "run 'bootstrap fsck', then pull the image again",
            ) from None

    def read_blob(self, digest: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """Read a small stored blob whole, verifying its digest; more than ``limit`` bytes or
        a mismatch raises :class:`IntegrityError`."""
        with self.open_blob(digest) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise IntegrityError(
                f"blob {digest} is larger than {limit} bytes", "it cannot be a manifest or config"
            )
        actual = digest_of(data, _split(digest)[0])
        if actual != digest:
            raise IntegrityError(
                f"stored blob {digest} is damaged (hashes to {actual})",
                "'bootstrap fsck --repair' sets it aside; then pull the image again",
            )
        return data

    def ensure_blob(
        self,
        desc: Descriptor,
        fetch: Callable[[Callable[[bytes], object]], None],
        *,
        before_commit: Callable[[], None] | None = None,
        verify: bool = False,
    ) -> Path:
        """Make sure the blob ``desc`` names is stored; return its path.

        Under the blob's own lock: if the blob is present, return at once (each blob is fetched
        once even by concurrent pullers). Present means: of the descriptor's size, and with
        ``verify`` also hashing to its digest; a stored blob that is not is damaged, moved
        aside (:meth:`set_aside`) and fetched again. Otherwise call ``fetch(write)``, which
        must stream the content by calling ``write(chunk)``; the chunks go to a temp file
        under ``tmp/`` while being hashed. More bytes than ``desc.size`` raise
        :class:`IntegrityError` at once; at the end the size and digest must match exactly,
        else :class:`IntegrityError` (exit 4).
        The file is fsynced and renamed into ``blobs/``. ``before_commit`` (when given) is
        called after the size and digest matched and before the rename; whatever it raises
        propagates and nothing is stored. On any failure (including errors raised by ``fetch``,
        which propagate unchanged) the temp file is removed and nothing is stored.
        """
        path = self.blob_path(desc.digest)  # IntegrityError for a malformed digest
        self.init()
        with self.using(), self._blob_lock(desc.digest):
            if self._present(desc, path, verify):
                return path
            self._write_blob(desc, path, fetch, before_commit)
            return path

    def put_blob(
        self, data: bytes, media_type: str, *, digest: str | None = None, verify: bool = False
    ) -> Descriptor:
        """Store a small blob (manifest, config) given whole; return its descriptor.

        The digest is sha256 of ``data`` unless ``digest`` is given, in which case ``data`` must
        hash to it (under its algorithm) or :class:`IntegrityError` is raised. ``verify``: as
        for :meth:`ensure_blob`."""
        if digest is None:
            digest = digest_of(data)
        desc = Descriptor(media_type, check_digest(digest), len(data))

        def fetch(write: Callable[[bytes], object]) -> None:
            write(data)

        self.ensure_blob(desc, fetch, verify=verify)
        return desc

    def _present(self, desc: Descriptor, path: Path, verify: bool = False) -> bool:
        """True when the blob is stored whole: its size is the descriptor's (and, with
        ``verify``, it hashes to the digest). A stored file that is not is moved aside and
        False returned; a blob that hashes right but whose size differs from the descriptor's
        means the descriptor lies: :class:`IntegrityError`."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        if size == desc.size and not verify:
            return True
        # The digest fixes the size: either the stored file is damaged, or desc lies.
        actual = hash_file(path, desc.digest)
        if actual == desc.digest:
            if size == desc.size:
                return True
            raise IntegrityError(
                f"descriptor of {desc.digest} says {desc.size} bytes, the content has {size}",
                "the manifest is inconsistent; report it to the image's publisher",
            )
        aside = self.set_aside(desc.digest)
        log.warning(
            "warning: stored blob %s was damaged (it hashes to %s); moved it to %s and "
            "fetching it again",
            desc.digest,
            actual,
            aside,
        )
        return False

    def set_aside(self, digest: str) -> Path:
        """Move the stored blob ``digest`` out of ``blobs/`` into ``damaged/`` (a name with the
        time, never overwriting an earlier one) and return where it went: a damaged blob is
        kept as evidence, and its digest is free to be fetched again. The caller holds
        :meth:`using` (and the blob's lock when one may be writing it)."""
        src = self.blob_path(digest)
        alg, hexpart = _split(digest)
        with self._io("move a damaged blob aside"):
            make_dirs(self.damaged)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            fd, name = tempfile.mkstemp(dir=self.damaged, prefix=f"{alg}-{hexpart}.{stamp}.")
            os.close(fd)
            os.replace(src, name)
            fsync_dir(src.parent)
            fsync_dir(self.damaged)
        return Path(name)

    def set_aside_if_damaged(self, digest: str) -> Path | None:
        """Under the store lock and the blob's own: when the stored blob ``digest`` (still)
        does not hash to its name, :meth:`set_aside` it and return where it went; else
        None (intact, or gone)."""
        path = self.blob_path(digest)
        with self.using(), self._blob_lock(digest):
            if not path.is_file() or hash_file(path, digest) == digest:
                return None
            return self.set_aside(digest)

    def set_aside_blobs(self) -> list[Path]:
        """The blobs moved aside into ``damaged/`` (oldest first)."""
        if not self.damaged.is_dir():
            return []
        return sorted(self.damaged.iterdir())

    def put_stream(
        self,
        media_type: str,
        fetch: Callable[[Callable[[bytes], object]], None],
        *,
        verify: bool = False,
    ) -> Descriptor:
        """Store a blob whose digest is learned from its content; return its (sha256)
        descriptor.

        ``fetch(write)`` streams the content as :meth:`ensure_blob`'s does; it goes to a temp
        file under ``tmp/`` while being hashed, so it is read once. Then, under the blob's lock,
        it is renamed into ``blobs/`` unless that blob is already stored (``verify``: and
        hashes to its digest; a damaged one is moved aside and replaced). On any failure
        (including errors raised by ``fetch``, e.g. a check made while streaming) the temp
        file is removed and nothing is stored."""
        self.init()
        hasher = DIGEST_ALGORITHMS["sha256"]()
        with self.using():
            tmp, size = self._spool(fetch, hasher, "stream", None)
            try:
                desc = Descriptor(media_type, "sha256:" + hasher.hexdigest(), size)
                path = self.blob_path(desc.digest)
                with self._blob_lock(desc.digest):
                    if self._present(desc, path, verify):
                        tmp.unlink()
                        return desc
                    self._commit(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return desc

    def _write_blob(
        self,
        desc: Descriptor,
        path: Path,
        fetch: Callable[[Callable[[bytes], object]], None],
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        alg, hexpart = _split(desc.digest)
        hasher = new_hasher(desc.digest)
        tmp, written = self._spool(fetch, hasher, hexpart[:16], desc)
        try:
            if written != desc.size:
                raise IntegrityError(
                    f"blob {desc.digest}: got {written} bytes, expected {desc.size}",
                    "the download was truncated; try again",
                )
            actual = f"{alg}:{hasher.hexdigest()}"
            if actual != desc.digest:
                raise IntegrityError(
                    f"blob {desc.digest}: content hashes to {actual}",
                    "the registry sent wrong content; try again or another mirror",
                )
            if before_commit is not None:
                before_commit()
            self._commit(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _spool(
        self,
        fetch: Callable[[Callable[[bytes], object]], None],
        hasher: Any,
        label: str,
        desc: Descriptor | None,
    ) -> tuple[Path, int]:
        """Stream ``fetch``'s chunks into a new fsynced temp file under ``tmp/``, hashing them;
        more bytes than ``desc.size`` raise :class:`IntegrityError` at once. Returns the temp
        file and the size; removes the file on failure."""
        with self._io("create a temp file"):
            fd, tmpname = tempfile.mkstemp(dir=self.tmp, prefix=f"blob-{label}-", suffix=".part")
        tmp = Path(tmpname)
        written = 0
        try:
            # unbuffered: a failed write (ENOSPC) leaves no buffer for close() to flush again,
            # which would replace the mapped error with a bare OSError
            with os.fdopen(fd, "wb", buffering=0) as fh:

                def write(chunk: bytes) -> None:
                    nonlocal written
                    written += len(chunk)
                    if desc is not None and written > desc.size:
                        raise IntegrityError(
                            f"blob {desc.digest}: more than the {desc.size} bytes its "
                            "descriptor announces",
                            "the registry sent wrong content; try again or another mirror",
                        )
                    hasher.update(chunk)
                    with self._io("write a blob"):
                        view = memoryview(chunk)
                        while view:
                            view = view[fh.write(view) :]

                fetch(write)
                with self._io("write a blob"):
                    fh.flush()
                    os.fchmod(fh.fileno(), 0o644)
                    os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, written

    def _commit(self, tmp: Path, path: Path) -> None:
        """Rename the verified temp file ``tmp`` to the blob ``path`` (and fsync the dir)."""
        with self._io("store a blob"):
            make_dirs(path.parent)
            os.replace(tmp, path)
        with self._io("store a blob"):
            fsync_dir(path.parent)

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn an OSError of the store's own files into a one-line error with a hint."""
        try:
            yield
        except OSError as exc:
            raise store_os_error(self.root, what, exc) from exc

    # -- refs ----------------------------------------------------------------------------------

    def index_entries(self) -> list[dict[str, Any]]:
        try:
            raw = self._index_path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            manifests = doc.get("manifests") or []
            if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
                raise ValueError("manifests is not a list of objects")
        except (ValueError, AttributeError) as exc:
            raise IntegrityError(
                f"{self._index_path} is not a valid OCI index: {exc}",
                "run 'bootstrap fsck'; restore or remove the file",
            ) from None
        return manifests

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        write_atomic(self._index_path, json.dumps(doc, indent=2).encode() + b"\n")

    def tag(self, name: str, desc: Descriptor) -> None:
        """Point ``name`` (a normalized reference) at ``desc`` in index.json, replacing any
        entry of that name. The blob must be stored (else :class:`IntegrityError`)."""
        if not name or any(c.isspace() for c in name):
            raise UsageError(f"invalid image name {name!r}", "use a normalized reference")
        self.init()
        with (
            self.using(),
            flocked(self.index_lock, timeout=INDEX_LOCK_WAIT, what="the store index"),
        ):
            if not self.has_blob(desc.digest):
                raise IntegrityError(
                    f"cannot tag {name}: blob {desc.digest} is not stored",
                    "pull the image again",
                )
            entries = [m for m in self.index_entries() if ref_name(m) != name]
            doc = desc.to_json()
            doc["annotations"] = {**dict(desc.annotations), REF_NAME_ANNOTATION: name}
            doc.pop("platform", None)
            entries.append(doc)
            self._write_index(entries)

    def annotate(self, name: str, annotations: Mapping[str, str]) -> None:
        """Add ``annotations`` to the index.json entry of ``name``; a missing name:
        :class:`UsageError`."""
        with (
            self.using(),
            flocked(self.index_lock, timeout=INDEX_LOCK_WAIT, what="the store index"),
        ):
            entries = self.index_entries()
            found = [m for m in entries if ref_name(m) == name]
            if not found:
                raise self._not_found(name)
            for m in found:
                m["annotations"] = {**(m.get("annotations") or {}), **annotations}
            self._write_index(entries)

    def untag(self, name: str) -> Descriptor:
        """Remove ``name`` from index.json; return what it pointed at. Blobs stay until gc.
        Missing name: :class:`UsageError`."""
        self.init()
        with (
            self.using(),
            flocked(self.index_lock, timeout=INDEX_LOCK_WAIT, what="the store index"),
        ):
            entries = self.index_entries()
            found = [m for m in entries if ref_name(m) == name]
            if not found:
                raise UsageError(
                    f"image {name} is not in the store {self.root}",
                    "'bootstrap images' lists the stored references",
                )
            self._write_index([m for m in entries if ref_name(m) != name])
            return Descriptor.from_json(found[-1], f"index.json[{name}]")

    def resolve(self, name: str) -> Descriptor:
        """The descriptor ``name`` (a normalized reference) points at; missing name:
        :class:`UsageError` (exit 2) with the hint to pull it."""
        for m in reversed(self.index_entries()):
            if ref_name(m) == name:
                return Descriptor.from_json(m, f"index.json[{name}]")
        raise self._not_found(name)

    def _not_found(self, name: str) -> UsageError:
        return UsageError(f"image {name} is not in the store {self.root}", f"bootstrap pull {name}")

    def images(self) -> list[StoredRef]:
        """Every named entry of index.json, sorted by name."""
        out = []
        for m in self.index_entries():
            name = ref_name(m)
            if name is None:
                continue
            ann = m.get("annotations") or {}
            out.append(
                StoredRef(
                    name,
                    str(m.get("digest", "")),
                    str(m.get("mediaType", "")),
                    _size(m),
                    str(ann.get(SOURCE_DIGEST_ANNOTATION, "")),
                    str(ann.get(ADMITTED_ANNOTATION, "")),
                )
            )
        return sorted(out, key=lambda r: r.name)

    def image(self, name: str, platform: Platform | None = None) -> Image:
        """Resolve ``name`` and parse its manifest and config.

        If the name points at an index, choose among the manifests stored: ``platform`` if
        given, else the host's, else (when only one is stored) that one. Raises
        :class:`UsageError` if the name or a stored manifest for the platform is missing,
        :class:`IntegrityError` if stored content is damaged."""
        import bootstrap.image.manifest as mf
        from bootstrap.image.model import Index, Manifest

        with self.using():
            desc = self.resolve(name)
            doc = mf.parse_manifest(self.read_blob(desc.digest), desc.media_type, desc.digest)
            if isinstance(doc, Index):
                stored = tuple(d for d in doc.manifests if self.has_blob(d.digest))
                if not stored:
                    raise IntegrityError(
                        f"image {name}: no manifest of its index is stored",
                        f"bootstrap pull {name}",
                    )
                sub = Index(doc.media_type, doc.digest, stored)
                wanted = platform or Platform.host()
                try:
                    child = mf.select_platform(sub, wanted)
                except UsageError:
                    if platform is not None or len(stored) != 1:
                        raise UsageError(
                            f"image {name} has no manifest for {wanted} in the store",
                            f"bootstrap pull --platform {wanted} {name}",
                        ) from None
                    child = stored[0]
                doc = mf.parse_manifest(
                    self.read_blob(child.digest), child.media_type, child.digest
                )
            if not isinstance(doc, Manifest):
                raise IntegrityError(
                    f"image {name}: stored index nests another index", "pull the image again"
                )
            config = mf.parse_config(
                self.read_blob(doc.config.digest, MAX_CONFIG_BYTES), doc.config.digest
            )
            return Image(name, doc, config)

    def tree_dir(self, manifest_digest: str) -> Path:
        """``trees/<alg>/<hex>``: the composed, read-only lower tree of an image (overlay
        mounts of deployments use it as their lowerdir)."""
        alg, hexpart = _split(manifest_digest)
        return self.trees / alg / hexpart

    def hold(self, users: Sequence[Path], manifest_digest: str, diff_ids: Sequence[str]) -> Path:
        """Record that the tree of ``manifest_digest`` and the cached layers ``diff_ids`` are in
        use: gc keeps them while one of ``users`` (paths, e.g. the slots of one deployment) has a
        symlink ``lower`` that resolves to that tree, and drops the hold once none has. The
        caller holds :meth:`using` and creates the ``lower`` link before releasing it (gc is
        exclusive, so it never sees the hold without the link). Returns the hold file."""
        names = [os.path.abspath(u) for u in users]
        key = hashlib.sha256(os.fsencode("\0".join([manifest_digest, *names]))).hexdigest()[:32]
        path = self.holds / f"{key}.json"
        make_dirs(self.holds)
        doc = {"users": names, "image": manifest_digest, "layers": list(diff_ids)}
        write_atomic(path, json.dumps(doc))
        return path

    def live_holds(self, *, drop_stale: bool) -> tuple[set[str], set[str]]:
        """(manifest digests, diff_ids) held by users whose ``lower`` still resolves to the held
        tree; with ``drop_stale`` the other hold files are removed (their user is gone)."""
        images: set[str] = set()
        layers: set[str] = set()
        if not self.holds.is_dir():
            return images, layers
        for hold in self.holds.iterdir():
            try:
                doc = json.loads(hold.read_text())
                image = str(doc["image"])
                want = os.path.realpath(self.tree_dir(image))
                live = any(os.path.realpath(Path(u) / "lower") == want for u in doc["users"])
            except (OSError, ValueError, KeyError, TypeError, IntegrityError):
                live = False
            if live:
                images.add(image)
                layers.update(str(d) for d in doc.get("layers") or ())
            elif drop_stale:
                hold.unlink(missing_ok=True)
        return images, layers

    def layer_cache_dir(self, diff_id: str) -> Path:
        """``layers/<alg>/<hex>``: where the extracted layer with this diff_id is cached."""
        alg, hexpart = _split(diff_id, "diff_id")
        return self.layers / alg / hexpart

    # -- gc and fsck ---------------------------------------------------------------------------

    def record_checkout_temp(self, temp: Path) -> Path:
        """Record that a checkout is about to build ``temp`` (a ``DEST.tmp-*`` directory beside
        its destination); return the record file, which the checkout removes when done. The
        caller holds :meth:`using`, so a record gc finds belongs to a checkout that was
        killed. Written durably before ``temp`` exists."""
        with self._io("record a checkout"):
            make_dirs(self.tmp)
            fd, name = tempfile.mkstemp(dir=self.tmp, prefix=CHECKOUT_RECORD, suffix=".path")
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.fsencode(os.path.abspath(temp)))
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self.tmp)
        return Path(name)


# ---- helpers -----------------------------------------------------------------------------------


def store_os_error(root: Path, what: str, exc: OSError) -> BootstrapError:
    """The one-line error for an OSError on the store's own files: "cannot WHAT in the store
    ROOT: REASON", with a hint fitting the reason (read-only filesystem, no space,
    permissions, not a directory). A store that cannot be written (read-only, permission
    denied, not a directory) is a :class:`UsageError` (exit 2: choose another ``--store``);
    anything else (no space) exit 1."""
    reason = exc.strerror or str(exc)
    message = f"cannot {what} in the store {root}: {reason}"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        # the store named cannot be used for this command: the user's choice of --store (exit 2)
        return UsageError(message, _os_hint(exc))
    return BootstrapError(message, _os_hint(exc))


def _os_hint(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        hint = (
            "the store is on a read-only filesystem: images and fsck read it as it is; to "
            "change it, remount it read-write or use --store DIR on a writable filesystem"
        )
    elif exc.errno == errno.ENOSPC:
        hint = "free space on the store's filesystem ('bootstrap gc' removes what is unused)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "run as root, or use --store DIR (or $BOOTSTRAP_STORE) in a directory you own"
    elif exc.errno == errno.ENOTDIR:
        hint = "point --store (or $BOOTSTRAP_STORE) at a directory"
    else:
        hint = "check free space and permissions of the store (--store / $BOOTSTRAP_STORE)"
    return hint


def _split(digest: str, where: str = "digest") -> tuple[str, str]:
    return split_digest(digest, where)


def ref_name(entry: dict[str, Any]) -> str | None:
    ann = entry.get("annotations")
    if isinstance(ann, dict):
        name = ann.get(REF_NAME_ANNOTATION)
        if isinstance(name, str):
            return name
    return None


def _size(entry: dict[str, Any]) -> int:
    size = entry.get("size")
    return size if isinstance(size, int) else 0


def hash_file(path: Path, digest: str) -> str:
    alg, _ = _split(digest)
    hasher = new_hasher(digest)
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            hasher.update(chunk)
    return f"{alg}:{hasher.hexdigest()}"
