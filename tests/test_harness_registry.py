"""The registry fixtures run a real docker-registry in each mode; clients need exactly the
credentials and CA the fixture hands out."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bootstrap.image.model import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.harness.image_fixtures import ImageBuilder, Layout
from tests.harness.imagebuilder import build_image, build_index, busybox_spec
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import RegistryFactory


def skopeo(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *argv], capture_output=True, text=True, timeout=120)


def http(
    reg: Registry,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    auth: bool = True,
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` on the registry with urllib (CA trusted, basic creds when ``auth``)."""
    req = urllib.request.Request(reg.url + path, headers=dict(headers or {}))
    if auth and reg.mode == "basic":
        creds = base64.b64encode(str(reg.creds).encode()).decode()
        req.add_header("Authorization", "Basic " + creds)
    ctx = ssl.create_default_context(cafile=str(reg.ca_cert)) if reg.ca_cert else None
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def jwt_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    doc: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return doc


def test_push_and_inspect_each_mode(any_registry: Registry, busybox_image: Layout) -> None:
    reg = any_registry
    name = f"harness/{reg.mode}-busybox"
    reg.push(busybox_image, busybox_image.tag, f"{name}:1")
    out = skopeo("inspect", *reg.skopeo_args(), f"docker://{reg.ref(name, '1')}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["Digest"] == busybox_image.image.manifest_digest
    assert reg.inspect(f"{name}:1", raw=True)["mediaType"] == OCI_MANIFEST
    # and copy back out with the --src-* flags
    dest = reg.root.parent / f"copy-{reg.mode}-{os.getpid()}"
    out = skopeo(
        "copy", "--quiet", *reg.skopeo_src_args(), f"docker://{reg.ref(name, '1')}", f"oci:{dest}:x"
    )
    assert out.returncode == 0, out.stderr
    # the client files are where the contract says
    if reg.mode == "plain":
        assert reg.url.startswith("http://") and reg.ca_cert is None and reg.certs_d is None
    else:
        assert reg.url.startswith("https://")
        assert (reg.certs_d / reg.host / "ca.crt").read_bytes() == reg.ca_cert.read_bytes()  # type: ignore[operator,union-attr]
    if reg.mode in ("basic", "token"):
        auths = json.loads(reg.auth_file.read_text())["auths"]  # type: ignore[union-attr]
        assert base64.b64decode(auths[reg.host]["auth"]).decode() == reg.creds
        out = skopeo(
            "inspect", "--authfile", str(reg.auth_file), "--cert-dir", str(reg.cert_dir),
            f"docker://{reg.ref(name, '1')}",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr


def test_tls_requires_the_ca(registry_tls: Registry, busybox_image: Layout) -> None:
    registry_tls.push(busybox_image, busybox_image.tag, "harness/tls-ca:1")
    out = skopeo("inspect", f"docker://{registry_tls.ref('harness/tls-ca', '1')}")
    assert out.returncode != 0
    assert "certificate" in out.stderr.lower() or "x509" in out.stderr.lower()
    out = skopeo(
        "inspect",
        *registry_tls.skopeo_args(),
        f"docker://{registry_tls.ref('harness/tls-ca', '1')}",
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_auth_required(mode: str, request: pytest.FixtureRequest, busybox_image: Layout) -> None:
    reg: Registry = request.getfixturevalue(f"registry_{mode}")
    reg.push(busybox_image, busybox_image.tag, f"harness/{mode}-auth:1")
    ref = f"docker://{reg.ref(f'harness/{mode}-auth', '1')}"
    cert = ["--cert-dir", str(reg.cert_dir)]
    out = skopeo("inspect", *cert, ref)
    assert out.returncode != 0
    assert "unauthorized" in out.stderr.lower() or "authentication required" in out.stderr.lower()
    out = skopeo("inspect", *cert, "--creds", f"{reg.username}:wrong", ref)
    assert out.returncode != 0
    out = skopeo("inspect", *cert, "--creds", str(reg.creds), ref)
    assert out.returncode == 0, out.stderr
    # pushing without credentials fails too
    dest_cert = ["--dest-cert-dir", str(reg.cert_dir)]
    assert skopeo("copy", "--quiet", *dest_cert, busybox_image.ref, f"{ref}-anon").returncode != 0


def test_basic_challenge(registry_basic: Registry) -> None:
    status, headers, _ = http(registry_basic, "/v2/", auth=False)
    assert status == 401 and headers["Www-Authenticate"].startswith("Basic ")
    assert http(registry_basic, "/v2/")[0] == 200


def test_token_server(registry_token: Registry, busybox_image: Layout) -> None:
    reg, ts = registry_token, registry_token.token_server
    assert ts is not None
    status, headers, _ = http(reg, "/v2/")
    challenge = headers["Www-Authenticate"]
    assert status == 401 and challenge.startswith("Bearer ")
    assert f'realm="{ts.url}"' in challenge and 'service="bootstrap-test-registry"' in challenge
    reg.push(busybox_image, busybox_image.tag, "harness/token-srv:1")
    assert ts.requests and all(r.user == reg.username for r in ts.requests)
    assert ts.count("repository:harness/token-srv:pull,push") >= 1
    # the JWT grants exactly what was asked
    ctx = ssl.create_default_context(cafile=str(reg.ca_cert))
    req = urllib.request.Request(
        f"{ts.url}?service=bootstrap-test-registry&scope=repository:harness/token-srv:pull",
        headers={"Authorization": "Basic " + base64.b64encode(reg.creds.encode()).decode()},  # type: ignore[union-attr]
    )
    with urllib.request.urlopen(req, context=ctx) as r:
        doc = json.loads(r.read())
    assert doc["token"] == doc["access_token"] and doc["expires_in"] > 0
    claims = jwt_claims(doc["token"])
    assert claims["access"] == [
        {"type": "repository", "name": "harness/token-srv", "actions": ["pull"]}
    ]
    # the token works against the registry, for that scope only
    bearer = {"Authorization": f"Bearer {doc['token']}", "Accept": OCI_MANIFEST}
    status, _, body = http(reg, "/v2/harness/token-srv/manifests/1", bearer)
    assert status == 200 and json.loads(body)["mediaType"] == OCI_MANIFEST
    status, _, _ = http(reg, "/v2/harness/other/manifests/1", bearer)
    assert status == 401
    # anonymous: no grant on a private repository
    ts.reset()
    out = skopeo(
        "inspect", "--cert-dir", str(reg.cert_dir), f"docker://{reg.ref('harness/token-srv', '1')}"
    )
    assert out.returncode != 0
    assert ts.requests and ts.requests[-1].user is None and ts.requests[-1].granted == ()


def test_token_fault_injection(registry_token: Registry, busybox_image: Layout) -> None:
    reg, ts = registry_token, registry_token.token_server
    assert ts is not None
    reg.push(busybox_image, busybox_image.tag, "harness/token-fault:1")
    ts.reset()
    ts.fail_next(1, 503)
    with pytest.raises(RuntimeError):
        reg.inspect("harness/token-fault:1")
    assert ts.requests[0].status == 503
    reg.inspect("harness/token-fault:1")
    assert ts.requests[-1].status == 200


def test_token_public_repo_anonymous_pull(
    registry_factory: RegistryFactory, busybox_image: Layout
) -> None:
    reg = registry_factory("token", public=("pub/busybox",))
    reg.push(busybox_image, busybox_image.tag, "pub/busybox:1")
    reg.push(busybox_image, busybox_image.tag, "priv/busybox:1")
    cert = ["--cert-dir", str(reg.cert_dir)]
    assert skopeo("inspect", *cert, f"docker://{reg.ref('pub/busybox', '1')}").returncode == 0
    assert skopeo("inspect", *cert, f"docker://{reg.ref('priv/busybox', '1')}").returncode != 0
    # anonymous push to a public repository is still refused
    out = skopeo(
        "copy", "--quiet", "--dest-cert-dir", str(reg.cert_dir),
        busybox_image.ref, f"docker://{reg.ref('pub/busybox', '2')}",
    )  # fmt: skip
    assert out.returncode != 0


def test_registry_quirks(registry: Registry, busybox_image: Layout) -> None:
    registry.push(busybox_image, busybox_image.tag, "harness/quirks:1")
    path = "/v2/harness/quirks/manifests/1"
    assert http(registry, path)[0] == 404  # no OCI type in Accept: not found
    status, headers, body = http(registry, path, {"Accept": OCI_MANIFEST})
    assert status == 200 and headers["Docker-Content-Digest"] == busybox_image.image.manifest_digest
    layer = busybox_image.image.layers[0]
    status, headers, body = http(
        registry, f"/v2/harness/quirks/blobs/{layer}", {"Range": "bytes=10-19"}
    )
    assert status == 206 and len(body) == 10
    blob = (busybox_image / "blobs/sha256" / layer[7:]).read_bytes()
    assert body == blob[10:20]


def test_multi_platform_push(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    specs = [busybox_spec(architecture="amd64"), busybox_spec(architecture="arm64", variant="v8")]
    layout, index = image_builder.index(specs, tag="multi")
    registry.push(layout, "multi", "harness/multi:1", all=True)
    raw = registry.inspect("harness/multi:1", raw=True)
    assert raw["mediaType"] == OCI_INDEX
    status, headers, _ = http(registry, "/v2/harness/multi/manifests/1", {"Accept": OCI_INDEX})
    assert status == 200 and headers["Docker-Content-Digest"] == index.manifest_digest


def test_stop_start_keeps_content_and_port(
    registry_factory: RegistryFactory, busybox_image: Layout
) -> None:
    reg = registry_factory("basic")
    reg.push(busybox_image, busybox_image.tag, "harness/restart:1")
    pid, host = reg.proc.pid, reg.host  # type: ignore[union-attr]
    reg.stop()
    assert not reg.running and not Path(f"/proc/{pid}").exists()
    with pytest.raises(RuntimeError):
        reg.inspect("harness/restart:1")
    reg.start()
    assert reg.host == host
    assert reg.inspect("harness/restart:1")["Digest"] == busybox_image.image.manifest_digest


def test_two_private_registries_and_teardown(
    registry_factory: RegistryFactory, busybox_image: Layout
) -> None:
    a, b = registry_factory("plain"), registry_factory("tls")
    assert a.port != b.port and a.storage != b.storage
    a.push(busybox_image, busybox_image.tag, "m/busybox:1")
    with pytest.raises(RuntimeError):
        b.inspect("m/busybox:1")
    procs = [a.proc, b.proc]
    a.close()
    b.close()
    for p in procs:
        assert p is not None and p.poll() is not None
    mine = subprocess.run(
        ["pgrep", "-f", f"docker-registry serve {a.config_path}|{b.config_path}"],
        capture_output=True,
        text=True,
    )
    assert mine.stdout == ""


def test_docker_media_types_via_push_layout(
    any_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = any_registry
    layout = tmp_path / "docker-layout"
    single = build_image(layout, "one", busybox_spec(), docker=True)
    multi = build_index(
        layout,
        "multi",
        [busybox_spec(architecture="amd64"), busybox_spec(architecture="arm64", variant="v8")],
        docker=True,
    )
    name = f"harness/docker-{reg.mode}"
    assert reg.push_layout(layout, "one", f"{name}:1") == single.manifest_digest
    assert reg.push_layout(layout, "multi", f"{name}:multi") == multi.manifest_digest
    assert reg.inspect(f"{name}:1", raw=True)["mediaType"] == DOCKER_MANIFEST
    assert reg.inspect(f"{name}:multi", raw=True)["mediaType"] == DOCKER_LIST
    scope = f"repository:{name}:pull"
    status, headers, _ = reg.request(
        "GET", f"/v2/{name}/manifests/1", headers={"Accept": DOCKER_MANIFEST}, scope=scope
    )
    assert status == 200 and headers["Docker-Content-Digest"] == single.manifest_digest
    # registry quirk: without a v2 Accept, a v2s2 manifest is converted to signed schema 1
    status, headers, _ = reg.request("GET", f"/v2/{name}/manifests/1", scope=scope)
    assert status == 200 and headers["Content-Type"] == DOCKER_V1_SIGNED


def test_port_taken_before_start_moves_to_another(registry_factory: RegistryFactory) -> None:
    reg = registry_factory("tls", start=False)
    first = reg.host
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", reg.port))
        squatter.listen()
        reg.start()
    assert reg.host != first and reg.running
    assert (reg.certs_d / reg.host / "ca.crt").exists()  # type: ignore[operator]
    assert not (reg.certs_d / first).exists()  # type: ignore[operator]
    assert http(reg, "/v2/")[0] == 200
