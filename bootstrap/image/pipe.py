"""The one-pass pipe: a layer inflated into the layer cache while its blob downloads.

:class:`StreamedLayer` runs :func:`~bootstrap.image.layercache.ensure_layer` in an extractor
thread fed, chunk by chunk, through a :class:`_ChunkPipe` (bytes handed over by reference, a
few chunks deep) by the thread downloading the blob; the cache entry is renamed in only when
the downloader says the blob itself was committed (its size and digest matched), and a
hostile layer or a diff_id mismatch stops the blob from being stored. :class:`Cancelled` is
raised inside a download or an extraction that was called off.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import TYPE_CHECKING, BinaryIO, cast

if TYPE_CHECKING:
    from bootstrap.image.apply import UnpackOptions
    from bootstrap.image.model import Descriptor
    from bootstrap.image.store import Store


class Cancelled(Exception):
    """Raised inside a download's write callback to stop it once another layer failed."""


class _ChunkPipe:
    """A pipe of ``bytes`` chunks between two threads of this process: the downloader
    :meth:`put` s each chunk as the HTTP client produced it, the extractor reads a file-like
    stream (:meth:`read`, :meth:`readinto`), so chunks are handed over by reference instead of
    being copied into and out of a kernel pipe. At most ``depth`` chunks wait: memory stays
    bounded whatever the layer's size. :meth:`close` (reader side) makes every later
    :meth:`put` return False, also one blocked on a full pipe."""

    _POLL = 0.05  # a writer blocked on a full pipe looks at ``closed`` this often (seconds)

    def __init__(self, depth: int = 4) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._chunk = b""
        self._off = 0
        self._eof = False
        self.closed = False

    # -- writer side

    def put(self, chunk: bytes | None) -> bool:
        """Hand ``chunk`` (None: the end of the stream) to the reader; False once the reader
        closed the pipe."""
        while not self.closed:
            try:
                self._q.put(chunk, timeout=self._POLL)
                return True
            except queue.Full:
                continue
        return False

    # -- reader side

    def _fill(self) -> bool:
        while self._off >= len(self._chunk):
            if self._eof:
                return False
            item = self._q.get()
            if item is None:
                self._eof = True
                return False
            self._chunk, self._off = item, 0
        return True

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that is left with ``size`` < 0); b"" at the end."""
        if size is None or size < 0:
            parts = []
            while self._fill():
                parts.append(self._chunk[self._off :])
                self._off = len(self._chunk)
            return b"".join(parts)
        if not size or not self._fill():
            return b""
        if self._off == 0 and size >= len(self._chunk):
            self._off = len(self._chunk)
            return self._chunk  # the whole chunk, not copied
        data = self._chunk[self._off : self._off + size]
        self._off += len(data)
        return data

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        if not len(buffer) or not self._fill():
            return 0
        n = min(len(buffer), len(self._chunk) - self._off)
        memoryview(buffer)[:n] = memoryview(self._chunk)[self._off : self._off + n]
        self._off += n
        return n

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        """Stop reading: a writer gets False from :meth:`put` from now on."""
        self.closed = True
        with contextlib.suppress(queue.Empty):
            while True:  # a writer blocked in put() gets its slot, then sees ``closed``
                self._q.get_nowait()

    def __enter__(self) -> _ChunkPipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamedLayer:
    """One layer inflated into the layer cache while it downloads: the downloader thread
    :meth:`write` s each chunk into a pipe read by an extractor thread running
    :func:`~bootstrap.image.layercache.ensure_layer`, which stops just before its rename until
    :meth:`settle` says whether the blob was committed.

    Protocol (downloader side): :meth:`write` per chunk, :meth:`end_of_stream`, then inside
    the blob's ``before_commit`` :meth:`wait_extracted` (raises the extractor's error: a
    hostile layer or a diff_id mismatch then stores no blob either), and always
    :meth:`settle` once. Memory is bounded by the pipe's depth (a few chunks)."""

    def __init__(
        self, store: Store, desc: Descriptor, diff_id: str, options: UnpackOptions
    ) -> None:
        self._pipe = _ChunkPipe()
        self._open = True  # the writer side: end_of_stream not yet sent
        self._ready = threading.Event()  # extractor at its commit point, or finished
        self._go = threading.Event()
        self._commit = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(store, desc, diff_id, options),
            name=f"inflate-{desc.digest.partition(':')[2][:12]}",
            daemon=True,
        )
        self._thread.start()

    def _run(self, store: Store, desc: Descriptor, diff_id: str, options: UnpackOptions) -> None:
        try:
            # the extraction path (apply, tarstream, isal) is imported by pulls that extract
            from bootstrap.image.layercache import ensure_layer

            ensure_layer(
                store,
                desc,
                diff_id,
                options,
                source=lambda: cast(BinaryIO, self._pipe),
                before_commit=self._wait_go,
            )
        except BaseException as exc:  # handed to the downloader thread, which raises it
            self.error = exc
        finally:
            self._pipe.close()  # a writer still writing stops instead of blocking
            self._ready.set()

    def _wait_go(self) -> None:
        self._ready.set()
        self._go.wait()
        if not self._commit:
            raise Cancelled()

    def write(self, chunk: bytes) -> None:
        """Feed ``chunk`` to the extractor. When the extractor stopped reading: raise its
        error, or (it found the layer cached meanwhile) ignore the rest."""
        if not self._open:
            return
        if not self._pipe.put(chunk):
            self._open = False
            self._thread.join()
            if self.error is not None:
                raise self.error from None

    def end_of_stream(self) -> None:
        self._close()

    def wait_extracted(self) -> None:
        """Wait until the extraction is complete and verified; raise its error if it failed."""
        self._close()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    def settle(self, *, commit: bool) -> None:
        """Let the extractor rename its entry in (``commit``) or remove it; wait for it. After
        a commit, an error of the final rename is raised."""
        self._close()
        self._commit = commit
        self._go.set()
        self._thread.join()
        if commit and self.error is not None:
            raise self.error

    def _close(self) -> None:
        if self._open:
            self._open = False
            self._pipe.put(None)
