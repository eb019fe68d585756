"""A network namespace of its own for a throwaway machine, so that what runs inside (a CNI
bridge, iptables rules, pod namespaces) never touches the host's network.

:class:`PrivateNetwork` creates ``/run/netns/NAME`` with ``ip netns`` and, inside it only, a
loopback that is up and a veth pair ``eth0`` (:data:`NODE_ADDRESS`) / ``gw0``
(:data:`GATEWAY`) with a default route through ``gw0``, so the machine sees a default route and a
global address (what ``bootstrap up`` waits for) on 198.51.100.0/24, the documentation range.
Pods get addresses from :data:`POD_SUBNET` through a CNI config of the machine's.

The machine cannot reach the host's loopback, where the demo's and the tests' registries
listen: :meth:`PrivateNetwork.forward` listens on ``127.0.0.1:PORT`` *inside* the namespace and
relays each connection to ``127.0.0.1:PORT`` of the host (a thread per direction), so references
such as ``127.0.0.1:5000/bootstrap/ocid`` work unchanged inside. The listening socket is made
by a short-lived thread that entered the namespace (``setns(2)`` affects only the calling
thread); everything else stays in the host's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import threading
from pathlib import Path

from bootstrap import process
from bootstrap.errors import SystemdError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
NODE_ADDRESS = "198.51.100.2/26"
GATEWAY = "198.51.100.1"
POD_SUBNET = "198.51.100.128/25"
CLONE_NEWNET = 0x40000000
_BUFFER = 1 << 16


class NetworkError(SystemdError):
    """The namespace could not be made, entered or removed (exit 5)."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class PrivateNetwork:
    """The network namespace ``name`` (``/run/netns/NAME``); see the module doc."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[socket.socket] = []
        self._stop = threading.Event()

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def _ip(self, *args: str) -> None:
        process.run(
            ["ip", *args],
            error=NetworkError,
            hint="needs root and iproute2 (ip netns, veth)",
            timeout=30,
        )

    def create(self) -> None:
        """Make the namespace with its loopback, veth pair, addresses and default route.
        Raises :class:`NetworkError` (after removing what was made) when a step fails."""
        if self.path.exists():
            raise NetworkError(
                f"network namespace {self.name} exists already", f"ip netns delete {self.name}"
            )
        self._ip("netns", "add", self.name)
        try:
            n = ["-n", self.name]
            self._ip(*n, "link", "set", "lo", "up")
            self._ip(*n, "link", "add", "eth0", "type", "veth", "peer", "name", "gw0")
            self._ip(*n, "addr", "add", NODE_ADDRESS, "dev", "eth0")
            prefix = NODE_ADDRESS.split("/")[1]
            self._ip(*n, "addr", "add", f"{GATEWAY}/{prefix}", "dev", "gw0")
            self._ip(*n, "link", "set", "eth0", "up")
            self._ip(*n, "link", "set", "gw0", "up")
            self._ip(*n, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        except BaseException:
            self.destroy()
            raise

    def forward(self, port: int, host: str = "127.0.0.1") -> None:
        """Relay ``127.0.0.1:port`` inside the namespace to ``host:port`` of this process's
        namespace until :meth:`destroy`. Raises :class:`NetworkError` when the port cannot be
        bound inside."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def listen() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(64)
                made.append(s)
            except BaseException as exc:
                failed.append(exc)

        t = threading.Thread(target=listen, name=f"netns-listen-{port}")
        t.start()
        t.join()  # the thread that entered the namespace ends here
        if failed or not made:
            raise NetworkError(
                f"cannot listen on 127.0.0.1:{port} in network namespace {self.name}: "
                f"{failed[0] if failed else 'no socket'}",
                "is that port taken inside the machine?",
            )
        listener = made[0]
        self._listeners.append(listener)
        threading.Thread(
            target=self._accept, args=(listener, host, port), name=f"netns-fwd-{port}", daemon=True
        ).start()
        log.debug("forwarding 127.0.0.1:%d in %s to %s:%d", port, self.name, host, port)

    def _accept(self, listener: socket.socket, host: str, port: int) -> None:
        while not self._stop.is_set():
            try:
                inside, _ = listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection((host, port), timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            done = threading.Semaphore(0)
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()
            threading.Thread(target=_close_after, args=(done, inside, outside), daemon=True).start()

    def destroy(self) -> None:
        """Stop forwarding and remove the namespace (its interfaces go with it). Safe to call
        twice."""
        self._stop.set()
        for s in self._listeners:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._listeners.clear()
        if self.path.exists():
            self._ip("netns", "delete", self.name)


def _close_after(done: threading.Semaphore, *socks: socket.socket) -> None:
    """Close ``socks`` once both directions of the relay ended."""
    done.acquire()
    done.acquire()
    for s in socks:
        s.close()


def _pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
    try:
        while True:
            data = src.recv(_BUFFER)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RD)
        done.release()


def remove_stale(names: list[str]) -> None:
    """``ip netns delete`` each of ``names`` that exists (the namespaces of machines reaped)."""
    for name in names:
        if (NETNS_DIR / name).exists():
            PrivateNetwork(name).destroy()
