"""The demo's registry: Debian's ``docker-registry`` serving the demo's images on the machine's
loopback, so that ``bootstrap up`` inside pulls them over the registry v2 protocol as a real
node does.

:class:`DemoRegistry` runs ``docker-registry serve`` in the machine's network namespace only
(host binary, storage on the host under ``$STATE/demo/registry``, kept between runs), at the
address the node manifest names (``127.0.0.1:5000`` in ``examples/node.yaml``). The images
(oci-archives built by :mod:`bootstrap.demo.images`) are pushed by ``python -m
bootstrap.demo.registry push ADDR ARCHIVE=REF...``, run in that network namespace too: blobs the
registry already has are not sent again (``HEAD``), the others are uploaded whole (``POST`` then
``PUT ?digest=``), then the manifest is put under its tag.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bootstrap import process
from bootstrap.errors import BootstrapError, RegistryError, UsageError

REGISTRY_BIN = "docker-registry"
READY_TIMEOUT = 20.0


class DemoRegistry:
    """``docker-registry`` at ``addr`` in the network namespace of process ``netns_pid``, its
    storage in ``root``; the images are pushed by ``python`` (this interpreter unless given: the
    venv bootstrap runs from). Use as a context manager: started on enter, stopped on exit."""

    def __init__(self, root: Path, addr: str, netns_pid: int, python: str | None = None) -> None:
        self.root = root
        self.addr = addr
        self.netns_pid = netns_pid
        self.python = python or sys.executable
        self._proc: subprocess.Popen[bytes] | None = None

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.netns_pid}", "--net", "--", *argv]

    def start(self) -> None:
        """Start the registry (it answers once :meth:`push` has waited for it). Raises
        :class:`UsageError` when something listens on ``addr`` already, :class:`BootstrapError`
        when it cannot be started."""
        host, _, port = self.addr.rpartition(":")
        with socket.socket() as probe:  # the machine shares the host's network: probe here
            probe.settimeout(1)
            taken = probe.connect_ex((host, int(port))) == 0
        if taken:
            raise UsageError(
                f"{self.addr} is in use: the demo serves its images there (the registry "
                "examples/node.yaml names)",
                f"stop what listens on it (ss -ltnp 'sport = :{port}'), then rerun",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            json.dumps(  # JSON is YAML: no YAML writer needed
                {
                    "version": 0.1,
                    "log": {"level": "warn", "accesslog": {"disabled": True}},
                    "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}},
                    "http": {"addr": self.addr},
                }
            )
        )
        log_file = open(self.root / "registry.log", "wb")  # noqa: SIM115 - lives with the process
        try:
            self._proc = subprocess.Popen(
                self._in_netns([REGISTRY_BIN, "serve", str(config)]),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise BootstrapError(
                f"{REGISTRY_BIN}: command not found", "apt-get install docker-registry"
            ) from exc
        finally:
            log_file.close()

    def push(self, images: list[tuple[str, Path]]) -> None:
        """Push each (reference, oci-archive) to the registry, waiting for it to answer first.
        Raises :class:`RegistryError` naming what failed (and the registry's log tail)."""
        argv = [self.python, "-m", "bootstrap.demo.registry", "push", self.addr]
        argv += [f"{path}={ref}" for ref, path in images]
        proc = process.run(self._in_netns(argv), check=False, timeout=600)
        if proc.returncode != 0:
            reason = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise RegistryError(
                f"the demo's registry on {self.addr}: {reason[0]}",
                f"see {self.root / 'registry.log'}",
            )

    def stop(self) -> None:
        """Stop the registry; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> DemoRegistry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---- the pusher (runs in the machine's network namespace) -------------------------------------


class _Body:
    """A file object of known length for requests (which would otherwise size a tar member by
    the whole tar's fileno)."""

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self._fh = fh
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)


def _member(tf: tarfile.TarFile, name: str) -> IO[bytes]:
    for candidate in (name, f"./{name}"):
        with contextlib.suppress(KeyError):
            fh = tf.extractfile(candidate)
            if fh is not None:
                return fh
    raise RegistryError(f"{tf.name!r}: no {name} in the archive", "rebuild the demo images")


def _check(resp: Any, want: int, what: str) -> None:
    if resp.status_code != want:
        raise RegistryError(f"{what}: HTTP {resp.status_code}: {resp.text[:200]}", "")


def push_archive(session: Any, base: str, archive: Path, ref: str) -> None:
    """Push the image of oci-archive ``archive`` to ``base`` (``http://HOST:PORT``) as
    ``ref``'s repository and tag."""
    from bootstrap.image.api import Reference

    reference = Reference.parse(ref)
    repo, tag = reference.path, reference.tag or "latest"
    with tarfile.open(archive) as tf:
        desc = json.load(_member(tf, "index.json"))["manifests"][0]
        manifest_bytes = _member(tf, "blobs/" + desc["digest"].replace(":", "/")).read()
        manifest = json.loads(manifest_bytes)
        for blob in [manifest["config"], *manifest["layers"]]:
            digest, size = blob["digest"], int(blob["size"])
            url = f"{base}/v2/{repo}/blobs/{digest}"
            if session.head(url).status_code == 200:
                continue
            resp = session.post(f"{base}/v2/{repo}/blobs/uploads/")
            _check(resp, 202, f"start upload of {digest}")
            location = resp.headers["Location"]
            if location.startswith("/"):
                location = base + location
            sep = "&" if "?" in location else "?"
            fh = _member(tf, "blobs/" + digest.replace(":", "/"))
            resp = session.put(
                f"{location}{sep}digest={digest}",
                data=_Body(fh, size),
                headers={"Content-Type": "application/octet-stream"},
            )
            _check(resp, 201, f"upload of {digest}")
        media_type = desc.get("mediaType") or manifest.get("mediaType")
        resp = session.put(
            f"{base}/v2/{repo}/manifests/{tag}",
            data=manifest_bytes,
            headers={"Content-Type": media_type},
        )
        _check(resp, 201, f"manifest of {ref}")


def _main(argv: list[str]) -> int:
    from bootstrap.http import new_session

    if len(argv) < 2 or argv[0] != "push":
        print("usage: python -m bootstrap.demo.registry push ADDR ARCHIVE=REF...", file=sys.stderr)
        return 2
    base = f"http://{argv[1]}"
    session = new_session(retries=0)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            if session.get(f"{base}/v2/", timeout=2).status_code == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(f"no answer on {base}/v2/ after {READY_TIMEOUT:g}s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    try:
        for item in argv[2:]:
            path, _, ref = item.rpartition("=")
            push_archive(session, base, Path(path), ref)
    except (BootstrapError, OSError, KeyError, ValueError) as exc:
        print(f"push failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
