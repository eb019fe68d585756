"""registries.conf / certs.d parsing (no network), then the registry client against real
docker-registry instances in all four modes (plain, tls, basic, token)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import ExitCode, IntegrityError, RegistryError, UsageError
from bootstrap.http import new_session
from bootstrap.image import registries
from bootstrap.image.auth import Credentials, load_credentials
from bootstrap.image.manifest import parse_config, parse_manifest, select_platform
from bootstrap.image.model import (
    MAX_CONFIG_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
)
from bootstrap.image.reference import Reference
from bootstrap.image.registries import RegistriesConf, tls_files
from bootstrap.image.registry import FetchedManifest, NotFoundError, RegistryClient
from tests.harness.image_fixtures import ImageBuilder
from tests.harness.imagebuilder import BuiltImage, busybox_spec
from tests.harness.registry import Registry, free_port
from tests.harness.tls import serve_tls

F64 = "sha256:" + "f" * 64

# =============================================================================================
# registries.conf


def _conf(text: str) -> RegistriesConf:
    return RegistriesConf.parse(text, "test.conf")


def _hosts(conf: RegistriesConf, ref: str) -> list[tuple[str, str, bool, bool]]:
    return [
        (e.host, str(e.reference), e.insecure, e.mirror)
        for e in conf.endpoints(Reference.parse(ref))
    ]


def test_no_config_is_the_registry_itself() -> None:
    conf = RegistriesConf()
    assert _hosts(conf, "busybox") == [
        ("docker.io", "docker.io/library/busybox:latest", False, False)
    ]
    ep = conf.endpoints(Reference.parse("busybox"))[0]
    assert ep.api_host == "registry-1.docker.io"
    assert conf.unqualified_search("busybox") == [Reference.parse("docker.io/library/busybox")]


MIRRORS = """
unqualified-search-registries = ["reg.example:5000", "docker.io"]

[[registry]]
prefix = "example.com/foo"
location = "internal.example.com/bar"
insecure = true

[[registry.mirror]]
location = "mirror-1.local/mirror-for-foo"

[[registry.mirror]]
location = "mirror-2.local:5000"
insecure = true

[[registry]]
location = "example.com"

[[registry]]
location = "digest-only.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.local"

[[registry]]
location = "mixed.example"
[[registry.mirror]]
location = "d.local"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "t.local"
pull-from-mirror = "tag-only"

[[registry]]
prefix = "*.wild.example"
[[registry.mirror]]
location = "wm.local"

[[registry]]
location = "blocked.example"
blocked = true

[aliases]
"myapp" = "reg.example:5000/team/myapp"
"""


def test_mirrors_rewrite_and_order() -> None:
    conf = _conf(MIRRORS)
    assert _hosts(conf, "example.com/foo/img:1") == [
        ("mirror-1.local", "mirror-1.local/mirror-for-foo/img:1", False, True),
        ("mirror-2.local:5000", "mirror-2.local:5000/img:1", True, True),
        ("internal.example.com", "internal.example.com/bar/img:1", True, False),
    ]
    # the longest prefix wins; a different prefix of the same host does not get the mirrors
    assert _hosts(conf, "example.com/other/img") == [
        ("example.com", "example.com/other/img:latest", False, False)
    ]
    # "example.com" must not match "example.com.evil" or "example.com:5000"
    assert _hosts(conf, "example.com.evil/x") == [
        ("example.com.evil", "example.com.evil/x:latest", False, False)
    ]
    assert _hosts(conf, "example.com:5000/x")[0][0] == "example.com:5000"


def test_mirror_by_digest_only_and_pull_from_mirror() -> None:
    conf = _conf(MIRRORS)
    assert [h for h, *_ in _hosts(conf, "digest-only.example/a:t")] == ["digest-only.example"]
    assert [h for h, *_ in _hosts(conf, f"digest-only.example/a@{F64}")] == [
        "m.local",
        "digest-only.example",
    ]
    assert [h for h, *_ in _hosts(conf, "mixed.example/a:t")] == ["t.local", "mixed.example"]
    assert [h for h, *_ in _hosts(conf, f"mixed.example/a@{F64}")] == [
        "d.local",
        "mixed.example",
    ]


def test_wildcard_prefix() -> None:
    conf = _conf(MIRRORS)
    assert _hosts(conf, "a.wild.example/x/y:1") == [
        ("wm.local", "wm.local/x/y:1", False, True),
        ("a.wild.example", "a.wild.example/x/y:1", False, False),
    ]
    assert _hosts(conf, "wild.example/x") == [
        ("wild.example", "wild.example/x:latest", False, False)
    ]


def test_blocked() -> None:
    conf = _conf(MIRRORS)
    with pytest.raises(UsageError) as info:
        conf.endpoints(Reference.parse("blocked.example/a"))
    assert "blocked" in info.value.message
    assert "test.conf" in info.value.hint


def test_unqualified_search_and_aliases() -> None:
    conf = _conf(MIRRORS)
    assert [str(r) for r in conf.unqualified_search("busybox:1")] == [
        "reg.example:5000/busybox:1",
        "docker.io/library/busybox:1",
    ]
    assert [str(r) for r in conf.unqualified_search("team/app")] == [
        "reg.example:5000/team/app:latest",
        "docker.io/team/app:latest",
    ]
    assert [str(r) for r in conf.unqualified_search("quay.io/x/y")] == ["quay.io/x/y:latest"]
    assert [str(r) for r in conf.unqualified_search("myapp:2")] == ["reg.example:5000/team/myapp:2"]
    with pytest.raises(UsageError):
        conf.unqualified_search("Bad Name")


def test_insecure_host_applies_to_other_prefix_of_host() -> None:
    conf = _conf('[[registry]]\nlocation = "127.0.0.1:5000"\ninsecure = true\n')
    assert _hosts(conf, "127.0.0.1:5000/a/b") == [
        ("127.0.0.1:5000", "127.0.0.1:5000/a/b:latest", True, False)
    ]
    # not insecure by default, even on loopback (as containers/image)
    assert _hosts(RegistriesConf(), "127.0.0.1:5000/a")[0][2] is False


def test_v1_format() -> None:
    conf = _conf(
        '[registries.search]\nregistries = ["a.example"]\n'
        '[registries.insecure]\nregistries = ["b.example:5000"]\n'
        '[registries.block]\nregistries = ["c.example"]\n'
    )
    assert conf.unqualified_search_registries == ("a.example",)
    assert _hosts(conf, "b.example:5000/x")[0][2] is True
    with pytest.raises(UsageError):
        conf.endpoints(Reference.parse("c.example/x"))


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("this is = not toml [", "not valid TOML"),
        ("[[registry]]\ninsecure = true\n", "registry[0]: both location and prefix are unset"),
        ('[[registry]]\nlocation = "https://x.example"\n', "registry[0].location"),
        ('[[registry]]\nlocation = "x.example"\ninsecure = "yes"\n', "registry[0].insecure"),
        ('[[registry]]\nlocation = "x.example"\nfoo = 1\n', "registry[0].foo: unknown key"),
        (
            '[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\ninsecure = true\n',
            "registry[0].mirror[0].location",
        ),
        (
            '[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\nlocation = "m"\n'
            'pull-from-mirror = "sometimes"\n',
            "pull-from-mirror",
        ),
        (
            '[[registry]]\nlocation = "x.example"\nmirror-by-digest-only = true\n'
            '[[registry.mirror]]\nlocation = "m.example"\npull-from-mirror = "all"\n',
            "mirror-by-digest-only",
        ),
        ('[[registry]]\nprefix = "*.x.example/ns"\n', "wildcard"),
        ('[[registry]]\nprefix = "x.example/ns"\n', "location: unset"),
        ('[[registry]]\nlocation = "X.example/UPPER"\n', "is not host[:port]"),
        ('unqualified-search-registries = ["a b"]\n', "unqualified-search-registries[0]"),
        ("unqualified-search-registries = 5\n", "unqualified-search-registries"),
        (
            '[[registry]]\nlocation = "a.example"\n[[registry]]\nprefix = "a.example/x"\n'
            'location = "a.example"\ninsecure = true\n',
            "conflicting",
        ),
        (
            '[registries.search]\nregistries = ["a"]\n[[registry]]\nlocation = "b.example"\n',
            "mixing",
        ),
        ('short-name-mode = "sometimes"\n', "short-name-mode"),
        ('[aliases]\n"x" = "short"\n', "aliases.x"),
        ("wat = 1\n", "wat: unknown key"),
    ],
)
def test_malformed_registries_conf(text: str, word: str) -> None:
    with pytest.raises(UsageError) as info:
        _conf(text)
    assert info.value.exit_code == ExitCode.USAGE
    assert "test.conf" in info.value.message
    assert word in info.value.message
    assert info.value.hint


def test_load_paths(tmp_path: Path) -> None:
    f = tmp_path / "r.conf"
    f.write_text('unqualified-search-registries = ["a.example"]\n')
    assert registries.load(f).unqualified_search_registries == ("a.example",)
    env = {"REGISTRIES_CONFIG_PATH": str(f)}
    assert registries.load(env=env).sources == (str(f),)
    with pytest.raises(UsageError) as info:
        registries.load(tmp_path / "missing.conf")
    assert "missing.conf" in info.value.message
    bad = tmp_path / "bad.conf"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError):
        registries.load(bad)


def test_certs_d(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (b / "h:1").mkdir(parents=True)
    (b / "h:1" / "ca.crt").write_text("x")
    (b / "h:1" / "extra.crt").write_text("x")
    (b / "h:1" / "client.cert").write_text("x")
    (b / "h:1" / "client.key").write_text("x")
    (b / "h:1" / "README").write_text("x")
    files = tls_files("h:1", [a, b])
    assert files.ca_files == (str(b / "h:1/ca.crt"), str(b / "h:1/extra.crt"))
    assert files.client_certs == ((str(b / "h:1/client.cert"), str(b / "h:1/client.key")),)
    assert tls_files("other:1", [a, b]).ca_files == ()
    (a / "h:1").mkdir(parents=True)  # the first directory with the host wins, even if empty
    assert tls_files("h:1", [a, b]).ca_files == ()
    (a / "h:1" / "lonely.key").write_text("x")
    with pytest.raises(UsageError) as info:
        tls_files("h:1", [a, b])
    assert "lonely.key" in info.value.message
    env = {"BOOTSTRAP_CERTS_D": f"{a}:{b}"}
    assert registries.certs_dirs(env) == (a, b)
    assert registries.certs_dirs({}) == registries.SYSTEM_CERTS_DIRS


# =============================================================================================
# against real registries


def _client(reg: Registry, **kw: Any) -> RegistryClient:
    """A client that trusts ``reg``'s CA (certs.d) and has its credentials, nothing else."""
    conf = RegistriesConf(certs_dirs=(str(reg.certs_d),) if reg.certs_d else ())
    if reg.mode == "plain":
        insecure = RegistriesConf.parse(f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true')
        conf = RegistriesConf(insecure.registries, certs_dirs=())
    creds = load_credentials([reg.auth_file]) if reg.auth_file else Credentials.empty()
    return RegistryClient(conf, creds, kw.pop("session", None) or new_session(retries=1), **kw)


@pytest.fixture
def pushed(
    any_registry: Registry, image_builder: ImageBuilder, request: pytest.FixtureRequest
) -> tuple[Registry, str, BuiltImage]:
    """A small image pushed to each registry mode under a name unique to the test."""
    layout, image = image_builder(busybox_spec(cmd=("echo", "hi")))
    name = f"client/{request.node.name.split('[')[0].replace('_', '-')}"
    any_registry.push(layout, "t", f"{name}:v1")
    return any_registry, name, image


def _sink() -> tuple[Callable[[bytes], None], Any, list[int]]:
    h = hashlib.sha256()
    count = [0]

    def write(b: bytes) -> None:
        h.update(b)
        count[0] += len(b)

    return write, h, count


@pytest.mark.slow
def test_pull_all_modes(pushed: tuple[Registry, str, BuiltImage]) -> None:
    reg, name, image = pushed
    with _client(reg) as client:
        assert client.ping(Reference.parse(reg.ref(name))).startswith(
            "http://" if reg.mode == "plain" else "https://"
        )
        ref = Reference.parse(reg.ref(name, "v1"))
        fetched = client.get_manifest(ref)
        assert isinstance(fetched, FetchedManifest)
        assert fetched.digest == image.manifest_digest
        assert fetched.media_type == OCI_MANIFEST
        assert fetched.endpoint == reg.host
        manifest = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(manifest, Manifest)
        cfg_bytes = client.get_blob_bytes(ref, manifest.config, MAX_CONFIG_BYTES)
        config = parse_config(cfg_bytes, manifest.config.digest)
        assert config.cmd == ("echo", "hi")
        assert config.diff_ids == image.diff_ids
        for layer in manifest.layers:
            write, h, count = _sink()
            seen: list[int] = []
            client.get_blob(ref, layer, write, progress=seen.append, endpoint=fetched.endpoint)
            assert "sha256:" + h.hexdigest() == layer.digest
            assert count[0] == layer.size == sum(seen)
        # by digest: verified bytes, same answer
        pinned = client.get_manifest(ref.with_digest(fetched.digest))
        assert pinned.data == fetched.data
        assert client.get_manifest(ref, fetched.digest).digest == fetched.digest


@pytest.mark.slow
def test_not_found(pushed: tuple[Registry, str, BuiltImage]) -> None:
    reg, name, _image = pushed
    with _client(reg) as client:
        with pytest.raises(RegistryError) as info:
            client.get_manifest(Reference.parse(reg.ref(name, "nope")))
        assert info.value.exit_code == ExitCode.REGISTRY
        assert "nope" in info.value.message
        assert isinstance(info.value, NotFoundError)
        ref = Reference.parse(reg.ref(name, "v1"))
        missing = Descriptor(OCI_MANIFEST, F64, 10)
        with pytest.raises(RegistryError) as info:
            client.get_blob(ref, missing, lambda b: None)
        assert F64 in info.value.message


@pytest.mark.slow
def test_digest_mismatch_is_integrity_error(pushed: tuple[Registry, str, BuiltImage]) -> None:
    reg, name, _image = pushed
    with _client(reg) as client:
        ref = Reference.parse(reg.ref(name, "v1"))
        fetched = client.get_manifest(ref)
        # ask the registry for the manifest by digest but claim the config's size/digest
        # mismatch through get_blob_bytes with a wrong size
        m = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(m, Manifest)
        wrong = Descriptor(m.config.media_type, m.config.digest, m.config.size + 5)
        with pytest.raises(IntegrityError):
            client.get_blob_bytes(ref, wrong, MAX_CONFIG_BYTES)
        small = Descriptor(m.config.media_type, m.config.digest, m.config.size - 1)
        with pytest.raises(IntegrityError) as info:
            client.get_blob(ref, small, lambda b: None)
        assert info.value.exit_code == ExitCode.INTEGRITY
        with pytest.raises(IntegrityError):
            client.get_blob_bytes(ref, m.config, 10)


@pytest.mark.slow
def test_token_flow_caches_tokens(registry_token: Registry, image_builder: ImageBuilder) -> None:
    reg = registry_token
    layout, _image = image_builder(busybox_spec(cmd=("true",)))
    reg.push(layout, "t", "tok/cached:v1")
    assert reg.token_server is not None
    reg.token_server.reset()
    with _client(reg) as client:
        ref = Reference.parse(reg.ref("tok/cached", "v1"))
        fetched = client.get_manifest(ref)
        m = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(m, Manifest)
        client.get_blob_bytes(ref, m.config, MAX_CONFIG_BYTES)
        for layer in m.layers:
            client.get_blob(ref, layer, lambda b: None)
        client.get_manifest(ref)
        # one token for the whole pull (same realm, service, scope)
        assert reg.token_server.count() == 1
        req = reg.token_server.requests[0]
        assert req.user == reg.username
        # a token the registry rejects (server restarted with new key? simulate: drop and
        # poison the cache) is refreshed once on 401
        key = next(iter(client.tokens._tokens))
        from bootstrap.image.auth import Token

        client.tokens.put(key, Token("garbage", time.monotonic() + 600))
        assert client.get_manifest(ref).digest == fetched.digest
        assert reg.token_server.count() == 2


@pytest.mark.slow
def test_token_anonymous(
    registry_factory: Callable[..., Registry], image_builder: ImageBuilder
) -> None:
    reg = registry_factory("token", public=("pub/img",))
    layout, image = image_builder(busybox_spec(cmd=("true",)))
    reg.push(layout, "t", "pub/img:v1")
    reg.push(layout, "t", "priv/img:v1")
    assert reg.token_server is not None
    reg.token_server.reset()
    conf = RegistriesConf(certs_dirs=(str(reg.certs_d),))
    with RegistryClient(conf, Credentials.empty(), new_session(retries=1)) as client:
        fetched = client.get_manifest(Reference.parse(reg.ref("pub/img", "v1")))
        assert fetched.digest == image.manifest_digest
        assert reg.token_server.requests[-1].user is None
        with pytest.raises(RegistryError) as info:
            client.get_manifest(Reference.parse(reg.ref("priv/img", "v1")))
        assert "credentials" in info.value.hint


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["basic", "token"])
def test_wrong_password(mode: str, request: pytest.FixtureRequest) -> None:
    reg: Registry = request.getfixturevalue(f"registry_{mode}")
    conf = RegistriesConf(certs_dirs=(str(reg.certs_d),))
    creds = Credentials.from_entries({reg.host: (str(reg.username), "wrong-password")})
    with (
        RegistryClient(conf, creds, new_session(retries=1)) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.get_manifest(Reference.parse(reg.ref("any/thing", "v1")))
    assert info.value.exit_code == ExitCode.REGISTRY
    assert "authentication failed" in info.value.message
    assert "credentials" in info.value.hint
    # and without any credentials
    with (
        RegistryClient(conf, Credentials.empty(), new_session(retries=1)) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.get_manifest(Reference.parse(reg.ref("any/thing", "v1")))
    assert "auth" in info.value.hint


@pytest.mark.slow
def test_tls_without_ca(registry_tls: Registry) -> None:
    conf = RegistriesConf(certs_dirs=())
    with (
        RegistryClient(conf, Credentials.empty(), new_session(retries=1)) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.get_manifest(Reference.parse(registry_tls.ref("x/y", "v1")))
    assert "TLS" in info.value.message
    assert "certs.d" in info.value.hint
    assert registry_tls.host in info.value.hint
    # insecure = true in registries.conf: verification off
    insecure = RegistriesConf.parse(
        f'[[registry]]\nlocation = "{registry_tls.host}"\ninsecure = true\n', "t.conf"
    )
    insecure = RegistriesConf(insecure.registries, certs_dirs=())
    with RegistryClient(insecure, Credentials.empty(), new_session(retries=1)) as client:
        assert client.ping(Reference.parse(registry_tls.ref("x/y"))).startswith("https://")


@pytest.mark.slow
def test_plain_http_needs_insecure(registry: Registry) -> None:
    with (
        RegistryClient(RegistriesConf(certs_dirs=()), None, new_session(retries=1)) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.ping(Reference.parse(registry.ref("x/y")))
    assert info.value.exit_code == ExitCode.REGISTRY
    conf = RegistriesConf.parse(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    with RegistryClient(conf, None, new_session(retries=1)) as client:
        assert client.ping(Reference.parse(registry.ref("x/y"))) == f"http://{registry.host}"


@pytest.mark.slow
def test_mirrors(
    registry_factory: Callable[..., Registry], image_builder: ImageBuilder, tmp_path: Path
) -> None:
    upstream = registry_factory("tls")
    mirror1 = registry_factory("plain")
    mirror2 = registry_factory("tls")
    layout, _image = image_builder(busybox_spec(cmd=("echo", "mirror")))
    for reg in (upstream, mirror1, mirror2):
        reg.push(layout, "t", "mirrored/img:v1")
    certs = tmp_path / "certs.d"
    for reg in (upstream, mirror2):
        assert reg.certs_d is not None
        d = certs / reg.host
        d.mkdir(parents=True)
        (d / "ca.crt").write_bytes((reg.certs_d / reg.host / "ca.crt").read_bytes())
    text = (
        f'[[registry]]\nlocation = "{upstream.host}"\n'
        f'[[registry.mirror]]\nlocation = "{mirror1.host}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{mirror2.host}"\n'
    )
    conf = RegistriesConf.parse(text, "mirrors.conf")
    conf = RegistriesConf(conf.registries, certs_dirs=(str(certs),))
    ref = Reference.parse(upstream.ref("mirrored/img", "v1"))
    with RegistryClient(conf, None, new_session(retries=0)) as client:
        assert client.get_manifest(ref).endpoint == mirror1.host
    mirror1.stop()
    with RegistryClient(conf, None, new_session(retries=0)) as client:
        fetched = client.get_manifest(ref)
        assert fetched.endpoint == mirror2.host
        m = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(m, Manifest)
        for layer in m.layers:
            write, h, _ = _sink()
            client.get_blob(ref, layer, write, endpoint=fetched.endpoint)
            assert "sha256:" + h.hexdigest() == layer.digest
    mirror2.stop()
    with RegistryClient(conf, None, new_session(retries=0)) as client:
        assert client.get_manifest(ref).endpoint == upstream.host
    # a tag only the upstream has: mirrors answer 404, upstream serves it
    upstream.push(layout, "t", "mirrored/img:only-up")
    mirror1.start()
    with RegistryClient(conf, None, new_session(retries=0)) as client:
        only = client.get_manifest(Reference.parse(upstream.ref("mirrored/img", "only-up")))
        assert only.endpoint == upstream.host
        with pytest.raises(NotFoundError) as info:
            client.get_manifest(Reference.parse(upstream.ref("mirrored/img", "nowhere")))
        assert "not found" in info.value.message


@pytest.mark.slow
def test_index_platform_selection(registry_basic: Registry, image_builder: ImageBuilder) -> None:
    host = Platform.host()
    other = "arm64" if host.architecture != "arm64" else "amd64"
    specs = [
        busybox_spec(
            cmd=("echo", "other"), architecture=other, variant="v8" if other == "arm64" else ""
        ),
        busybox_spec(cmd=("echo", "host")),
    ]
    layout, image = image_builder.index(specs)
    registry_basic.push(layout, "t", "multi/img:v1", all=True)
    with _client(registry_basic) as client:
        ref = Reference.parse(registry_basic.ref("multi/img", "v1"))
        fetched = client.get_manifest(ref)
        assert fetched.media_type == OCI_INDEX
        assert fetched.digest == image.manifest_digest
        index = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(index, Index)
        chosen = select_platform(index, Platform("linux", host.architecture, host.variant))
        child = client.get_manifest(ref, chosen.digest)
        assert child.digest == chosen.digest
        m = parse_manifest(child.data, child.media_type, child.digest)
        assert isinstance(m, Manifest)
        cfg = parse_config(client.get_blob_bytes(ref, m.config, MAX_CONFIG_BYTES), m.config.digest)
        assert cfg.cmd == ("echo", "host")
        arm = select_platform(index, Platform("linux", other))
        assert arm.digest == image.children[0].manifest_digest
        with pytest.raises(UsageError) as info:
            select_platform(index, Platform("linux", "s390x"))
        assert other in info.value.hint


@pytest.mark.slow
def test_resolve_short_name(registry: Registry, image_builder: ImageBuilder) -> None:
    layout, image = image_builder(busybox_spec(cmd=("true",)))
    registry.push(layout, "t", "library/shorty:v1")
    text = (
        f'unqualified-search-registries = ["{registry.host}"]\n'
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    conf = RegistriesConf.parse(text)
    with RegistryClient(conf, None, new_session(retries=0)) as client:
        ref, fetched = client.resolve("library/shorty:v1")
        assert str(ref) == f"{registry.host}/library/shorty:v1"
        assert fetched.digest == image.manifest_digest


def test_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "r.conf"
    conf.write_text('unqualified-search-registries = ["a.example"]\n')
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {"a.example": {"username": "u", "password": "p"}}}))
    monkeypatch.setenv("REGISTRIES_CONFIG_PATH", str(conf))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    monkeypatch.setenv("HOME", str(tmp_path))
    with RegistryClient.from_environment() as client:
        assert client.conf.unqualified_search_registries == ("a.example",)
        assert client.credentials.for_host("a.example") == ("u", "p")
    auth.write_text("{broken")
    with pytest.raises(UsageError) as info:
        RegistryClient.from_environment()
    assert str(auth) in info.value.message


@pytest.mark.slow
def test_parallel_blobs_share_one_token(
    registry_token: Registry, image_builder: ImageBuilder
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.harness.imagebuilder import File, Layer

    reg = registry_token
    extra = [Layer([File(f"f{i}", f"layer {i}".encode() * 1000)]) for i in range(6)]
    layout, _image = image_builder(busybox_spec(cmd=("true",), extra=extra))
    reg.push(layout, "t", "tok/parallel:v1")
    assert reg.token_server is not None
    reg.token_server.reset()
    with _client(reg) as client:
        ref = Reference.parse(reg.ref("tok/parallel", "v1"))
        fetched = client.get_manifest(ref)
        m = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(m, Manifest)

        def one(desc: Descriptor) -> str:
            write, h, _ = _sink()
            client.get_blob(ref, desc, write, endpoint=fetched.endpoint)
            return "sha256:" + h.hexdigest()

        with ThreadPoolExecutor(4) as pool:
            digests = list(pool.map(one, m.layers))
        assert digests == [layer.digest for layer in m.layers]
        assert len(m.layers) == 7
    assert reg.token_server.count() == 1


@pytest.mark.slow
def test_identity_token_and_access_token_field(
    registry_token: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = registry_token
    layout, image = image_builder(busybox_spec(cmd=("true",)))
    reg.push(layout, "t", "tok/identity:v1")
    assert reg.token_server is not None and reg.ca_cert is not None
    # an OAuth2 refresh token, as `docker login` stores it ("identitytoken")
    session = new_session(retries=0)
    answer = session.post(
        reg.token_server.url,
        data={
            "grant_type": "password",
            "username": reg.username,
            "password": reg.password,
            "service": "x",
            "client_id": "test",
        },
        verify=str(reg.ca_cert),
    )
    refresh = answer.json()["refresh_token"]
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {reg.host: {"identitytoken": refresh}}}))
    reg.token_server.reset()
    old_fields = reg.token_server.fields
    reg.token_server.fields = ("access_token",)
    try:
        conf = RegistriesConf(certs_dirs=(str(reg.certs_d),))
        with RegistryClient(conf, load_credentials([auth]), new_session(retries=0)) as client:
            fetched = client.get_manifest(Reference.parse(reg.ref("tok/identity", "v1")))
        assert fetched.digest == image.manifest_digest
        posts = [r for r in reg.token_server.requests if r.method == "POST"]
        assert len(posts) == 1 and posts[0].grant_type == "refresh_token"
        assert posts[0].user == reg.username
    finally:
        reg.token_server.fields = old_fields


@pytest.mark.slow
def test_docker_v2s2_image(registry_basic: Registry, tmp_path: Path) -> None:
    import subprocess

    from bootstrap.image.model import DOCKER_MANIFEST
    from tests.harness.imagebuilder import save_docker_archive

    archive = tmp_path / "docker.tar"
    image = save_docker_archive(busybox_spec(cmd=("echo", "docker")), archive, "dockerish/img:v1")
    dest = f"docker://{registry_basic.host}/dockerish/img:v1"
    argv = ["skopeo", "copy", "--quiet", *registry_basic.skopeo_dest_args()]
    subprocess.run([*argv, f"docker-archive:{archive}", dest], check=True, timeout=120)
    with _client(registry_basic) as client:
        ref = Reference.parse(registry_basic.ref("dockerish/img", "v1"))
        fetched = client.get_manifest(ref)
        assert fetched.media_type == DOCKER_MANIFEST
        m = parse_manifest(fetched.data, fetched.media_type, fetched.digest)
        assert isinstance(m, Manifest)
        assert m.config.digest == image.config_digest
        cfg = parse_config(client.get_blob_bytes(ref, m.config, MAX_CONFIG_BYTES), m.config.digest)
        assert cfg.cmd == ("echo", "docker")


# --- a quirky registry: things docker-registry 2.8 will not do --------------------------------


class _Quirky:
    """A minimal fake registry (basic auth) serving schema 1, oversized manifests and blob
    redirects to a second 'storage' server on another host name."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.storage_headers: list[dict[str, str]] = []
        self.blob = b"redirected blob content" * 100
        self.blob_digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        outer = self

        class Storage(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.storage_headers.append(dict(self.headers.items()))
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.blob)))
                self.end_headers()
                self.wfile.write(outer.blob)

        class Reg(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != "Basic dTpw":  # u:p
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="quirky"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                s1 = json.dumps({"schemaVersion": 1, "name": "s1", "fsLayers": []}).encode()
                if self.path == "/v2/":
                    self._send(200, b"{}")
                elif self.path == "/v2/s1/manifests/t":
                    self._send(200, s1, "application/vnd.docker.distribution.manifest.v1+prettyjws")
                elif self.path == "/v2/s1json/manifests/t":
                    self._send(200, s1, "application/json")
                elif self.path == "/v2/big/manifests/t":
                    self._send(200, b" " * (5 * 1024 * 1024), OCI_MANIFEST)
                elif self.path.startswith("/v2/redir/blobs/"):
                    self.send_response(307)
                    self.send_header("Location", f"http://localhost:{outer.storage_port}/b")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"nope"}]}')

        self.reg = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Reg)
        self.storage = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Storage)
        self.storage_port = self.storage.server_address[1]
        self.host = f"127.0.0.1:{self.reg.server_address[1]}"
        for srv in (self.reg, self.storage):
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def close(self) -> None:
        for srv in (self.reg, self.storage):
            srv.shutdown()
            srv.server_close()


@pytest.fixture
def quirky() -> Iterator[_Quirky]:
    q = _Quirky()
    yield q
    q.close()


def _quirky_client(q: _Quirky) -> RegistryClient:
    conf = RegistriesConf.parse(f'[[registry]]\nlocation = "{q.host}"\ninsecure = true\n')
    creds = Credentials.from_entries({q.host: ("u", "p")})
    return RegistryClient(
        RegistriesConf(conf.registries, certs_dirs=()), creds, new_session(retries=0)
    )


def test_schema1_refused(quirky: _Quirky) -> None:
    with _quirky_client(quirky) as client:
        for name in ("s1", "s1json"):
            with pytest.raises(RegistryError) as info:
                client.get_manifest(Reference.parse(f"{quirky.host}/{name}:t"))
            assert "schema 1" in info.value.message
            assert "re-push" in info.value.hint


def test_oversized_manifest_refused(quirky: _Quirky) -> None:
    with _quirky_client(quirky) as client, pytest.raises(IntegrityError) as info:
        client.get_manifest(Reference.parse(f"{quirky.host}/big:t"))
    assert "larger than" in info.value.message


def test_blob_redirect_drops_authorization(quirky: _Quirky) -> None:
    desc = Descriptor("application/octet-stream", quirky.blob_digest, len(quirky.blob))
    with _quirky_client(quirky) as client:
        data = client.get_blob_bytes(Reference.parse(f"{quirky.host}/redir:t"), desc, 1 << 20)
    assert data == quirky.blob
    assert len(quirky.storage_headers) == 1
    assert "Authorization" not in quirky.storage_headers[0]


def test_drop_in_files(tmp_path: Path) -> None:
    main = tmp_path / "registries.conf"
    main.write_text(
        'unqualified-search-registries = ["a.example"]\n'
        '[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\nlocation = "m1.example"\n'
    )
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "10-x.conf").write_text(
        '[[registry]]\nlocation = "x.example"\n[[registry.mirror]]\nlocation = "m2.example"\n'
    )
    (d / "20-search.conf").write_text('unqualified-search-registries = ["b.example"]\n')
    (d / "30-ignored.txt").write_text("not toml at all [")
    conf = registries.load(env={}, system_file=main, system_dir=d)
    assert conf.unqualified_search_registries == ("b.example",)
    assert [h for h, *_ in _hosts(conf, "x.example/img")] == ["m2.example", "x.example"]
    assert conf.sources == (str(main), str(d / "10-x.conf"), str(d / "20-search.conf"))
    # $REGISTRIES_CONFIG_PATH replaces all of them
    only = tmp_path / "only.conf"
    only.write_text("")
    env = {"REGISTRIES_CONFIG_PATH": str(only)}
    assert registries.load(env=env, system_file=main, system_dir=d).sources == (str(only),)
    (d / "40-bad.conf").write_text("[[registry]]\n")
    with pytest.raises(UsageError) as info:
        registries.load(env={}, system_file=main, system_dir=d)
    assert "40-bad.conf" in info.value.message
    assert registries.load(env={}, system_file=tmp_path / "no", system_dir=tmp_path / "no") == (
        RegistriesConf()
    )


@pytest.mark.slow
def test_token_server_hiccup_is_retried(
    registry_token: Registry, image_builder: ImageBuilder
) -> None:
    reg = registry_token
    layout, image = image_builder(busybox_spec(cmd=("true",)))
    reg.push(layout, "t", "tok/hiccup:v1")
    assert reg.token_server is not None
    reg.token_server.reset()
    reg.token_server.fail_next(2, 503)
    with _client(reg, session=new_session(retries=3, backoff=0.05)) as client:
        assert client.get_manifest(Reference.parse(reg.ref("tok/hiccup", "v1"))).digest == (
            image.manifest_digest
        )
    assert [r.status for r in reg.token_server.requests] == [503, 503, 200]
    reg.token_server.fail_next(10, 503)
    with (
        _client(reg, session=new_session(retries=1, backoff=0.05)) as client,
        pytest.raises(RegistryError) as info,
    ):
        client.get_manifest(Reference.parse(reg.ref("tok/hiccup", "v1")))
    assert "token server" in info.value.message
    assert info.value.exit_code == ExitCode.REGISTRY
    reg.token_server.reset()


@pytest.mark.slow
def test_http_proxy_from_environment(
    registry: Registry, image_builder: ImageBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness.faultproxy import FaultProxy

    layout, image = image_builder(busybox_spec(cmd=("true",)))
    registry.push(layout, "t", "proxied/img:v1")
    with FaultProxy.for_registry(registry) as proxy:
        for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("http_proxy", proxy.url)
        with _client(registry) as client:
            ref = Reference.parse(registry.ref("proxied/img", "v1"))
            assert client.get_manifest(ref).digest == image.manifest_digest
        # the proxy saw absolute-form requests for the registry (it records a request once
        # it has relayed the whole answer: the client may have read it a moment earlier)
        seen = f"^http://{registry.host}/v2/proxied/img/manifests/v1$"
        deadline = time.monotonic() + 5
        while proxy.count(seen) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.count(seen) == 1


def _client_cert(directory: Path, ca: tuple[Path, Path], name: str) -> tuple[Path, Path]:
    """A client certificate (EKU clientAuth) signed by ``ca``: NAME.cert / NAME.key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crt, keyfile = directory / f"{name}.cert", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return crt, keyfile


def test_client_certificate_from_certs_d(tmp_path: Path) -> None:
    """mTLS: a server that requires a client certificate; certs.d holds ca.crt plus
    client.cert/client.key for the host."""
    import http.server
    import ssl
    import threading

    from tests.harness.registry import make_ca, make_server_cert

    pki = tmp_path / "pki"
    ca = make_ca(pki, "ca")
    server = make_server_cert(pki, ca)
    client_ca = make_ca(pki, "clientca")
    seen: list[object] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:
            assert isinstance(self.connection, ssl.SSLSocket)
            seen.append(self.connection.getpeercert())
            body = b"{}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serve_tls(httpd, server, client_ca=client_ca[0])
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host = f"127.0.0.1:{httpd.server_address[1]}"
    try:
        certs = tmp_path / "certs.d"
        hostdir = certs / host
        hostdir.mkdir(parents=True)
        (hostdir / "ca.crt").write_bytes(ca[0].read_bytes())
        ref = Reference.parse(f"{host}/x/y:t")
        conf = RegistriesConf(certs_dirs=(str(certs),))
        with (
            RegistryClient(conf, None, new_session(retries=0)) as client,
            pytest.raises(RegistryError),
        ):
            client.ping(ref)  # no client certificate yet: the handshake is refused
        _client_cert(hostdir, client_ca, "client")
        with RegistryClient(conf, None, new_session(retries=0)) as client:
            assert client.ping(ref) == f"https://{host}"
        assert seen and seen[-1]
    finally:
        httpd.shutdown()
        httpd.server_close()


# =============================================================================================
# dead mirrors: a connect error on a mirror moves on at once; only the last endpoint retries


def _tiny_image(reg: Registry, repo: str) -> tuple[str, Descriptor]:
    """Push a manifest with a config and no layers as ``repo:v1``; return its manifest digest
    and the config descriptor."""
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}})
    data = cfg.encode()
    config = Descriptor(OCI_CONFIG, reg.upload_blob(repo, data), len(data))
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config.media_type, "digest": config.digest, "size": len(data)},
            "layers": [],
        }
    ).encode()
    reg.put_manifest(repo, "v1", body, OCI_MANIFEST)
    return "sha256:" + hashlib.sha256(body).hexdigest(), config


def _dead() -> str:
    """host:port of a loopback port nobody listens on (connections are refused)."""
    return f"127.0.0.1:{free_port()}"


def _mirror_conf(upstream: str, *mirrors: str, secure: tuple[str, ...] = ()) -> RegistriesConf:
    """``upstream`` with ``mirrors`` in order; all insecure (plain http) except ``secure``."""
    text = f'[[registry]]\nlocation = "{upstream}"\ninsecure = true\n'
    for m in mirrors:
        text += (
            f'[[registry.mirror]]\nlocation = "{m}"\ninsecure = {str(m not in secure).lower()}\n'
        )
    conf = RegistriesConf.parse(text, "mirrors.conf")
    return RegistriesConf(conf.registries, certs_dirs=())


def _retries(caplog: pytest.LogCaptureFixture, host: str | None = None) -> list[str]:
    """The session's retry records (``bootstrap.retry``, one per retry), of ``host`` or all:
    what a time bound used to stand in for (a retry costs its backoff)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bootstrap.retry" and (host is None or r.getMessage().startswith(f"{host}:"))
    ]


def _moving_on(caplog: pytest.LogCaptureFixture, host: str) -> list[str]:
    """The INFO lines saying that mirror ``host`` failed."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bootstrap.image.registry"
        and r.levelname == "INFO"
        and r.getMessage().startswith(f"mirror {host} failed")
    ]


@pytest.mark.slow
@pytest.mark.parametrize("insecure", [True, False], ids=["insecure", "secure"])
def test_refused_mirror_moves_on_at_once(
    registry: Registry, insecure: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The production policy (default sessions): a mirror refusing connections costs no
    retries, not even over the insecure https->http fallback (http is tried once, at once,
    and named); the next mirror serves."""
    repo = f"deadmirror/{'insecure' if insecure else 'secure'}"
    digest, config = _tiny_image(registry, repo)
    dead, upstream = _dead(), _dead()
    # the live registry is the second mirror; the registry itself is down too
    conf = _mirror_conf(upstream, dead, registry.host, secure=() if insecure else (dead,))
    ref = Reference.parse(f"{upstream}/{repo}:v1")
    caplog.set_level("INFO", logger="bootstrap.image.registry")
    caplog.set_level("INFO", logger="bootstrap.retry")
    with RegistryClient(conf, None) as client:
        fetched = client.get_manifest(ref)
        assert fetched.endpoint == registry.host
        assert fetched.digest == digest
        # a blob without a hint starts at the dead mirror again: skipped at once
        data = client.get_blob_bytes(ref, config, MAX_CONFIG_BYTES)
        assert hashlib.sha256(data).hexdigest() == config.digest.split(":", 1)[1]
        assert client.get_manifest(ref).endpoint == registry.host
    assert _retries(caplog) == []  # the dead mirror was left at once, never retried
    logged = _moving_on(caplog, dead)
    assert len(logged) == 1, logged  # once per endpoint, however often it is skipped
    assert "Connection refused" in logged[0] and registry.host in logged[0]
    if insecure:  # same port, refused: http tried once more without retries, both named
        assert f"https://{dead}/v2/ nor http://{dead}/v2/" in logged[0], logged[0]
    else:
        assert "http://" not in logged[0]


@pytest.mark.slow
def test_dead_mirrors_fall_back_to_the_registry(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror refusing connections and one whose name does not resolve (insecure without a
    port: both https and http are tried, without retries), then the registry serves."""
    digest, _ = _tiny_image(registry, "deadmirror/both")
    dead1, dead2 = _dead(), "mirror.invalid"
    conf = _mirror_conf(registry.host, dead1, dead2)
    caplog.set_level("INFO", logger="bootstrap.image.registry")
    caplog.set_level("INFO", logger="bootstrap.retry")
    with RegistryClient(conf, None) as client:
        fetched = client.get_manifest(Reference.parse(f"{registry.host}/deadmirror/both:v1"))
    assert fetched.endpoint == registry.host and fetched.digest == digest
    assert _retries(caplog) == []  # neither mirror was retried
    assert len(_moving_on(caplog, dead1)) == 1
    [unresolved] = _moving_on(caplog, dead2)
    assert "http://mirror.invalid/v2/" in unresolved  # the http probe's reason


def test_everything_down_names_every_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    """Mirrors fail fast; the registry itself (last) gets the session's full retry policy;
    the error names each endpoint with its reason, on one line."""
    upstream, dead1, dead2 = _dead(), _dead(), _dead()
    conf = _mirror_conf(upstream, dead1, dead2)
    # 2 retries with backoff 1.0: urllib3 sleeps 0 s then 2 s, only for the last endpoint
    session = new_session(retries=2, backoff=1.0)
    caplog.set_level("INFO", logger="bootstrap.retry")
    with RegistryClient(conf, None, session) as client, pytest.raises(RegistryError) as info:
        client.get_manifest(Reference.parse(f"{upstream}/all/down:v1"))
    session.close()
    err = info.value
    assert err.exit_code == ExitCode.REGISTRY
    assert "\n" not in err.message and err.hint
    for role, host in (("mirror", dead1), ("mirror", dead2), ("registry", upstream)):
        assert (  # insecure: both schemes tried (http once, without retries) and named
            f"{role} {host}: cannot reach https://{host}/v2/ nor http://{host}/v2/: "
            "[Errno 111] Connection refused" in err.message
        ), err.message
    assert err.message.count("Connection refused") == 3
    # the registry got its 2 retries; the mirrors none (each would have cost 2 s more)
    assert len(_retries(caplog, upstream)) == 2, _retries(caplog)
    assert _retries(caplog, dead1) == _retries(caplog, dead2) == []


@pytest.mark.slow
def test_failing_mirror_is_retried_then_left(registry: Registry) -> None:
    """A mirror answering 503 is up: its answers are retried per the policy, then the next
    endpoint serves."""
    from tests.harness.faultproxy import MANIFEST_PATH, FaultProxy

    digest, _ = _tiny_image(registry, "failmirror/img")
    with FaultProxy.for_registry(registry) as proxy:
        proxy.add("status", MANIFEST_PATH, times=-1, status=503)
        conf = _mirror_conf(registry.host, proxy.host)
        with RegistryClient(conf, None, new_session(retries=2, backoff=0.05)) as client:
            fetched = client.get_manifest(Reference.parse(f"{registry.host}/failmirror/img:v1"))
        assert fetched.endpoint == registry.host and fetched.digest == digest
        assert proxy.count(MANIFEST_PATH) == 3  # the first answer and 2 retries


@pytest.mark.slow
def test_insecure_mirror_on_default_ports(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """An insecure mirror without a port: https (443) is refused, so the http probe (80) is
    made at once, without the https retries first."""
    import errno
    import random

    from tests.harness.faultproxy import FaultProxy

    digest, _ = _tiny_image(registry, "portless/img")
    proxy: FaultProxy | None = None
    for _ in range(5):  # a loopback address of our own, port 80 (we run as root)
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        candidate = FaultProxy(registry.host, address=address, port=80)
        try:
            proxy = candidate.start()
            break
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                pytest.skip("cannot bind port 80")
    assert proxy is not None, "no free loopback address for port 80"
    try:
        assert proxy.host == address
        conf = _mirror_conf(registry.host, proxy.host)
        caplog.set_level("INFO", logger="bootstrap.retry")
        with RegistryClient(conf, None) as client:  # the production policy
            fetched = client.get_manifest(Reference.parse(f"{registry.host}/portless/img:v1"))
        assert fetched.endpoint == proxy.host and fetched.digest == digest
        assert _retries(caplog) == []  # the refused https probe was not retried
        assert proxy.count(r"^/v2/$") == 1
    finally:
        proxy.stop()


@pytest.mark.slow
def test_mirror_connect_timeout_moves_on(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror whose accept queue is full (SYNs dropped: connect timeout) costs one connect
    timeout, not the session's retries and backoff."""
    import socket

    digest, _ = _tiny_image(registry, "blackhole/img")
    listener = socket.socket()
    clients: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        host = f"127.0.0.1:{listener.getsockname()[1]}"
        for _ in range(4):  # fill the accept queue; nobody accepts
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", listener.getsockname()[1]))
            clients.append(c)
        time.sleep(0.1)
        conf = _mirror_conf(registry.host, host)
        session = new_session(connect_timeout=0.5, retries=2, backoff=1.0)
        caplog.set_level("INFO", logger="bootstrap.retry")
        with RegistryClient(conf, None, session) as client:
            fetched = client.get_manifest(Reference.parse(f"{registry.host}/blackhole/img:v1"))
        session.close()
        assert fetched.endpoint == registry.host and fetched.digest == digest
        assert _retries(caplog, host) == []  # one connect timeout; retried, it would be 3.5 s
    finally:
        for c in clients:
            c.close()
        listener.close()


@pytest.mark.slow
def test_head_digest_all_modes(pushed: tuple[Registry, str, BuiltImage], tmp_path: Path) -> None:
    """One HEAD answers what the tag names now (the digest a GET would hash), with the
    registry's auth; a missing tag is NotFoundError, a re-pushed tag gives the new digest."""
    reg, name, image = pushed
    with _client(reg) as client:
        ref = Reference.parse(reg.ref(name, "v1"))
        assert client.head_digest(ref) == image.manifest_digest == client.get_manifest(ref).digest
        with pytest.raises(NotFoundError):
            client.head_digest(Reference.parse(reg.ref(name, "nope")))
    from tests.harness.imagebuilder import build_image

    layout = tmp_path / "oci"
    other = build_image(layout, "t", busybox_spec(cmd=("echo", "moved")))
    reg.push(layout, "t", f"{name}:v1")
    with _client(reg) as client:
        assert client.head_digest(ref) == other.manifest_digest != image.manifest_digest


@pytest.mark.slow
def test_session_tls_contexts_per_ca(registry_tls: Registry, tmp_path: Path) -> None:
    """One session keeps one TLS context per CA bundle: the right CA verifies on every new
    connection, a wrong CA or the default roots still fail, verify=False still skips."""
    import requests

    from tests.harness.registry import make_ca

    assert registry_tls.ca_cert is not None
    other_ca, _ = make_ca(tmp_path / "other")
    url = f"{registry_tls.url}/v2/"
    with new_session(retries=0) as session:
        for _ in range(3):
            assert session.get(url, verify=str(registry_tls.ca_cert)).status_code == 200
            session.close()  # new connections next round: the cached context is reused
        with pytest.raises(requests.exceptions.SSLError):
            session.get(url, verify=str(other_ca))
        with pytest.raises(requests.exceptions.SSLError):
            session.get(url)
        assert session.get(url, verify=str(registry_tls.ca_cert)).status_code == 200
        assert session.get(url, verify=False).status_code == 200


@pytest.mark.slow
def test_session_trusts_system_roots_and_extra_cas(
    registry_tls: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify=True trusts OpenSSL's hashed CA directory (SSL_CERT_DIR here); an ExtraCAs file
    adds to it, a plain path replaces it; a directory without hashed links is passed over (the
    default roots, which do not know the test CA)."""
    import requests

    from bootstrap.http import ExtraCAs
    from bootstrap.process import run
    from tests.harness.registry import make_ca

    assert registry_tls.ca_cert is not None
    other_ca, _ = make_ca(tmp_path / "other", "other")  # a subject of its own
    roots = tmp_path / "roots"
    roots.mkdir()
    subject_hash = run(["openssl", "x509", "-hash", "-noout", "-in", str(registry_tls.ca_cert)])
    (roots / f"{subject_hash.stdout.decode().strip()}.0").symlink_to(registry_tls.ca_cert)
    monkeypatch.setenv("SSL_CERT_DIR", str(roots))
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    url = f"{registry_tls.url}/v2/"

    def get(verify: bool | str) -> int:
        with new_session(retries=0) as session:  # a fresh context cache each time
            return int(session.get(url, verify=verify).status_code)

    assert get(True) == 200
    assert get(ExtraCAs(str(other_ca))) == 200  # the system roots still count
    with pytest.raises(requests.exceptions.SSLError):
        get(str(other_ca))  # a plain path is all that is trusted
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "other"))  # no hashed links
    with pytest.raises(requests.exceptions.SSLError):
        get(True)
    assert get(ExtraCAs(str(registry_tls.ca_cert))) == 200


def test_no_endpoint_reachable_is_transient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror refusing connections and an upstream that does not resolve (an air-gapped node
    whose mirror is not up yet): worth waiting for, as each failure alone is."""
    from bootstrap.image import api

    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nlocation = "upstream.invalid"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:1"\ninsecure = true\n'
    )
    monkeypatch.setenv("REGISTRIES_CONFIG_PATH", str(conf))
    remote = api.Remote()
    try:
        with pytest.raises(RegistryError) as info:
            remote.digest("upstream.invalid/x/y:1")
    finally:
        remote.close()
    assert "none of the 2 endpoints" in info.value.message
    assert api.is_transient(info.value)
