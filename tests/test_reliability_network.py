"""Network faults end to end, beyond the client-level cases of tests/test_faults.py: through the
real ``bootstrap pull`` (exit codes, what is stored) and through ``pull_image`` under seeded
random fault mixes. Every case ends with the right image stored or with exit 3/4 and nothing
tagged; ``fsck`` is clean either way and no stored blob differs from what was pushed.

Cases: 5xx storms (recovering and endless), 429 with Retry-After on every blob, a truncation
storm (every blob response cut short), truncated and corrupted manifests, corrupted configs and
layers, seeded chaos (resets, truncations, flips, stalls, delays, 5xx/429 mixed), a blob
redirect to a hostile server (wrong bytes -> exit 4, nothing stored; the Authorization header
never reaches the other host), and a failing token server.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import ExitCode, IntegrityError, RegistryError
from bootstrap.http import new_session
from bootstrap.image import maintenance
from bootstrap.image.pull import pull_image
from bootstrap.image.reference import Reference
from bootstrap.image.registries import RegistriesConf
from bootstrap.image.registry import RegistryClient
from bootstrap.image.store import Store
from tests.harness.cli import Ran, bootstrap
from tests.harness.crashloop import FakeRegistry, Served, registries_env, serve_layout
from tests.harness.faultproxy import MANIFEST_PATH, FaultProxy
from tests.harness.imagebuilder import (
    BuiltImage,
    File,
    ImageSpec,
    Layer,
    blob_path,
    build_image,
    busybox_layer,
    random_content,
)
from tests.harness.registry import Registry

pytestmark = pytest.mark.slow

BIG = 1536 * 1024 + 777
CHAOS_ROUNDS = 16


@pytest.fixture(scope="module")
def net_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltImage]:
    layout = tmp_path_factory.mktemp("net") / "oci"
    spec = ImageSpec(
        layers=[
            busybox_layer(),
            Layer([File("data/big.bin", random_content(5, BIG))], level=1),
        ],
        cmd=("true",),
    )
    return layout, build_image(layout, "t", spec)


@dataclass
class Net:
    proxy: FaultProxy
    image: BuiltImage
    layout: Path
    ref: str
    env: dict[str, str]
    store: Store

    @property
    def blobs(self) -> list[str]:
        return [self.image.config_digest, *self.image.layers]

    def pull(self, ref: str | None = None) -> Ran:
        return bootstrap("pull", ref or self.ref, store=self.store.root, env=self.env)

    def assert_nothing_wrong_stored(self) -> None:
        """fsck clean, no temp file, and every stored blob byte-identical to the source."""
        report = maintenance.fsck(self.store)
        assert report.ok, report.findings()
        if self.store.tmp.exists():
            assert list(self.store.tmp.iterdir()) == []
        if self.store.blobs.exists():
            for p in (self.store.blobs / "sha256").iterdir():
                src = blob_path(self.layout, f"sha256:{p.name}")
                if src.exists():
                    assert p.read_bytes() == src.read_bytes(), p.name

    def assert_pulled(self, ran: Ran) -> None:
        assert ran.rc == 0, ran.stderr
        assert ran.stdout.strip() == self.image.digest
        assert self.store.resolve(str(Reference.parse(self.ref))).digest == self.image.digest
        for d in self.blobs:
            assert self.store.has_blob(d)
        self.assert_nothing_wrong_stored()

    def assert_failed(self, ran: Ran, *codes: int) -> None:
        assert ran.rc in codes, (ran.rc, ran.stderr)
        lines = [x for x in ran.stderr.splitlines() if x.startswith("bootstrap: error:")]
        assert len(lines) == 1, ran.stderr
        assert "Traceback" not in ran.stderr
        assert not self.store.root.exists() or self.store.images() == []
        self.assert_nothing_wrong_stored()


@pytest.fixture
def net(
    registry: Registry,
    net_image: tuple[Path, BuiltImage],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Net]:
    layout, image = net_image
    repo = "net/" + request.node.name.lower().replace("[", "-").replace("]", "")[:50]
    repo = "".join(c if c.isalnum() or c in "/-" else "-" for c in repo)
    registry.push(layout, "t", f"{repo}:1")
    with FaultProxy.for_registry(registry) as proxy:
        yield Net(
            proxy,
            image,
            layout,
            proxy.ref(repo, "1"),
            registries_env(tmp_path, proxy.host),
            Store(tmp_path / "store"),
        )


# ---- through the CLI ---------------------------------------------------------------------------


def test_5xx_storm_recovers(net: Net) -> None:
    statuses = [500, 502, 503, 504]
    for i, path in enumerate([MANIFEST_PATH, *net.blobs]):
        net.proxy.add("status", path, status=statuses[i % 4], times=2)
    ran = net.pull()
    net.assert_pulled(ran)
    for path in [MANIFEST_PATH, *net.blobs]:
        assert [r.status for r in net.proxy.matching(path)][-1] == 200


def test_5xx_forever_is_exit_3_in_bounded_time(net: Net) -> None:
    net.proxy.add("status", MANIFEST_PATH, status=503, times=-1)
    started = time.monotonic()
    ran = net.pull()
    assert time.monotonic() - started < 30
    net.assert_failed(ran, ExitCode.REGISTRY)
    assert "503" in ran.stderr
    assert 2 <= net.proxy.count(MANIFEST_PATH) <= 6  # retried, but bounded


def test_429_retry_after_on_every_blob(net: Net) -> None:
    for d in net.blobs:
        net.proxy.add("status", d, status=429, retry_after="1", times=1)
    started = time.monotonic()
    ran = net.pull()
    assert time.monotonic() - started >= 1.0
    net.assert_pulled(ran)
    for d in net.blobs:
        assert [r.status for r in net.proxy.matching(d)] == [429, 200]


def test_truncation_storm_resumes_every_blob(net: Net) -> None:
    big = net.image.layers[-1]
    net.proxy.add("truncate", big, after=400_000, times=-1)
    ran = net.pull()
    net.assert_pulled(ran)
    reqs = net.proxy.matching(big)
    assert len(reqs) >= 4
    assert all(r.range for r in reqs[1:])  # each retry resumed where the last one stopped


def test_truncated_manifest_is_exit_3(net: Net) -> None:
    net.proxy.add("truncate", MANIFEST_PATH, after=40, times=-1)
    net.assert_failed(net.pull(), ExitCode.REGISTRY)
    net.proxy.clear()
    net.assert_pulled(net.pull())


@pytest.mark.parametrize("which", ["config", "busybox-layer", "big-layer"])
def test_corrupted_blob_is_exit_4_and_never_stored(net: Net, which: str) -> None:
    digest = {"config": net.blobs[0], "busybox-layer": net.blobs[1], "big-layer": net.blobs[2]}[
        which
    ]
    size = {
        net.blobs[0]: net.image.config_size,
        **dict(zip(net.image.layers, net.image.layer_sizes, strict=True)),
    }[digest]
    net.proxy.add("flip", digest, after=size // 2, times=-1)
    ran = net.pull()
    net.assert_failed(ran, ExitCode.INTEGRITY)
    assert digest in ran.stderr
    assert not net.store.has_blob(digest)
    net.proxy.clear()
    net.assert_pulled(net.pull())


def test_corrupted_manifest_by_digest_is_exit_4(net: Net) -> None:
    net.proxy.add("flip", MANIFEST_PATH, after=30, times=-1)
    ran = net.pull(net.ref.rsplit(":", 1)[0] + "@" + net.image.digest)
    net.assert_failed(ran, ExitCode.INTEGRITY)
    assert net.store.blobs.exists() is False or not any((net.store.blobs / "sha256").iterdir())


def test_corrupted_manifest_by_tag_never_stores_a_wrong_blob(net: Net) -> None:
    # a flipped byte in a manifest fetched by tag cannot be caught by a digest: it must end in
    # bad JSON (4), a digest nobody has (3) or a size mismatch (4), never in a wrong blob
    for offset in (5, 60, 120, 200, 300):
        net.proxy.clear()
        net.proxy.add("flip", MANIFEST_PATH, after=offset, times=-1)
        ran = net.pull()
        assert ran.rc in (0, ExitCode.REGISTRY, ExitCode.INTEGRITY), ran.stderr
        net.assert_nothing_wrong_stored()
        if ran.rc == 0:  # the flip hit insignificant bytes (whitespace cannot exist: compact)
            raise AssertionError(f"a corrupted manifest was accepted (offset {offset})")


# ---- seeded chaos through pull_image ------------------------------------------------------------


def _client(proxy: FaultProxy) -> RegistryClient:
    conf = RegistriesConf.parse(
        f'[[registry]]\nlocation = "{proxy.host}"\ninsecure = true\n', "chaos.conf"
    )
    return RegistryClient(
        RegistriesConf(conf.registries, certs_dirs=()),
        None,
        new_session(retries=2, backoff=0.05, read_timeout=0.5),
        blob_backoff=0.05,
        blob_attempts=3,
    )


def test_seeded_chaos(net: Net, tmp_path: Path) -> None:
    rng = random.Random(4242)
    outcomes: dict[str, int] = {}
    paths = [MANIFEST_PATH, *net.blobs]
    sizes = [600, net.image.config_size, *net.image.layer_sizes]
    for rnd in range(CHAOS_ROUNDS):
        net.proxy.clear()
        store = Store(tmp_path / f"chaos{rnd}")
        faults = []
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(paths))
            kind = rng.choice(["reset", "truncate", "flip", "stall", "status", "status", "delay"])
            kw: dict[str, Any] = {"times": rng.choice([1, 1, 2, 3, -1])}
            if kind in ("reset", "truncate", "flip", "stall"):
                kw["after"] = rng.randrange(max(1, sizes[i]))
            if kind in ("stall", "delay"):
                kw["seconds"] = 2.0
                kw["times"] = min(kw["times"], 2) if kw["times"] > 0 else 2
            if kind == "status":
                kw["status"] = rng.choice([500, 502, 503, 429])
                if kw["status"] == 429:
                    kw["retry_after"] = "0"
            net.proxy.add(kind, paths[i], **kw)
            faults.append(f"{kind}@{i}{kw}")
        try:
            with _client(net.proxy) as client:
                result = pull_image(store, Reference.parse(net.ref), client=client)
            outcome = "ok"
            assert result.digest == net.image.digest
            for d in net.blobs:
                assert store.blob_path(d).read_bytes() == blob_path(net.layout, d).read_bytes()
        except (RegistryError, IntegrityError) as exc:
            outcome = f"exit {int(exc.exit_code)}"
            assert store.images() == [], faults
            assert "\n" not in exc.message
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        report = maintenance.fsck(store)
        assert report.ok, (faults, report.findings())
        assert not list(store.tmp.iterdir()), faults
        for p in (store.blobs / "sha256").iterdir():  # nothing stored that was not pushed
            assert p.read_bytes() == blob_path(net.layout, f"sha256:{p.name}").read_bytes()
    print(f"\nchaos: {CHAOS_ROUNDS} rounds: {outcomes}")
    assert outcomes.get("ok", 0) >= 1


# ---- redirects to a hostile host ----------------------------------------------------------------


@dataclass
class Redirect:
    front: FakeRegistry
    hostile: FakeRegistry
    image: BuiltImage
    layout: Path
    env: dict[str, str]
    store: Store
    ref: str


@pytest.fixture
def redirect(net_image: tuple[Path, BuiltImage], tmp_path: Path) -> Iterator[Redirect]:
    layout, image = net_image
    with FakeRegistry() as front, FakeRegistry() as hostile:
        front.challenge = 'Basic realm="front"'
        serve_layout(front, "r/img", "1", layout, image.digest)
        env = registries_env(tmp_path, front.host)
        auth = tmp_path / "auth.json"
        token = base64.b64encode(b"user:secret-password").decode()
        auth.write_text(json.dumps({"auths": {front.host: {"auth": token}}}))
        env["REGISTRY_AUTH_FILE"] = str(auth)
        yield Redirect(
            front, hostile, image, layout, env, Store(tmp_path / "store"), f"{front.host}/r/img:1"
        )


def _redirect_blob(r: Redirect, digest: str, target_host: str) -> None:
    r.front.routes[f"r/img/blobs/{digest}"] = Served(
        status=307, headers={"Location": f"http://{target_host}/storage/{digest}"}
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("lie", ["same-size", "longer", "shorter"])
def test_blob_redirect_to_hostile_host(redirect: Redirect, host: str, lie: str) -> None:
    r = redirect
    digest = r.image.layers[-1]
    good = blob_path(r.layout, digest).read_bytes()
    bad = {
        "same-size": bytes(b ^ 0x55 for b in good[:4096]) + good[4096:],
        "longer": good + b"x" * 1000,
        "shorter": good[:-1000],
    }[lie]
    _redirect_blob(r, digest, f"{host}:{r.hostile.port}")
    r.hostile.routes[f"/storage/{digest}"] = Served(bad)
    ran = bootstrap("pull", r.ref, store=r.store.root, env=r.env)
    assert ran.rc == ExitCode.INTEGRITY, ran.stderr
    assert digest in ran.stderr
    assert not r.store.has_blob(digest)
    assert r.store.images() == []
    assert maintenance.fsck(r.store).ok and not list(r.store.tmp.iterdir())
    # the front got the credentials; the other host never did
    assert any("Authorization" in s.headers for s in r.front.seen if "/blobs/" in s.path)
    assert r.hostile.seen, "the redirect was not followed"
    assert all("Authorization" not in s.headers for s in r.hostile.seen), r.hostile.seen


def test_blob_redirect_to_honest_storage_works_without_leaking(redirect: Redirect) -> None:
    r = redirect
    for digest in r.image.layers:
        _redirect_blob(r, digest, f"localhost:{r.hostile.port}")
        r.hostile.routes[f"/storage/{digest}"] = Served(blob_path(r.layout, digest).read_bytes())
    ran = bootstrap("pull", r.ref, store=r.store.root, env=r.env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == r.image.digest
    assert maintenance.fsck(r.store).ok
    assert len(r.hostile.seen) == len(r.image.layers)
    assert all("Authorization" not in s.headers for s in r.hostile.seen)


def test_redirect_loop_is_exit_3(redirect: Redirect) -> None:
    r = redirect
    digest = r.image.layers[-1]
    _redirect_blob(r, digest, f"127.0.0.1:{r.hostile.port}")
    r.hostile.routes[f"/storage/{digest}"] = Served(
        status=302, headers={"Location": f"http://127.0.0.1:{r.hostile.port}/storage/{digest}"}
    )
    started = time.monotonic()
    ran = bootstrap("pull", r.ref, store=r.store.root, env=r.env)
    assert time.monotonic() - started < 60
    assert ran.rc == ExitCode.REGISTRY, ran.stderr
    assert "Traceback" not in ran.stderr
    assert not r.store.has_blob(digest) and r.store.images() == []
    assert maintenance.fsck(r.store).ok


# ---- a token server that errors -----------------------------------------------------------------


def _token_env(reg: Registry, tmp_path: Path) -> dict[str, str]:
    conf = tmp_path / "registries-token.conf"
    conf.write_text("")
    env = {"REGISTRIES_CONFIG_PATH": str(conf), "REGISTRY_AUTH_FILE": str(reg.auth_file)}
    if reg.certs_d is not None:
        env["BOOTSTRAP_CERTS_D"] = str(reg.certs_d)
    return env


@pytest.fixture
def token_image(
    registry_token: Registry, net_image: tuple[Path, BuiltImage], tmp_path: Path
) -> tuple[Registry, str, dict[str, str]]:
    layout, _ = net_image
    registry_token.push(layout, "t", "net/token:1")
    assert registry_token.token_server is not None
    registry_token.token_server.reset()
    return (
        registry_token,
        registry_token.ref("net/token", "1"),
        _token_env(registry_token, tmp_path),
    )


def test_token_server_errors_then_recovers(
    token_image: tuple[Registry, str, dict[str, str]],
    net_image: tuple[Path, BuiltImage],
    tmp_path: Path,
) -> None:
    reg, ref, env = token_image
    assert reg.token_server is not None
    reg.token_server.fail_next(2, 500)
    store = Store(tmp_path / "store")
    ran = bootstrap("pull", ref, store=store.root, env=env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == net_image[1].digest
    assert maintenance.fsck(store).ok


@pytest.mark.parametrize(("status", "word"), [(503, "token server"), (401, "authentication")])
def test_token_server_failing_is_exit_3(
    token_image: tuple[Registry, str, dict[str, str]], tmp_path: Path, status: int, word: str
) -> None:
    reg, ref, env = token_image
    assert reg.token_server is not None
    reg.token_server.fail_next(50, status)
    store = Store(tmp_path / "store")
    started = time.monotonic()
    ran = bootstrap("pull", ref, store=store.root, env=env)
    assert time.monotonic() - started < 40
    assert ran.rc == ExitCode.REGISTRY, ran.stderr
    assert word in ran.stderr
    assert "Traceback" not in ran.stderr
    assert not store.root.exists() or store.images() == []
    assert maintenance.fsck(store).ok
    reg.token_server.reset()
