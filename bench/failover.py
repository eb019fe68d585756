"""Benchmark: how fast mirrors that cannot serve are left and the registry reached.

A plain-HTTP docker-registry on 127.0.0.1 serves a tiny image (a config, no layers). Each round
fetches its manifest and its config blob with a fresh :class:`RegistryClient` (the production
session unless said) through a registries.conf whose mirrors stand before the registry:

- ``direct``: no mirror (the floor);
- ``refused insecure``: a loopback port nobody listens on, insecure (https refused, then http
  once, at once);
- ``refused secure``: the same, https only;
- ``unresolvable``: ``mirror.invalid`` (no such name);
- ``refused + unresolvable``: both, in that order;
- ``black-holed``: a listener whose accept queue is full (SYNs dropped): one connect timeout
  (``--connect-timeout``, default 1 s; production: 10 s), never the retries;
- ``all down`` against ``registry down``: the registry refuses too, with and without the two
  dead mirrors, under a session of 2 retries with backoff 1 s (urllib3 sleeps 0 s then 2 s):
  the registry gets its retries, the mirrors none.

Targets (what tests/test_registry_client.py checks by counting retries, timed here): a refused
or unresolvable mirror costs < 0.5 s over ``direct``; a black-holed one < its connect timeout +
0.5 s; ``all down`` ends < 0.5 s after ``registry down`` (each mirror retried would add 2 s).

    .venv/bin/python bench/failover.py [--rounds N] [--connect-timeout S]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log, machine_note, median, plain_registry
from bootstrap.errors import RegistryError
from bootstrap.http import new_session
from bootstrap.image.model import OCI_CONFIG, OCI_MANIFEST, Descriptor
from bootstrap.image.reference import Reference
from bootstrap.image.registries import RegistriesConf
from bootstrap.image.registry import RegistryClient
from tests.harness.registry import Registry, free_port

REPO = "bench/failover"
MIRROR_TARGET = 0.5
"""Seconds a refused or unresolvable mirror may add to the direct fetch."""


def push_tiny(reg: Registry) -> Descriptor:
    """Push a manifest with a config and no layers as ``REPO:v1``; return the config."""
    data = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}})
    config = Descriptor(OCI_CONFIG, reg.upload_blob(REPO, data.encode()), len(data))
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": len(data)},
            "layers": [],
        }
    ).encode()
    reg.put_manifest(REPO, "v1", body, OCI_MANIFEST)
    return config


def conf(upstream: str, *mirrors: str, secure: tuple[str, ...] = ()) -> RegistriesConf:
    """``upstream`` with ``mirrors`` in order; all insecure (plain http) except ``secure``."""
    text = f'[[registry]]\nlocation = "{upstream}"\ninsecure = true\n'
    for m in mirrors:
        insecure = str(m not in secure).lower()
        text += f'[[registry.mirror]]\nlocation = "{m}"\ninsecure = {insecure}\n'
    parsed = RegistriesConf.parse(text, "failover.conf")
    return RegistriesConf(parsed.registries, certs_dirs=())


def dead() -> str:
    """host:port of a loopback port nobody listens on (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    """host:port of a listener whose accept queue is full: connects time out."""
    listener = socket.socket()
    clients: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # fill the accept queue; nobody accepts
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            clients.append(c)
        time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        for c in clients:
            c.close()
        listener.close()


def fetch(rc: RegistriesConf, upstream: str, config: Descriptor, **session: Any) -> float:
    """Seconds to fetch the manifest and the config blob of ``upstream/REPO:v1`` through
    ``rc`` with a fresh client (``session``: new_session's keywords; none: production)."""
    ref = Reference.parse(f"{upstream}/{REPO}:v1")
    sess = new_session(**session) if session else None
    started = time.monotonic()
    try:
        with RegistryClient(rc, None, sess) as client:
            client.get_manifest(ref)
            data = client.get_blob_bytes(ref, config, 1 << 20)
        assert hashlib.sha256(data).hexdigest() == config.digest.split(":", 1)[1]
    finally:
        if sess is not None:
            sess.close()
    return time.monotonic() - started


def fails(rc: RegistriesConf, upstream: str, **session: Any) -> float:
    """Seconds until fetching ``upstream/REPO:v1`` through ``rc`` fails (it must)."""
    sess = new_session(**session)
    started = time.monotonic()
    try:
        with RegistryClient(rc, None, sess) as client:
            client.get_manifest(Reference.parse(f"{upstream}/{REPO}:v1"))
    except RegistryError:
        return time.monotonic() - started
    finally:
        sess.close()
    raise SystemExit("fetching from registries that are all down succeeded")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="rounds of each case (default 7)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=1.0,
        help="connect timeout of the black-holed case's session (default 1 s)",
    )
    args = p.parse_args(argv)
    print(machine_note())
    with plain_registry() as reg, black_hole() as hole:
        config = push_tiny(reg)
        up = reg.host
        dead1, dead2 = dead(), dead()
        down = dead()
        retrying = {"retries": 2, "backoff": 1.0}
        cases: dict[str, Callable[[], float]] = {
            "direct": lambda: fetch(conf(up), up, config),
            "refused insecure": lambda: fetch(conf(up, dead1), up, config),
            "refused secure": lambda: fetch(conf(up, dead1, secure=(dead1,)), up, config),
            "unresolvable": lambda: fetch(conf(up, "mirror.invalid"), up, config),
            "refused + unresolvable": lambda: fetch(conf(up, dead1, "mirror.invalid"), up, config),
            "black-holed": lambda: fetch(
                conf(up, hole), up, config, connect_timeout=args.connect_timeout
            ),
            "registry down": lambda: fails(conf(down), down, **retrying),
            "all down": lambda: fails(conf(down, dead1, dead2), down, **retrying),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.rounds):
            order = list(cases) if i % 2 == 0 else list(reversed(cases))
            for name in order:
                times[name].append(cases[name]())
            log(f"round {i + 1}/{args.rounds} done")
    med = {name: median(ts) for name, ts in times.items()}
    bounds = {
        "refused insecure": med["direct"] + MIRROR_TARGET,
        "refused secure": med["direct"] + MIRROR_TARGET,
        "unresolvable": med["direct"] + MIRROR_TARGET,
        "refused + unresolvable": med["direct"] + MIRROR_TARGET,
        "black-holed": med["direct"] + args.connect_timeout + MIRROR_TARGET,
        "all down": med["registry down"] + MIRROR_TARGET,
    }
    print(f"{'case':<24} {'median':>8} {'min':>8} {'max':>8}  target")
    for name, ts in times.items():
        bound = bounds.get(name)
        verdict = (
            "" if bound is None else f"< {bound:.2f}s {'ok' if med[name] < bound else 'MISSED'}"
        )
        print(f"{name:<24} {med[name]:>7.3f}s {min(ts):>7.3f}s {max(ts):>7.3f}s  {verdict}")
    print(machine_note().replace("at start", "at end"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
