"""Health checks: the HTTP form against a real server on the host's loopback (fast), and the
health check after ``install`` in a systemd node (a failing one leaves nothing installed)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from bootstrap.errors import SystemdError
from bootstrap.runtime.health import HealthCheck, probe, wait_healthy
from tests.harness.imagebuilder import File, Layer, busybox_spec
from tests.harness.node import Node
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import _ensure_running
from tests.test_deploy import CONTAINERS, active, registries_env, running_pid


class _Handler(http.server.BaseHTTPRequestHandler):
    calls = 0
    healthy_after = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        if self.path == "/healthz":
            ok = type(self).calls > type(self).healthy_after
            self._answer(200 if ok else 500, "ok" if ok else "pod probe failed: no image")
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(2)
            self._answer(200, "late")
        else:
            self._answer(404, "no such page\n\nsecond line")

    def _answer(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout case) is expected here


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.calls = 0
    _Handler.healthy_after = 0
    srv = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_http_probe_answers(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a proxy in the environment is never used for the node's own URLs
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    check = HealthCheck(http=f"{server}/healthz", timeout=1)
    assert probe("c", check) == (True, "HTTP 200: ok")
    ok, why = probe("c", HealthCheck(http=f"{server}/nothing", timeout=1))
    assert not ok and why == "HTTP 404: no such page second line"
    assert probe("c", HealthCheck(http=f"{server}/moved", timeout=1)) == (True, "HTTP 302")
    ok, why = probe("c", HealthCheck(http=f"{server}/slow", timeout=0.5))
    assert not ok and "0.5s" in why, why
    closed = server.rsplit(":", 1)[0] + ":1"
    ok, why = probe("c", HealthCheck(http=f"{closed}/healthz", timeout=1))
    assert (ok, why) == (False, "connection refused")


def test_wait_healthy_http_start_period_and_retries(server: str) -> None:
    url = f"{server}/healthz"
    _Handler.healthy_after = 3  # the 4th request answers 200
    check = HealthCheck(http=url, interval=0.05, timeout=1, retries=2, start_period=10)
    assert wait_healthy("c", check, alive=lambda: True) == 4  # failures in the start period
    _Handler.calls, _Handler.healthy_after = 0, 100
    check = HealthCheck(http=url, interval=0.05, timeout=1, retries=3)
    started = time.monotonic()
    with pytest.raises(SystemdError) as info:
        wait_healthy("c", check, alive=lambda: True)
    assert _Handler.calls == 3 and time.monotonic() - started < 5
    assert f"health check 'GET {url}' failed 3 times: HTTP 500: pod probe failed" in str(info.value)
    assert info.value.hint == f"try it by hand: curl -sS {url}"
    with pytest.raises(SystemdError, match="stopped running"):
        wait_healthy("c", check, alive=lambda: False)


# ---- after install, in a node ------------------------------------------------------------------

HTTPD = (
    "sh",
    "-c",
    "mkdir -p /tmp/www && echo ok > /tmp/www/healthz; exec httpd -f -p 127.0.0.1:18091 -h /tmp/www",
)


def _with_health(health: dict[str, object], cmd: tuple[str, ...]) -> object:
    manifest = json.dumps({"health": health}).encode()
    return busybox_spec(cmd=cmd, extra=[Layer([File("exports/manifest.json", manifest)])])


@pytest.fixture(scope="module")
def health_images(_registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from tests.harness.imagebuilder import build_image

    reg = _ensure_running(_registry_plain)
    layout = tmp_path_factory.mktemp("health-images") / "oci"
    fast = {"interval": "200ms", "timeout": 2, "retries": 2}
    specs = {
        "web-ok": _with_health({"http": "http://127.0.0.1:18091/healthz", **fast}, HTTPD),
        "web-404": _with_health({"http": "http://127.0.0.1:18091/missing", **fast}, HTTPD),
        "exec-bad": _with_health({"exec": ["false"], **fast}, ("sleep", "3600")),
    }
    refs = {}
    for tag, spec in specs.items():
        build_image(layout, tag, spec)  # type: ignore[arg-type]
        reg.push(layout, tag, f"health/{tag}:1")
        refs[tag] = f"{reg.host}/health/{tag}:1"
    return refs


@pytest.mark.slow
@pytest.mark.node
def test_install_waits_for_health_and_undoes_an_unhealthy_one(
    shared_node: Node, _registry_plain: Registry, health_images: dict[str, str]
) -> None:
    node = shared_node
    env = registries_env(node, _ensure_running(_registry_plain))
    try:
        ran = node.bootstrap("--json", "install", "hweb", health_images["web-ok"], env=env)
        assert ran.rc == 0, ran.stderr
        doc = ran.json()
        assert "healthy (GET http://127.0.0.1:18091/healthz)" in doc["message"]
        assert doc["deployment"]["health"]["http"] == "http://127.0.0.1:18091/healthz"
        assert "health check passed" in ran.stderr
        assert active(node, "hweb.service") == "active"
        running_pid(node, "hweb")
        node.bootstrap("uninstall", "hweb", env=env, check=True)
        for tag, said in (("web-404", "HTTP 404"), ("exec-bad", "exit 1")):
            ran = node.bootstrap("install", "hbad", health_images[tag], env=env)
            assert ran.rc == 5, ran.stderr
            error = next(ln for ln in ran.stderr.splitlines() if ln.startswith("bootstrap: error"))
            assert "install hbad (nothing installed)" in error and "health check" in error, error
            assert said in error, error
            # nothing half-running: no unit, no runc container, no deployment
            assert not node.path(f"{CONTAINERS}/hbad").exists()
            assert not node.path(f"{CONTAINERS}/hbad.0").exists()
            assert not node.path("/etc/systemd/system/hbad.service").exists()
            assert "hbad" not in node.run("runc", "list", "-q").stdout.split()
            assert active(node, "hbad.service") in ("inactive", "unknown")
    finally:
        for name in ("hweb", "hbad"):
            node.bootstrap("uninstall", name, env=env)
