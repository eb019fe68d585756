"""A minimal CRI client: the ``runtime.v1.RuntimeService/Version`` call over a unix socket.

Only the standard library: one unary gRPC call over HTTP/2 without TLS (h2c, "prior knowledge")
is a handful of frames — the client preface, SETTINGS, a HEADERS frame with literal HPACK fields
(no Huffman coding, no dynamic table), a DATA frame with the length-prefixed protobuf request.
The response's DATA frame carries a ``VersionResponse`` (four string fields); a failed call is
answered with trailers only (``grpc-status`` != 0) and no DATA, which is reported as not ready.
Response headers are not decoded (that would need an HPACK decoder): success is "a complete
``VersionResponse`` arrived on our stream".

:func:`wait_for_cri` is how ``bootstrap up`` decides that a CRI daemon is ready: it polls a
fresh connection until ``Version`` answers or the deadline passes.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from bootstrap.errors import SystemdError

log = logging.getLogger(__name__)

VERSION_METHOD = "/runtime.v1.RuntimeService/Version"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
MAX_FRAME = 1 << 20
MAX_RESPONSE = 1 << 16


@dataclass(frozen=True)
class CriVersion:
    """A ``VersionResponse``."""

    version: str
    runtime_name: str
    runtime_version: str
    runtime_api_version: str

    def __str__(self) -> str:
        return f"{self.runtime_name} {self.runtime_version} (CRI {self.runtime_api_version})"


class CriError(Exception):
    """The call failed: connection refused, protocol error, no response, non-OK status."""


def version(path: str | Path, *, timeout: float = 5.0) -> CriVersion:
    """Call ``Version`` on the CRI socket at ``path``. Raises :class:`CriError` on any failure
    (the message says what happened)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(_request())
            return _read_response(sock, time.monotonic() + timeout)
    except OSError as exc:
        raise CriError(f"{path}: {exc.strerror or exc}") from exc


def wait_for_cri(
    path: str | Path, *, timeout: float, interval: float = 0.25, what: str = "the CRI daemon"
) -> CriVersion:
    """Poll :func:`version` on ``path`` until it answers; return the answer.

    Raises :class:`~bootstrap.errors.SystemdError` (exit 5) naming the socket and the last
    failure when ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            answer = version(path, timeout=max(0.5, min(5.0, remaining)))
        except CriError as exc:
            if time.monotonic() >= deadline:
                raise SystemdError(
                    f"{what} does not answer CRI Version on {path} after {timeout:g}s: {exc}",
                    "check the daemon's journal (journalctl -u UNIT) and its CRI socket path",
                ) from exc
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            continue
        log.info("%s answers on %s: %s", what, path, answer)
        return answer


# ---- the wire ----------------------------------------------------------------------------------


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header field as "literal without indexing, new name", strings without Huffman."""
    return b"\x00" + _hpack_string(name.encode()) + _hpack_string(value.encode())


def _hpack_string(data: bytes) -> bytes:
    return _hpack_int(len(data), 7) + data


def _hpack_int(value: int, prefix: int) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([value])
    out = [limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _request() -> bytes:
    headers = b"".join(
        _hpack_literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", VERSION_METHOD),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "bootstrap-cri-probe"),
        )
    )
    message = b"\x0a\x02v1"  # VersionRequest{version: "v1"}
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return (
        PREFACE
        + _frame(SETTINGS, 0, 0, b"")
        + _frame(HEADERS, END_HEADERS, 1, headers)
        + _frame(DATA, END_STREAM, 1, body)
    )


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    chunks = []
    while n > 0:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise CriError("connection closed before the response was complete")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_response(sock: socket.socket, deadline: float) -> CriVersion:
    data = b""
    while True:
        if time.monotonic() > deadline:
            raise CriError("no response in time")
        header = _recv_exact(sock, 9, deadline)
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
        if length > MAX_FRAME:
            raise CriError(f"frame of {length} bytes is too large")
        payload = _recv_exact(sock, length, deadline)
        if kind == SETTINGS and not flags & ACK:
            sock.sendall(_frame(SETTINGS, ACK, 0, b""))
        elif kind == PING and not flags & ACK:
            sock.sendall(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            raise CriError("the server closed the connection (GOAWAY)")
        elif kind == RST_STREAM and stream == 1:
            code = int.from_bytes(payload[:4], "big")
            raise CriError(f"the server reset the call (HTTP/2 error {code})")
        elif kind == DATA and stream == 1:
            if flags & PADDED:
                pad = payload[0]
                payload = payload[1 : len(payload) - pad]
            data += payload
            if len(data) > MAX_RESPONSE:
                raise CriError("response too large")
            if len(data) >= 5:
                size = int.from_bytes(data[1:5], "big")
                if data[0] != 0:
                    raise CriError("compressed responses are not supported")
                if len(data) >= 5 + size:
                    return _decode_version(data[5 : 5 + size])
        elif kind == HEADERS and stream == 1 and flags & END_STREAM:
            raise CriError("the call failed (gRPC status in trailers; is this a CRI v1 socket?)")


def _decode_version(message: bytes) -> CriVersion:
    """Decode a ``VersionResponse`` (fields 1-4, strings); unknown fields are skipped."""
    fields = {1: "", 2: "", 3: "", 4: ""}
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            size, i = _varint(message, i)
            value = message[i : i + size]
            i += size
            if number in fields:
                fields[number] = value.decode("utf-8", errors="replace")
        elif wire == 0:
            _, i = _varint(message, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise CriError(f"cannot decode the response (wire type {wire})")
    if i != len(message):
        raise CriError("truncated response")
    return CriVersion(fields[1], fields[2], fields[3], fields[4])


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise CriError("truncated response")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
