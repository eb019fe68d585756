"""A fault-injecting HTTP forwarder for registry tests.

:class:`FaultProxy` listens on ``127.0.0.1:PORT`` (plain HTTP, or HTTPS with a given
certificate) and forwards each request to an upstream registry, passing the client's headers
(``Host`` included, ``Range`` and ``Authorization`` too) and streaming the answer back, unless a
:class:`Fault` whose ``path`` regex matches the request says otherwise. Faults, each applied
``times`` times (-1: always), counted in body bytes of the answer it applies to:

``reset``     send headers and ``after`` body bytes, then abort the connection (TCP RST)
``truncate``  send headers (full Content-Length) and ``after`` bytes, then close cleanly
``flip``      invert the body byte at offset ``after`` (content no longer matches its digest)
``stall``     send headers and ``after`` bytes, then send nothing for ``seconds`` (slow loris)
``delay``     wait ``seconds`` before answering at all (no headers)
``status``    answer ``status`` (JSON error body; ``Retry-After: retry_after`` if set) without
              asking the upstream
``norange``   drop the ``Range`` header before forwarding (the upstream answers 200, whole)

Every request is recorded (:attr:`FaultProxy.requests`); :meth:`FaultProxy.count` counts those
whose path matches a regex, so tests can assert "each blob was fetched once".
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.tls import serve_tls

KINDS = ("reset", "truncate", "flip", "stall", "delay", "status", "norange")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}
BLOB_PATH = r"/blobs/sha256:"
MANIFEST_PATH = r"/manifests/"


@dataclass
class Fault:
    """One programmed fault (see the module docstring)."""

    kind: str
    path: str
    times: int = 1
    after: int = 0
    status: int = 500
    retry_after: str | None = None
    seconds: float = 30.0
    method: str | None = "GET"
    hits: int = 0


@dataclass(frozen=True)
class Recorded:
    """One request through the proxy: what was asked and what was done."""

    method: str
    path: str
    range: str | None
    status: int
    sent: int  # body bytes sent to the client
    fault: str | None  # the fault kind applied, if any
    time: float


class FaultProxy:
    """The forwarder. ``upstream`` is ``host:port``; ``upstream_tls`` a CA file to verify the
    upstream's HTTPS (None: plain HTTP upstream); ``tls`` a (cert, key) pair to serve HTTPS.
    It listens on ``address``:``port`` (0: any free port); on the scheme's default port (80,
    443) :attr:`host` has no ``:port``."""

    def __init__(
        self,
        upstream: str,
        *,
        upstream_ca: Path | None = None,
        tls: tuple[Path, Path] | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.address = address
        self.upstream_ca = upstream_ca
        self.tls = tls
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self.port = port
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_registry(cls, reg: Any) -> FaultProxy:
        """A proxy in front of a :class:`tests.harness.registry.Registry` (same scheme and
        server certificate)."""
        return cls(reg.host, upstream_ca=reg.ca_cert, tls=reg.server_cert)

    # --- addresses
    @property
    def host(self) -> str:
        if self.port == (443 if self.tls else 80):
            return self.address
        return f"{self.address}:{self.port}"

    @property
    def url(self) -> str:
        return ("https" if self.tls else "http") + f"://{self.host}"

    def ref(self, name: str, tag: str = "latest") -> str:
        sep = "@" if tag.startswith(("sha256:", "sha512:")) else ":"
        return f"{self.host}/{name}{sep}{tag}"

    # --- faults and records
    def add(self, kind: str, path: str, **kw: Any) -> Fault:
        """Program a fault (``kind`` one of :data:`KINDS`) for paths matching ``path``."""
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r}: expected one of {KINDS}")
        fault = Fault(kind, path, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def count(self, path: str | None = None, method: str | None = "GET") -> int:
        """How many requests (of ``method``; None: any) had a path matching ``path``."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method)
                and (path is None or re.search(path, r.path))
            )

    def matching(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if re.search(path, r.path)]

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times == 0 or (fault.method and fault.method != method):
                    continue
                if re.search(fault.path, path):
                    if fault.times > 0:
                        fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    # --- lifecycle
    def start(self) -> FaultProxy:
        if self._httpd is not None:
            return self
        self._stop.clear()
        handler = type("FaultHandler", (_Handler,), {"proxy": self})
        httpd = ThreadingHTTPServer((self.address, self.port), handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            serve_tls(httpd, self.tls)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _upstream(self) -> http.client.HTTPConnection:
        host, port = self.proxy.upstream.rsplit(":", 1)
        if self.proxy.upstream_ca is not None:
            ctx = ssl.create_default_context(cafile=str(self.proxy.upstream_ca))
            return http.client.HTTPSConnection(host, int(port), timeout=60, context=ctx)
        return http.client.HTTPConnection(host, int(port), timeout=60)

    def _abort(self) -> None:
        """Reset the connection (RST, no FIN)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.close()

    def _hangup(self) -> None:
        """Close cleanly after what was sent (FIN)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _handle(self) -> None:
        proxy = self.proxy
        method, path = self.command, self.path
        body = self._read_body()
        fault = proxy._take(method, path)
        kind = fault.kind if fault is not None else None
        rng = self.headers.get("Range")
        if fault is not None and kind == "delay":
            proxy._stop.wait(fault.seconds)
        if fault is not None and kind == "status":
            payload = json.dumps(
                {"errors": [{"code": "INJECTED", "message": f"injected {fault.status}"}]}
            ).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if fault.retry_after is not None:
                self.send_header("Retry-After", fault.retry_after)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            proxy._record(
                Recorded(method, path, rng, fault.status, len(payload), kind, time.time())
            )
            return
        conn = self._upstream()
        sent = 0
        status = 0
        recorded = False
        try:
            fwd = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            fwd.pop("Content-Length", None)
            if kind == "norange":
                fwd = {k: v for k, v in fwd.items() if k.lower() != "range"}
            if body or method in ("PUT", "POST", "PATCH"):
                fwd["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=fwd)
            resp = conn.getresponse()
            status = resp.status
            rheaders = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            data: bytes | None = None
            if resp.getheader("Content-Length") is None and method != "HEAD":
                data = resp.read()
                rheaders = [(k, v) for k, v in rheaders if k.lower() != "content-length"]
                rheaders.append(("Content-Length", str(len(data))))
            self.send_response(resp.status)
            for k, v in rheaders:
                self.send_header(k, v)
            self.end_headers()
            if method == "HEAD":
                return
            chunks = [data] if data is not None else iter(lambda: resp.read(1 << 16), b"")
            for chunk in chunks:
                if fault is not None and kind == "flip" and sent <= fault.after < sent + len(chunk):
                    i = fault.after - sent
                    chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                if (
                    fault is not None
                    and kind in ("reset", "truncate", "stall")
                    and sent + len(chunk) >= fault.after
                ):
                    head = chunk[: fault.after - sent]
                    self.wfile.write(head)
                    sent += len(head)
                    self.wfile.flush()
                    if kind == "reset":
                        self._abort()
                    elif kind == "truncate":
                        self._hangup()
                    else:  # recorded now: the stall outlives the client's patience
                        proxy._record(Recorded(method, path, rng, status, sent, kind, time.time()))
                        recorded = True
                        proxy._stop.wait(fault.seconds)
                        self._abort()
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        finally:
            conn.close()
            if not recorded:
                proxy._record(Recorded(method, path, rng, status, sent, kind, time.time()))

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle
