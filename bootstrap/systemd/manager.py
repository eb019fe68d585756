"""systemd's manager over D-Bus (pydbus, ``org.freedesktop.systemd1``). No ``systemctl``.

The bus is the system bus unless ``$BOOTSTRAP_DBUS_ADDRESS`` (or ``$DBUS_SYSTEM_BUS_ADDRESS``)
names another (e.g. ``unix:path=/proc/PID/root/run/dbus/system_bus_socket`` for a node).
Every D-Bus failure becomes a :class:`SystemdError` (exit 5).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from bootstrap.errors import SystemdError
from bootstrap.process import run
from bootstrap.settings import seconds_from_env

log = logging.getLogger(__name__)

SERVICE = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER_IFACE = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SERVICE_IFACE = "org.freedesktop.systemd1.Service"

#: How long a started unit must stay active before it counts as up (seconds). A container whose
#: process exits at once leaves ``active`` within this time. ``$BOOTSTRAP_SETTLE_SECONDS``.
DEFAULT_SETTLE = 3.0
DEFAULT_JOB_TIMEOUT = 120.0

T = TypeVar("T")


@dataclass(frozen=True)
class UnitState:
    """A unit's state as systemd reports it (``load_state`` ``not-found`` when unknown)."""

    name: str
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    exec_main_status: int
    n_restarts: int
    result: str
    unit_file_state: str
    #: the service's ``Type=`` (``simple``, ``notify``, ...); "" for a unit that is not a service
    service_type: str = ""

    @property
    def notify(self) -> bool:
        """True for a ``Type=notify`` service: its start job ends only once it sent READY=1."""
        return self.service_type in ("notify", "notify-reload")

    @property
    def running(self) -> bool:
        """True while the unit is active or on its way (activating, reloading)."""
        return self.active_state in ("active", "activating", "reloading")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bus_address() -> str | None:
    """The D-Bus address to use, or None for the default system bus."""
    return os.environ.get("BOOTSTRAP_DBUS_ADDRESS") or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")


def settle_seconds() -> float:
    """Seconds a started unit must stay active (``$BOOTSTRAP_SETTLE_SECONDS``, default 3)."""
    return seconds_from_env("BOOTSTRAP_SETTLE_SECONDS", DEFAULT_SETTLE)


def journal_tail(unit: str, lines: int = 10) -> list[str]:
    """The unit's last journal lines (``journalctl -u UNIT -n N -o cat``); [] when unreadable."""
    proc = run(
        ["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
        check=False,
        timeout=15,
    )
    text = proc.stdout.decode(errors="replace").strip()
    return [line for line in text.splitlines() if line.strip()][-lines:]


class Manager:
    """systemd's manager object. Construct, then call; methods raise :class:`SystemdError`."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else bus_address()
        try:
            import pydbus
            from gi.repository import GLib

            self._glib: Any = GLib
            self._bus: Any = pydbus.connect(self.address) if self.address else pydbus.SystemBus()
            self._systemd: Any = self._bus.get(SERVICE, MANAGER_PATH)
        except Exception as exc:
            where = self.address or "the system bus"
            raise SystemdError(
                f"cannot reach systemd over D-Bus at {where}: {_gerror(exc)}",
                "is systemd running with dbus? set BOOTSTRAP_DBUS_ADDRESS to use another bus",
            ) from exc
        self._removed: dict[str, str] = {}
        self._subscribed = False

    # ---- plain calls -------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            raise SystemdError(f"systemd {what}: {_gerror(exc)}", "see journalctl -xe") from exc

    def reload(self) -> None:
        """Reload unit files (``daemon-reload``); returns once systemd has reloaded."""
        self._call("Reload", lambda: self._systemd.Reload())

    def enable(self, unit_files: Sequence[str]) -> None:
        """Enable unit files (names or paths) persistently, replacing conflicting symlinks."""
        self._call(
            "EnableUnitFiles", lambda: self._systemd.EnableUnitFiles(list(unit_files), False, True)
        )

    def disable(self, unit_files: Sequence[str]) -> None:
        """Disable unit files (names)."""
        self._call(
            "DisableUnitFiles", lambda: self._systemd.DisableUnitFiles(list(unit_files), False)
        )

    def reset_failed(self, unit: str) -> None:
        """Forget a unit's failed state (no error when the unit is unknown)."""
        try:
            self._systemd.ResetFailedUnit(unit)
        except Exception as exc:
            if "NoSuchUnit" not in str(exc) and "not loaded" not in str(exc):
                raise SystemdError(f"systemd ResetFailedUnit {unit}: {_gerror(exc)}") from exc

    def state(self, unit: str) -> UnitState:
        """The unit's current state (``load_state`` ``not-found`` when systemd has no such unit)."""

        def _get() -> UnitState:
            path = str(self._systemd.LoadUnit(unit))
            u = self._properties(path, UNIT_IFACE)
            load_state = str(u["LoadState"])
            service = load_state == "loaded" and unit.endswith(".service")
            s = self._properties(path, SERVICE_IFACE) if service else {}
            return UnitState(
                name=unit,
                load_state=load_state,
                active_state=str(u["ActiveState"]),
                sub_state=str(u["SubState"]),
                main_pid=int(s.get("MainPID", 0)),
                exec_main_status=int(s.get("ExecMainStatus", 0)),
                n_restarts=int(s.get("NRestarts", 0)),
                result=str(s.get("Result", "")),
                unit_file_state=str(u["UnitFileState"]),
                service_type=str(s.get("Type", "")),
            )

        return self._call(f"state of {unit}", _get)

    def _properties(self, path: str, iface: str) -> dict[str, Any]:
        """Every property of ``iface`` on the object ``path``, in one ``GetAll`` round trip
        (a pydbus proxy would introspect the object and then fetch each property alone)."""
        glib = self._glib
        reply = self._bus.con.call_sync(
            SERVICE,
            path,
            "org.freedesktop.DBus.Properties",
            "GetAll",
            glib.Variant("(s)", (iface,)),
            glib.VariantType.new("(a{sv})"),
            0,
            -1,
            None,
        )
        return dict(reply.unpack()[0])

    # ---- jobs --------------------------------------------------------------------------------

    def start(
        self, unit: str, *, timeout: float = DEFAULT_JOB_TIMEOUT, settle: float | None = None
    ) -> UnitState:
        """Start ``unit``, wait for its job, then for it to stay active ``settle`` seconds.

        Raises :class:`SystemdError` with the unit's last journal lines when the job fails, times
        out, or the unit leaves ``active`` (exits, restarts) while settling."""
        return self._run_job("StartUnit", unit, timeout, settle)

    def restart(
        self, unit: str, *, timeout: float = DEFAULT_JOB_TIMEOUT, settle: float | None = None
    ) -> UnitState:
        """Restart ``unit`` (start it if stopped); waits like :meth:`start`."""
        return self._run_job("RestartUnit", unit, timeout, settle)

    def stop(self, unit: str, *, timeout: float = DEFAULT_JOB_TIMEOUT) -> None:
        """Stop ``unit`` and wait for the job; a unit systemd does not know is already stopped."""
        if self.state(unit).load_state == "not-found":
            return
        self._run_job("StopUnit", unit, timeout, 0.0)

    def _run_job(self, method: str, unit: str, timeout: float, settle: float | None) -> UnitState:
        with self._job_signals():
            job = self._call(
                f"{method} {unit}", lambda: getattr(self._systemd, method)(unit, "replace")
            )
            result = self._wait_job(str(job), timeout)
        if result != "done":
            raise self._failure(unit, f"{method} job ended with result '{result}'")
        if method == "StopUnit":
            return self.state(unit)
        return self._settle(unit, settle_seconds() if settle is None else settle)

    @contextmanager
    def _job_signals(self) -> Iterator[None]:
        if not self._subscribed:
            try:
                self._systemd.Subscribe()
            except Exception as exc:
                # the bus connection is shared per process: another Manager subscribed it
                if "lreadySubscribed" not in str(exc) and "already subscribed" not in str(exc):
                    raise SystemdError(f"systemd Subscribe: {_gerror(exc)}") from exc
            self._systemd.JobRemoved.connect(self._on_job_removed)
            self._subscribed = True
        self._removed.clear()
        yield

    def _on_job_removed(self, job_id: int, job: str, unit: str, result: str) -> None:
        self._removed[str(job)] = str(result)

    def _wait_job(self, job: str, timeout: float) -> str:
        """The result of ``job`` from its ``JobRemoved`` signal: blocks in the GLib main loop
        until a signal arrives (woken at least every 0.5 s to check the deadline and, every 2 s,
        that the job still exists, so a lost signal cannot hang us); the result string, or
        ``timeout (...)`` once ``timeout`` seconds have passed."""
        glib = self._glib
        ctx = glib.MainContext.default()
        deadline = time.monotonic() + timeout
        last_probe = time.monotonic()
        while True:
            while ctx.pending():
                ctx.iteration(False)
            if job in self._removed:
                return self._removed[job]
            now = time.monotonic()
            if now >= deadline:
                return "timeout (bootstrap gave up waiting)"
            if now - last_probe > 2.0:  # a lost signal must not hang us: is the job still there?
                last_probe = now
                if not self._job_exists(job):
                    while ctx.pending():
                        ctx.iteration(False)
                    return self._removed.get(job, "done")
            fired: list[bool] = []

            def _wake(fired: list[bool] = fired) -> bool:
                fired.append(True)
                return False  # one-shot

            wake_ms = max(1, int(min(0.5, deadline - now) * 1000))
            source = glib.timeout_add(wake_ms, _wake)
            ctx.iteration(True)  # until the signal (or the wake-up) is dispatched
            if not fired:
                glib.source_remove(source)

    def _job_exists(self, job: str) -> bool:
        try:
            jobs = self._systemd.ListJobs()
        except Exception:
            return True
        return any(str(j[4]) == job for j in jobs)

    def _settle(self, unit: str, settle: float) -> UnitState:
        deadline = time.monotonic() + settle
        st = first = self.state(unit)
        while True:
            if st.active_state != "active":
                raise self._failure(unit, f"unit is {st.active_state} ({st.sub_state})", st)
            if st.n_restarts != first.n_restarts:
                raise self._failure(unit, "unit restarted while settling", st)
            if time.monotonic() >= deadline:
                return st
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            st = self.state(unit)

    def _failure(self, unit: str, what: str, st: UnitState | None = None) -> SystemdError:
        st = st or self.state(unit)
        detail = f"{unit}: {what}"
        if st.result == "timeout":
            detail += ", result timeout (not ready within TimeoutStartSec, or not stopped in time)"
        elif st.result and st.result != "success":
            detail += f", result {st.result}"
        if st.exec_main_status:
            detail += f", main process exited {st.exec_main_status}"
        lines = journal_tail(unit)
        if lines:
            detail += "; last journal lines: " + " | ".join(lines)
        if st.result == "timeout":
            return UnitTimeoutError(
                detail,
                f"journalctl -u {unit}; a container that needs longer to get ready: raise "
                "startTimeout in its manifest.json",
            )
        return SystemdError(detail, f"journalctl -u {unit}")


class UnitTimeoutError(SystemdError):
    """A unit failed with result ``timeout``: it did not start (a ``notify`` unit: send
    READY=1) within ``TimeoutStartSec=``, or did not stop within ``TimeoutStopSec=``."""


def _gerror(exc: BaseException) -> str:
    """The message of a GLib.Error (without its domain prefix), else str(exc)."""
    msg = getattr(exc, "message", None) or str(exc)
    return " ".join(str(msg).split())
