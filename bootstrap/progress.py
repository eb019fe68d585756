"""Progress reporting for long transfers, always on stderr (never stdout: that is for results).

:class:`Progress` is the interface stages call: ``add`` a task (e.g. one blob) with its total
size, ``advance`` it by bytes as they arrive, ``done`` when finished. Implementations are
thread-safe (layers download in parallel). :func:`make_progress` picks bars drawn with ``rich``
when ``Settings.progress`` is true (stderr is a TTY, not quiet, not ``--json``), otherwise plain
log lines at INFO, one per finished task.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bootstrap.settings import Settings

log = logging.getLogger("bootstrap.progress")


_IMPORTED = time.monotonic()


def waited() -> float:
    """Seconds since this process started (what a user running a command has waited so far,
    interpreter start-up included): the kernel's start time of the process against the boot
    clock, 10 ms resolution; where /proc cannot say, since this module was imported."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        ticks = int(fields[19])  # field 22, starttime, counted after "pid (comm)"
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return max(0.0, now - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def human_size(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units, as registries and skopeo print)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def counted(n: int, noun: str, plural: str = "") -> str:
    """``counted(1, "layer")`` -> ``"1 layer"``, ``counted(2, "layer")`` -> ``"2 layers"``
    (``plural`` when adding an "s" is wrong)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


class Progress:
    """Interface, and the silent implementation. Keys are caller-chosen strings (a digest)."""

    def add(self, key: str, total: int, label: str) -> None:
        """Announce a task of ``total`` bytes shown as ``label``."""

    def advance(self, key: str, n: int) -> None:
        """``n`` more bytes of ``key`` arrived."""

    def done(self, key: str, note: str = "") -> None:
        """``key`` finished; ``note`` says how (e.g. "already present")."""

    def close(self) -> None:
        """Stop drawing; further calls are ignored."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LogProgress(Progress):
    """One INFO log line per finished task (label, size, rate): for pipes, files and CI logs."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[str, int, float]] = {}
        self._got: dict[str, int] = {}

    def add(self, key: str, total: int, label: str) -> None:
        with self._lock:
            self._tasks[key] = (label, total, time.monotonic())
            self._got[key] = 0

    def advance(self, key: str, n: int) -> None:
        with self._lock:
            self._got[key] = self._got.get(key, 0) + n

    def done(self, key: str, note: str = "") -> None:
        with self._lock:
            label, total, started = self._tasks.pop(key, (key, 0, time.monotonic()))
            got = self._got.pop(key, 0)
        if note:
            self._log.info("%s: %s", label, note)
            return
        elapsed = max(time.monotonic() - started, 1e-6)
        self._log.info(
            "%s: %s in %.1fs (%s/s)",
            label,
            human_size(got or total),
            elapsed,
            human_size(got / elapsed),
        )


class RichProgress(Progress):
    """Live bars on stderr, one per task, drawn by ``rich``."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as _Bars

        self._bars: Any = _Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=False,
        )
        self._ids: dict[str, tuple[Any, int, str]] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    def add(self, key: str, total: int, label: str) -> None:
        with self._lock:
            if self._closed:
                return
            if not self._started:
                self._bars.start()
                self._started = True
            self._ids[key] = (self._bars.add_task(label, total=total), total, label)

    def advance(self, key: str, n: int) -> None:
        entry = self._ids.get(key)
        if entry is not None and not self._closed:
            self._bars.advance(entry[0], n)

    def done(self, key: str, note: str = "") -> None:
        entry = self._ids.get(key)
        if entry is None or self._closed:
            return
        task, total, label = entry
        self._bars.update(task, completed=total, description=f"{label} ({note})" if note else label)

    def close(self) -> None:
        with self._lock:
            if self._started and not self._closed:
                self._bars.stop()
            self._closed = True


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The CLI's log handler: one line per record on stderr, except transient records
    (``extra={"transient": True}``: retries, waits), which are shown by ``transient_mode``:

    - ``"line"``: as ordinary lines (``-v``);
    - ``"status"``: as one status line redrawn in place (a TTY at normal verbosity), erased
      before the next ordinary line and by :meth:`clear`;
    - ``"once"``: one ordinary line per ``record.once_key`` (e.g. per host), its
      ``record.once_text`` when it has one (pipes and files at normal verbosity: a wait is
      said, once, even where nothing can be redrawn);
    - ``"hide"``: not at all (``-q``).
    """

    def __init__(self, transient_mode: str = "hide") -> None:
        super().__init__(sys.stderr)
        self.transient_mode = transient_mode
        self._status_shown = False
        self._said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        transient = bool(getattr(record, "transient", False))
        if transient and self.transient_mode == "hide":
            return
        if transient and self.transient_mode == "once":
            key = str(getattr(record, "once_key", record.getMessage()))
            with self._status_lock:
                if key in self._said:
                    return
                self._said.add(key)
            once = getattr(record, "once_text", None)
            if once is not None:
                record = logging.makeLogRecord({**record.__dict__, "msg": once, "args": ()})
            transient = False
        try:
            text = self.format(record)
            with self._status_lock:
                if transient and self.transient_mode == "status":
                    width = shutil.get_terminal_size((80, 24)).columns - 1
                    self.stream.write("\r\x1b[K" + " ".join(text.split())[:width])
                    self._status_shown = True
                else:
                    self._erase()
                    self.stream.write(text + self.terminator)
                self.flush()
        except Exception:  # logging must never raise into the caller
            self.handleError(record)

    def clear(self) -> None:
        """Erase the status line, if one is shown."""
        with self._status_lock:
            self._erase()
            self.flush()

    @property
    def _status_lock(self) -> threading.RLock:
        return self.lock or _FALLBACK_LOCK

    def _erase(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False


_FALLBACK_LOCK = threading.RLock()


def make_progress(settings: Settings) -> Progress:
    """Bars when ``settings.progress``, else log lines (INFO; hidden by ``-q``)."""
    if settings.progress:
        return RichProgress()
    return LogProgress()
