"""A CRI v1 client over a unix socket (grpcio + the generated stubs beside this module).

What goes in: the path of a CRI daemon's socket (``/run/containerd/containerd.sock``,
``/run/crio/crio.sock``). What comes out: frozen dataclasses (:class:`CriVersion`,
:class:`CriStatus` with its :class:`CriCondition` list, :class:`CriImage`). Every failed call
raises :class:`CriError` (a :class:`~bootstrap.errors.SystemdError`, exit 5) whose message names
the call, the socket and what happened; grpc exceptions never leave this module.

:func:`wait_for_cri` is how ``bootstrap up`` decides that a CRI daemon is ready: ``Version``
answers and ``Status`` reports ``RuntimeReady`` (and ``NetworkReady`` when asked), polled with a
fresh channel per attempt (a gRPC channel whose first connect failed backs off a second or more
before it tries again).

Import cost: grpc and the stubs (~100 ms); only the commands that talk to a CRI daemon import
this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from bootstrap.cri import api_pb2, api_pb2_grpc
from bootstrap.errors import SystemdError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
"""Seconds one call may take (its gRPC deadline) unless the client is given another."""
MAX_MESSAGE = 16 << 20
"""Largest response accepted, as the kubelet's (``ListImages`` on a full node is large)."""

RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"


class CriError(SystemdError):
    """A CRI call failed: the socket is missing or refuses, the call timed out, the daemon
    answered with an error, or it does not speak CRI v1. ``code`` is the gRPC status name
    (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...)."""

    def __init__(self, message: str, hint: str = "", code: str = "", reason: str = "") -> None:
        super().__init__(message, hint)
        self.code = code
        self.reason = reason or message


@dataclass(frozen=True)
class CriVersion:
    """A ``VersionResponse``."""

    version: str
    runtime_name: str
    runtime_version: str
    runtime_api_version: str

    def __str__(self) -> str:
        return f"{self.runtime_name} {self.runtime_version} (CRI {self.runtime_api_version})"


@dataclass(frozen=True)
class CriCondition:
    """One ``RuntimeCondition``: ``type`` (``RuntimeReady``, ``NetworkReady``, ...), whether it
    holds, and the daemon's reason and message when it does not."""

    type: str
    status: bool
    reason: str = ""
    message: str = ""

    def __str__(self) -> str:
        text = f"{self.type} {'true' if self.status else 'false'}"
        why = self.message or self.reason
        return f"{text}: {why}" if why and not self.status else text


@dataclass(frozen=True)
class CriStatus:
    """A ``StatusResponse``'s runtime conditions, in the daemon's order."""

    conditions: tuple[CriCondition, ...]

    def condition(self, type: str) -> CriCondition | None:
        """The condition named ``type``; None when the daemon does not report it."""
        return next((c for c in self.conditions if c.type == type), None)

    @property
    def runtime_ready(self) -> bool:
        c = self.condition(RUNTIME_READY)
        return c is not None and c.status

    @property
    def network_ready(self) -> bool:
        c = self.condition(NETWORK_READY)
        return c is not None and c.status

    def not_ready(self, *, network: bool) -> str:
        """What keeps the daemon from being ready, in one line (``NetworkReady false: cni
        plugin not initialized``, ``RuntimeReady not reported``); "" when RuntimeReady holds (and
        NetworkReady, when ``network``)."""
        for name in (RUNTIME_READY, NETWORK_READY) if network else (RUNTIME_READY,):
            c = self.condition(name)
            if c is None:
                return f"{name} not reported"
            if not c.status:
                return str(c)
        return ""


@dataclass(frozen=True)
class CriImage:
    """An image the CRI daemon holds (``ImageStatus``/``ListImages``)."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int

    def holds(self, digest: str) -> bool:
        """Whether one of the repo digests is ``digest`` (``sha256:...``, a manifest digest)."""
        return any(d.rpartition("@")[2] == digest for d in self.repo_digests)


@dataclass(frozen=True)
class CriReady:
    """What :func:`wait_for_cri` saw: the version, the status that satisfied it, and seconds
    from the call until ``Version`` first answered and until the daemon was ready."""

    version: CriVersion
    status: CriStatus
    answered_after: float
    ready_after: float

    def __str__(self) -> str:
        return str(self.version)


def _target(socket: str | Path) -> str:
    return f"unix://{os.path.abspath(socket)}"


def _short(details: str) -> str:
    """gRPC's connect failure text ends in the OS error; keep that part."""
    if "connect failed" in details and "error: " in details:
        return details.rsplit("error: ", 1)[1]
    return details


class CriClient:
    """Calls on one CRI daemon's unix ``socket``; each call's deadline is ``timeout`` seconds.

    A context manager (closes its channel); connecting happens at the first call, so a missing
    socket is a :class:`CriError` from that call, not from the constructor."""

    def __init__(self, socket: str | Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = str(socket)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(
            _target(socket),
            options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.enable_http_proxy", 0),
            ],
        )
        self._runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        self._images = api_pb2_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: str, call: Callable[..., Any], request: Any) -> Any:
        try:
            return call(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(method, exc) from None

    def _error(self, method: str, exc: grpc.RpcError) -> CriError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = str(exc.details() or "") if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        hint = "check the CRI daemon's journal (journalctl -u UNIT) and its socket path"
        if code == grpc.StatusCode.UNAVAILABLE:
            reason = f"cannot connect: {_short(details)}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            reason = f"no answer within {self.timeout:g}s"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            reason = f"not implemented ({details or 'no details'})"
            hint = "the socket must be a CRI v1 runtime's (containerd >= 1.5, CRI-O >= 1.20)"
        else:
            reason = f"{name}: {details}"
        return CriError(f"CRI {method} on {self.socket}: {reason}", hint, name, reason)

    def version(self) -> CriVersion:
        """``Version``. Raises :class:`CriError`."""
        r = self._call("Version", self._runtime.Version, api_pb2.VersionRequest(version="v1"))
        return CriVersion(
            str(r.version),
            str(r.runtime_name),
            str(r.runtime_version),
            str(r.runtime_api_version),
        )

    def status(self) -> CriStatus:
        """``Status``: the runtime conditions. Raises :class:`CriError`."""
        r = self._call("Status", self._runtime.Status, api_pb2.StatusRequest())
        return CriStatus(
            tuple(
                CriCondition(str(c.type), bool(c.status), str(c.reason), str(c.message))
                for c in r.status.conditions
            )
        )

    def image_status(self, ref: str) -> CriImage | None:
        """``ImageStatus`` of ``ref`` (``name:tag``, ``name@digest`` or an image id): the image,
        or None when the daemon does not hold it. Raises :class:`CriError`."""
        request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
        try:
            r = self._images.ImageStatus(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self._error("ImageStatus", exc) from None
        if not r.HasField("image") or not r.image.id:
            return None
        return _image(r.image)

    def list_images(self) -> tuple[CriImage, ...]:
        """``ListImages``: every image the daemon holds. Raises :class:`CriError`."""
        r = self._call("ListImages", self._images.ListImages, api_pb2.ListImagesRequest())
        return tuple(_image(i) for i in r.images)


def _image(i: Any) -> CriImage:
    return CriImage(
        str(i.id), tuple(map(str, i.repo_tags)), tuple(map(str, i.repo_digests)), int(i.size)
    )


def wait_for_cri(
    socket: str | Path,
    *,
    timeout: float,
    network: bool,
    what: str = "the CRI daemon",
    interval: float = 0.25,
) -> CriReady:
    """Poll the CRI daemon on ``socket`` until ``Version`` answers and ``Status`` says
    RuntimeReady (and NetworkReady when ``network``); each attempt opens a fresh channel.

    Returns a :class:`CriReady`. Raises :class:`~bootstrap.errors.SystemdError` (exit 5) when
    ``timeout`` seconds pass, its message saying what was missing at the last attempt: no answer
    (and why), or the first condition not met (``NetworkReady false: cni plugin not
    initialized``)."""
    started = time.monotonic()
    deadline = started + timeout
    answered: float | None = None
    last = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        try:
            with CriClient(socket, timeout=max(0.5, min(5.0, remaining))) as client:
                version = client.version()
                if answered is None:
                    answered = time.monotonic() - started
                    log.debug("%s answers on %s: %s", what, socket, version)
                status = client.status()
        except CriError as exc:
            last = exc.reason if answered is None else exc.message
        else:
            missing = status.not_ready(network=network)
            if not missing:
                return CriReady(version, status, answered, time.monotonic() - started)
            last = missing
            log.debug("%s on %s: %s", what, socket, missing)
        if time.monotonic() >= deadline:
            raise _not_ready(socket, timeout, what, answered is not None, last)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def _not_ready(
    socket: str | Path, timeout: float, what: str, answered: bool, last: str
) -> SystemdError:
    if not answered:
        return SystemdError(
            f"{what} does not answer CRI Version on {socket} after {timeout:g}s: {last}",
            "check the daemon's journal (journalctl -u UNIT) and its CRI socket path",
        )
    if last.startswith(NETWORK_READY):
        hint = (
            "the daemon needs a CNI config (e.g. /etc/cni/net.d/*.conflist) and the plugins it "
            "names (e.g. /opt/cni/bin); check both and the daemon's journal"
        )
    else:
        hint = "check the daemon's journal (journalctl -u UNIT)"
    return SystemdError(f"{what} on {socket} is not ready after {timeout:g}s: {last}", hint)
