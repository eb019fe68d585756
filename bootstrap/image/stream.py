"""One stream wrapper that counts, hashes, bounds and tees the bytes passing through it.

:class:`Digesting` wraps a binary stream on its read side (``read``/``readinto``) or its write
side (``write``): every byte that passes is counted (``count``), fed to a hashlib object when an
algorithm is given (``digest()`` is then ``ALG:HEX``), handed to ``tee`` when one is given, and
at most ``limit`` bytes are read from the wrapped stream. It takes the place of hand-written
counters, hashers, tees and length limits wherever layers, blobs and archives are streamed.
Nothing here raises of its own; the wrapped stream's errors propagate unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bootstrap.image.model import DIGEST_ALGORITHMS


class Digesting:
    """``raw`` seen through a counter (``count``), an optional hash (``algorithm``, one of
    ``DIGEST_ALGORITHMS``), an optional ``tee(chunk)`` called with every chunk read or written,
    and on the read side an optional ``limit`` (bytes of ``raw`` read at most; then end of
    stream)."""

    __slots__ = ("_hash", "_left", "_raw", "_tee", "algorithm", "count")

    def __init__(
        self,
        raw: Any,
        *,
        algorithm: str | None = None,
        limit: int | None = None,
        tee: Callable[[bytes], object] | None = None,
    ) -> None:
        self._raw = raw
        self.algorithm = algorithm
        self._hash = DIGEST_ALGORITHMS[algorithm]() if algorithm else None
        self._left = limit
        self._tee = tee
        self.count = 0

    def _seen(self, data: bytes | memoryview) -> None:
        self.count += len(data)
        if self._hash is not None:
            self._hash.update(data)
        if self._tee is not None and data:
            self._tee(bytes(data))

    def digest(self) -> str:
        """``ALG:HEX`` of every byte seen so far (only with an ``algorithm``)."""
        assert self._hash is not None, "Digesting without an algorithm has no digest"
        return f"{self.algorithm}:{self._hash.hexdigest()}"

    @property
    def hasher(self) -> Any:
        """The hashlib object (None without an ``algorithm``)."""
        return self._hash

    # -- read side

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes of ``raw`` (all that is left with ``size`` < 0), within the
        ``limit``."""
        if self._left is not None:
            if size is None or size < 0 or size > self._left:
                size = self._left
            if not size:
                return b""
        data: bytes = self._raw.read(size)
        if self._left is not None:
            self._left -= len(data)
        self._seen(data)
        return data

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """As ``io.RawIOBase.readinto`` (gzip's buffered reader uses it)."""
        view = memoryview(buffer)
        if self._left is not None:
            view = view[: self._left]
            if not len(view):
                return 0
        readinto = getattr(self._raw, "readinto", None)
        if readinto is not None:
            n: int = readinto(view) or 0
        else:
            data = self._raw.read(len(view))
            n = len(data)
            view[:n] = data
        if self._left is not None:
            self._left -= n
        self._seen(view[:n])
        return n

    def readable(self) -> bool:
        return True

    # -- write side

    def write(self, data: Any) -> int:
        """Pass ``data`` on to ``raw`` whole; returns its length in bytes."""
        view = memoryview(data).cast("B")
        size = view.nbytes
        self._seen(view)
        while view:
            written = self._raw.write(view)
            view = view[written if written is not None else len(view) :]
        return size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        flush = getattr(self._raw, "flush", None)
        if flush is not None:
            flush()
