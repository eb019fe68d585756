"""Network readiness, checked inside network namespaces this test creates (198.51.100.0/24 only).

The check runs as ``ip netns exec NS python -c ...`` so it sees exactly the namespace's routes,
addresses, /etc/hosts and /etc/resolv.conf (``ip netns exec`` binds /etc/netns/NS/*).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.net.readiness import NetworkState

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

CHECK = """
import json, sys
from bootstrap.errors import BootstrapError
from bootstrap.net.readiness import wait_for_network
args = json.loads(sys.argv[1])
try:
    state = wait_for_network(args["timeout"], require_default_route=args["route"],
                             resolve=args["resolve"], interval=0.1)
except BootstrapError as err:
    print(json.dumps({"error": err.message, "exit": int(err.exit_code)}))
else:
    print(json.dumps({"ok": state.to_json()}))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"bs-test-{uuid.uuid4().hex[:8]}"
    etc = Path("/etc/netns") / name
    _ip("netns", "add", name)
    try:
        etc.mkdir(parents=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n198.51.100.10 registry.test\n")
        # a resolver on loopback with nothing listening: lookups fail at once, not by timeout
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        for f in etc.glob("*"):
            f.unlink()
        if etc.exists():
            etc.rmdir()


def _check(ns: str, timeout: float, route: bool = True, resolve: tuple[str, ...] = ()) -> dict:
    args = json.dumps({"timeout": timeout, "route": route, "resolve": list(resolve)})
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CHECK, args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _configure(ns: str) -> None:
    _ip("-n", ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    _ip("-n", ns, "link", "set", "veth1", "up")
    _ip("-n", ns, "link", "set", "veth0", "up")
    _ip("-n", ns, "addr", "add", "198.51.100.2/24", "dev", "veth0", "nodad")
    _ip("-n", ns, "route", "add", "default", "via", "198.51.100.1", "dev", "veth0")


def test_no_route_no_address_names_both(netns: str) -> None:
    started = time.monotonic()
    out = _check(netns, 1.0)
    assert out["exit"] == 3
    msg = out["error"]
    assert msg.startswith("network not ready after 1s: no default route; ")
    assert "no global non-loopback address" in msg
    assert "lo 127.0.0.1/8" in msg  # says what the node has instead
    assert time.monotonic() - started < 15


def test_address_without_route_names_the_route(netns: str) -> None:
    _ip("-n", netns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    _ip("-n", netns, "link", "set", "d0", "up")
    _ip("-n", netns, "addr", "add", "198.51.100.3/24", "dev", "d0", "nodad")
    out = _check(netns, 0.5)
    assert out["error"].startswith("network not ready after 0.5s: no default route; ")
    assert "no global non-loopback address" not in out["error"]
    assert "d0 198.51.100.3/24" in out["error"]
    out = _check(netns, 0.5, route=False)
    assert out["ok"]["addresses"] == ["d0 198.51.100.3/24"]


def test_route_arriving_later_is_waited_for(netns: str) -> None:
    timer = threading.Timer(1.5, _configure, args=(netns,))
    timer.start()
    try:
        started = time.monotonic()
        out = _check(netns, 20.0, resolve=("registry.test",))
        elapsed = time.monotonic() - started
    finally:
        timer.join()
    assert out["ok"] == {
        "default_routes": ["default via 198.51.100.1 dev veth0"],
        "addresses": ["veth0 198.51.100.2/24"],
        "resolved": ["registry.test"],
    }
    assert 1.0 < elapsed < 15


def test_unresolvable_name_is_named(netns: str) -> None:
    _configure(netns)
    out = _check(netns, 0.5, resolve=("registry.test", "nothing.invalid"))
    assert out["exit"] == 3
    assert "cannot resolve nothing.invalid" in out["error"]
    assert "no default route" not in out["error"]


def test_state_missing_phrases() -> None:
    s = NetworkState((), (), ("lo 127.0.0.1/8",), (), ("x.test",))
    assert s.missing(True) == [
        "no default route",
        "no global non-loopback address",
        "cannot resolve x.test",
    ]
    assert s.missing(False) == ["no global non-loopback address", "cannot resolve x.test"]
