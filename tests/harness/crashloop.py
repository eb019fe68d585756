"""Helpers for the reliability campaign (tests/test_reliability_*.py).

- :class:`ThrottledRelay`: a TCP relay in front of a registry whose server-to-client bytes can
  be throttled to ``rate`` bytes/s (``rate = 0``: full speed) and switched at run time, so a
  pull is slow while it is being killed and fast when it is rerun. Counts connections.
- :func:`run_and_kill`: start a ``bootstrap`` command, wait for a trigger (a delay, or a
  condition on the file system such as "a temp file of at least N bytes exists in the store"),
  then ``SIGKILL`` it; returns what happened (:class:`Kill`).
- :func:`store_leftovers`: every temp file or directory a killed command may leave in a store
  (``tmp/*``, ``layers/*/.*.tmp-*``, atomic-writer temps beside ``index.json``); after
  ``bootstrap gc`` the list must be empty.
- :func:`dest_leftovers`: ``DEST`` and ``DEST.tmp-*`` beside a checkout destination.
- :func:`registries_env`: the environment that points ``bootstrap`` at a plain-HTTP host.
- :class:`FakeRegistry`: a tiny ``http.server`` speaking just enough of ``/v2/`` to serve
  arbitrary (hostile) manifests and blobs by tag or digest, recording what it was sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.cli import BOOTSTRAP

# ---- a throttling TCP relay ---------------------------------------------------------------------


class ThrottledRelay:
    """Relays 127.0.0.1:``port`` to ``target``; bytes from the server are paced at ``rate``
    bytes/s (0: unthrottled). ``rate`` may be changed while connections are open."""

    def __init__(self, target: tuple[str, int], rate: int = 0) -> None:
        self.target = target
        self.rate = rate
        self.connections = 0
        self._closing = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, paced: bool) -> None:
        with contextlib.suppress(OSError):
            while not self._closing:
                rate = self.rate if paced else 0
                data = src.recv(8192 if rate else 65536)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
            self._socks.clear()

    def __enter__(self) -> ThrottledRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- killing a command at a chosen point ------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """How one killed run went: ``killed`` False when the command finished before the trigger
    (then ``rc`` is its exit code); ``waited`` seconds from start to the kill (or the end);
    ``triggered`` whether a watch condition fired (False: the deadline/delay decided)."""

    killed: bool
    rc: int | None
    waited: float
    triggered: bool
    stderr: str = ""


def run_and_kill(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    delay: float = 0.0,
    watch: Callable[[], bool] | None = None,
    deadline: float = 20.0,
    poll: float = 0.002,
) -> Kill:
    """Run ``bootstrap ARGV`` and SIGKILL it. Without ``watch``: ``delay`` seconds after the
    start. With ``watch``: ``delay`` seconds after ``watch()`` first returns true (polled
    every ``poll`` seconds), or at ``deadline`` if it never does. If the command ends first, it
    is not killed."""
    proc = subprocess.Popen(
        [str(BOOTSTRAP), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    started = time.monotonic()
    triggered = False
    try:
        if watch is not None:
            while time.monotonic() - started < deadline and proc.poll() is None:
                try:
                    if watch():
                        triggered = True
                        break
                except OSError:
                    pass  # a path vanished between listing and stat: look again
                time.sleep(poll)
        end = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < end:
            time.sleep(min(0.002, max(0.0, end - time.monotonic())))
        waited = time.monotonic() - started
        if proc.poll() is not None:
            _, err = proc.communicate()
            return Kill(False, proc.returncode, waited, triggered, err)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        return Kill(True, None, waited, triggered, err)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def tmp_file_at_least(store: Path, size: int) -> Callable[[], bool]:
    """A watch: some temp file in ``STORE/tmp`` holds at least ``size`` bytes."""
    tmp = store / "tmp"

    def check() -> bool:
        if not tmp.is_dir():
            return False
        return any(e.stat().st_size >= size for e in os.scandir(tmp))

    return check


def path_appears(parent: Path, prefix: str) -> Callable[[], bool]:
    """A watch: an entry whose name starts with ``prefix`` exists in ``parent`` (or, when
    ``parent`` is a layer cache root, in any of its algorithm subdirectories)."""

    def check() -> bool:
        if not parent.is_dir():
            return False
        return any(e.name.startswith(prefix) for e in os.scandir(parent))

    return check


# ---- what a killed command may leave behind ---------------------------------------------------


def store_leftovers(store: Path) -> list[str]:
    """Temp files and dirs of interrupted writes anywhere in the store (relative paths)."""
    out: list[str] = []
    tmp = store / "tmp"
    if tmp.is_dir():
        out += [f"tmp/{e.name}" for e in os.scandir(tmp)]
    for sub in ("layers", "trees"):  # cache fills, repairs (.old-) and image trees
        top = store / sub
        if top.is_dir():
            for algdir in os.scandir(top):
                if algdir.is_dir():
                    out += [
                        f"{sub}/{algdir.name}/{e.name}"
                        for e in os.scandir(algdir.path)
                        if ".tmp-" in e.name or ".old-" in e.name
                    ]
    for d in (store / "oci", store / "oci" / "blobs" / "sha256"):
        if d.is_dir():
            out += [
                str(Path(e.path).relative_to(store))
                for e in os.scandir(d)
                if e.name.endswith((".tmp", ".part")) or ".tmp-" in e.name
            ]
    return sorted(out)


def dest_leftovers(dest: Path) -> list[str]:
    """``DEST`` itself and any ``DEST.tmp-*`` sibling that exists (names only)."""
    parent = dest.parent
    if not parent.is_dir():
        return []
    return sorted(
        e.name
        for e in os.scandir(parent)
        if e.name == dest.name or e.name.startswith(f"{dest.name}.tmp-")
    )


def registries_env(tmp: Path, *hosts: str) -> dict[str, str]:
    """Environment for ``bootstrap`` to reach plain-HTTP ``hosts`` (marked insecure in a private
    registries.conf), with no credentials and no certs.d."""
    conf = tmp / f"registries-{abs(hash(hosts))}.conf"
    conf.write_text("".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n\n' for h in hosts))
    empty = tmp / "certs.d-empty"
    empty.mkdir(exist_ok=True)
    return {
        "REGISTRIES_CONFIG_PATH": str(conf),
        "REGISTRY_AUTH_FILE": str(tmp / "no-auth.json"),
        "BOOTSTRAP_CERTS_D": str(empty),
    }


# ---- a fake registry for hostile documents -----------------------------------------------------


@dataclass
class Served:
    """One thing a :class:`FakeRegistry` serves: ``body`` bytes (or ``chunks``, a callable
    returning an iterator, for streamed or endless bodies), ``content_type``, ``status``,
    extra ``headers``."""

    body: bytes = b""
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: Callable[[], Iterator[bytes]] | None = None
    length: int | None = None  # Content-Length to announce for ``chunks`` (None: close-delimited)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FakeRegistry:
    """A plain-HTTP server on 127.0.0.1 that answers ``GET /v2/`` with 200 and
    ``/v2/<repo>/manifests/<ref>`` and ``/v2/<repo>/blobs/<digest>`` from :attr:`routes`
    (keyed by the path after ``/v2/``), 404 otherwise. Every request is recorded in
    :attr:`seen` (method, path, headers), so a test can tell what a client sent here. Routes
    whose key starts with ``/`` match a whole path outside ``/v2/`` (redirect targets)."""

    def __init__(self) -> None:
        self.routes: dict[str, Served] = {}
        self.seen: list[Seen] = []
        self.challenge: str | None = None  # e.g. 'Basic realm="x"': /v2/ answers 401 without auth
        self._lock = threading.Lock()
        handler = type("FakeHandler", (_FakeHandler,), {"registry": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def manifest(
        self, repo: str, ref: str, body: bytes | dict[str, Any], content_type: str = ""
    ) -> str:
        """Serve ``body`` as manifest ``repo:ref`` and ``repo@digest``; returns the digest."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if not content_type and isinstance(body, dict):
            content_type = str(body.get("mediaType", "application/json"))
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        served = Served(data, content_type or "application/json")
        self.routes[f"{repo}/manifests/{ref}"] = served
        self.routes[f"{repo}/manifests/{digest}"] = served
        return digest

    def blob(self, repo: str, data: bytes, digest: str | None = None) -> dict[str, Any]:
        """Serve ``data`` as a blob (under ``digest`` if given: it may lie); returns an OCI
        descriptor dict (media type left for the caller to set)."""
        digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
        self.routes[f"{repo}/blobs/{digest}"] = Served(data)
        return {"digest": digest, "size": len(data)}

    def paths(self) -> list[str]:
        with self._lock:
            return [s.path for s in self.seen]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FakeHandler(BaseHTTPRequestHandler):
    registry: FakeRegistry
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        reg = self.registry
        with reg._lock:
            reg.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
        path = self.path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            served: Served | None = Served(b"{}", "application/json")
            if reg.challenge is not None and "Authorization" not in self.headers:
                served = Served(b"{}", "application/json", 401, {"WWW-Authenticate": reg.challenge})
        else:
            served = reg.routes.get(path.removeprefix("/v2/"))
        if served is None:
            served = Served(
                b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not here"}]}',
                "application/json",
                404,
            )
        self.send_response(served.status)
        self.send_header("Content-Type", served.content_type)
        for k, v in served.headers.items():
            self.send_header(k, v)
        with contextlib.suppress(OSError):
            if served.chunks is None:
                self.send_header("Content-Length", str(len(served.body)))
                self.end_headers()
                if body:
                    self.wfile.write(served.body)
                return
            if served.length is not None:
                self.send_header("Content-Length", str(served.length))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if body:
                for chunk in served.chunks():
                    self.wfile.write(chunk)


def serve_layout(fake: FakeRegistry, repo: str, tag: str, layout: Path, manifest: str) -> None:
    """Serve the image whose manifest digest is ``manifest`` from OCI ``layout`` as
    ``repo:tag`` on ``fake``: the manifest (with its media type) and every blob it names."""

    def read(digest: str) -> bytes:
        alg, _, hexpart = digest.partition(":")
        return (layout / "blobs" / alg / hexpart).read_bytes()

    data = read(manifest)
    doc = json.loads(data)
    fake.manifest(repo, tag, data, str(doc.get("mediaType", "application/json")))
    for desc in [doc["config"], *doc.get("layers", [])]:
        fake.blob(repo, read(desc["digest"]), desc["digest"])


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "20m") -> Iterator[Path]:
    """Mount a fresh tmpfs of ``size`` at ``path`` (created) for the block; unmounted (lazily
    if busy) afterwards. Needs root."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fs_used(path: Path) -> int:
    """Bytes in use on the file system holding ``path``."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def tree_state(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of every path under ``roots`` (for "nothing changed" checks)."""
    out: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for n in [*dirnames, *filenames]:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out
