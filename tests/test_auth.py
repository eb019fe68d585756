"""Credentials lookup (auth.json / docker config.json), WWW-Authenticate parsing, token cache."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import pytest

from bootstrap.errors import ExitCode, RegistryError, UsageError
from bootstrap.image.auth import (
    Challenge,
    Credentials,
    Token,
    TokenCache,
    default_auth_paths,
    load_credentials,
    normalize_key,
    parse_www_authenticate,
    token_from_response,
)


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


# --- WWW-Authenticate -----------------------------------------------------------------------

CHALLENGES = [
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"',
        [
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/busybox:pull",
                },
            )
        ],
    ),
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"',
        [
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/busybox:pull,push",
                },
            )
        ],
    ),
    (
        'Bearer realm="http://127.0.0.1:5000/openshift/token"',
        [Challenge("bearer", {"realm": "http://127.0.0.1:5000/openshift/token"})],
    ),
    ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
    ("basic REALM=x", [Challenge("basic", {"realm": "x"})]),
    # two challenges joined by requests into one header
    (
        'Bearer realm="https://a/token", service="s" , Basic realm="r"',
        [
            Challenge("bearer", {"realm": "https://a/token", "service": "s"}),
            Challenge("basic", {"realm": "r"}),
        ],
    ),
    (
        'Basic realm="r", Bearer realm="https://a/token",error="insufficient_scope"',
        [
            Challenge("basic", {"realm": "r"}),
            Challenge("bearer", {"realm": "https://a/token", "error": "insufficient_scope"}),
        ],
    ),
    # quoted-pair escapes and commas inside quotes
    (
        r'Bearer realm="https://a/t",scope="repository:x:pull,push",note="say \"hi\""',
        [
            Challenge(
                "bearer",
                {"realm": "https://a/t", "scope": "repository:x:pull,push", "note": 'say "hi"'},
            )
        ],
    ),
    ("Negotiate", [Challenge("negotiate", {})]),
    # unquoted URL values (invalid per RFC 7235, seen in the wild)
    (
        "Bearer realm=https://auth.example/token,service=reg.example",
        [Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg.example"})],
    ),
    ("Basic realm=abc==", [Challenge("basic", {"realm": "abc=="})]),
    ("", []),
    ("   ", []),
    # unterminated quote: what was parsed is kept
    ('Bearer realm="https://a/t', [Challenge("bearer", {})]),
]


@pytest.mark.parametrize(("header", "expected"), CHALLENGES)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    got = parse_www_authenticate(header)
    assert [(c.scheme, dict(c.params)) for c in got] == [
        (c.scheme, dict(c.params)) for c in expected
    ]


# --- auth files -----------------------------------------------------------------------------


def test_lookup_by_host_and_repository_prefix(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "auth.json",
        {
            "auths": {
                "reg.example:5000": {"auth": _b64("host", "h")},
                "reg.example:5000/team": {"auth": _b64("team", "t")},
                "reg.example:5000/team/app": {"auth": _b64("app", "a")},
                "other.example": {"username": "u2", "password": "p2"},
            }
        },
    )
    creds = load_credentials([f])
    assert creds.for_host("reg.example:5000") == ("host", "h")
    assert creds.for_host("reg.example:5000", "x/y") == ("host", "h")
    assert creds.for_host("reg.example:5000", "team/other") == ("team", "t")
    assert creds.for_host("reg.example:5000", "team/app") == ("app", "a")
    assert creds.for_host("reg.example:5000", "reg.example:5000/team/app") == ("app", "a")
    assert creds.for_host("reg.example:5000", "team/app2") == ("team", "t")
    assert creds.for_host("other.example") == ("u2", "p2")
    assert creds.for_host("reg.example") is None  # the port is part of the key
    assert creds.for_host("nowhere") is None


def test_docker_hub_keys_and_urls(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "config.json",
        {"auths": {"https://index.docker.io/v1/": {"auth": _b64("hub", "pw")}}},
    )
    creds = load_credentials([f])
    assert creds.for_host("docker.io") == ("hub", "pw")
    assert creds.for_host("registry-1.docker.io", "library/busybox") == ("hub", "pw")
    assert normalize_key("https://reg.example:5000/v2/") == "reg.example:5000"
    assert normalize_key("reg.example/ns/repo") == "reg.example/ns/repo"
    assert normalize_key("docker.io/library") == "index.docker.io/library"


def test_password_with_colon_and_unicode(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.json", {"auths": {"h:1": {"auth": _b64("u", "p:ä:ß")}}})
    assert load_credentials([f]).for_host("h:1") == ("u", "p:ä:ß")


def test_first_file_wins_and_missing_files_skipped(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.json", {"auths": {"h:1": {"auth": _b64("a", "1")}}})
    b = _write(
        tmp_path / "b.json",
        {"auths": {"h:1/x": {"auth": _b64("b", "2")}, "h:2": {"auth": _b64("b", "3")}}},
    )
    creds = load_credentials([tmp_path / "missing.json", a, b])
    # the first file with any match for the host wins, even if a later file is more specific
    assert creds.for_host("h:1", "x") == ("a", "1")
    assert creds.for_host("h:2") == ("b", "3")
    entry = creds.entry_for("h:2")
    assert entry is not None and entry.source == str(b)


def test_empty_entries_and_identity_token(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "a.json",
        {"auths": {"h:1": {}, "h:2": {"identitytoken": "refresh-me"}}, "credHelpers": {}},
    )
    creds = load_credentials([f])
    assert creds.for_host("h:1") is None
    assert creds.for_host("h:2") is None
    entry = creds.entry_for("h:2")
    assert entry is not None and entry.identity_token == "refresh-me"


def test_legacy_dockercfg(tmp_path: Path) -> None:
    f = _write(tmp_path / ".dockercfg", {"https://reg.example/v1/": {"auth": _b64("old", "x")}})
    creds = load_credentials([(f, True)])
    assert creds.for_host("reg.example") == ("old", "x")


@pytest.mark.parametrize(
    ("content", "word"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        ({"auths": []}, "auths"),
        ({"auths": {"h": "x"}}, "auths.h"),
        ({"auths": {"h": {"auth": "!!!"}}}, "base64"),
        ({"auths": {"h": {"auth": base64.b64encode(b"nocolon").decode()}}}, "user:password"),
        ({"auths": {"h": {"auth": 5}}}, "auths.h.auth"),
        ({"credHelpers": {"h": 1}}, "credHelpers"),
    ],
)
def test_malformed_file(tmp_path: Path, content: object, word: str) -> None:
    f = _write(tmp_path / "bad.json", content)
    with pytest.raises(UsageError) as info:
        load_credentials([f])
    assert info.value.exit_code == ExitCode.USAGE
    assert str(f) in info.value.message
    assert word in info.value.message
    assert info.value.hint


def test_directory_instead_of_file(tmp_path: Path) -> None:
    d = tmp_path / "auth.json"
    d.mkdir()
    with pytest.raises(UsageError) as info:
        load_credentials([d])
    assert str(d) in info.value.message


def test_empty_file_is_no_credentials(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.json", "")
    assert load_credentials([f]).for_host("x") is None


def test_default_paths_order(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(tmp_path / "r.json")}
    paths = [p for p, _ in default_auth_paths(env)]
    assert paths == [
        tmp_path / "r.json",
        tmp_path / ".config/containers/auth.json",
        Path("/etc/containers/auth.json"),
        tmp_path / ".docker/config.json",
        tmp_path / ".dockercfg",
    ]
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/7", "DOCKER_CONFIG": "/d"}
    paths = [p for p, _ in default_auth_paths(env)]
    assert paths[0] == Path("/run/user/7/containers/auth.json")
    assert paths[3] == Path("/d/config.json")
    paths = [p for p, _ in default_auth_paths({"HOME": str(tmp_path)})]
    assert paths[0] == Path(f"/run/containers/{os.getuid()}/auth.json")


def test_load_from_environment(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _write(home / ".docker/config.json", {"auths": {"d:1": {"auth": _b64("docker", "d")}}})
    _write(tmp_path / "r.json", {"auths": {"r:1": {"auth": _b64("reg", "r")}}})
    env = {"HOME": str(home), "REGISTRY_AUTH_FILE": str(tmp_path / "r.json")}
    creds = load_credentials(env=env)
    assert creds.for_host("r:1") == ("reg", "r")
    assert creds.for_host("d:1") == ("docker", "d")


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-testhelper"
    helper.write_text(
        "#!/bin/sh\nread host\n"
        'if [ "$host" = "helped:1" ]; then\n'
        '  printf \'{"ServerURL":"%s","Username":"hu","Secret":"hs"}\' "$host"\n'
        "else echo 'credentials not found in native keychain'; exit 1; fi\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    f = _write(tmp_path / "c.json", {"credHelpers": {"helped:1": "testhelper"}})
    creds = load_credentials([f])
    assert creds.for_host("helped:1") == ("hu", "hs")
    assert creds.for_host("other:1") is None
    g = _write(tmp_path / "s.json", {"credsStore": "testhelper"})
    assert load_credentials([g]).for_host("helped:1") == ("hu", "hs")
    assert load_credentials([g]).for_host("nothere:1") is None


def test_from_entries() -> None:
    creds = Credentials.from_entries({"h:1": ("u", "p")})
    assert creds.for_host("h:1", "a/b") == ("u", "p")
    assert Credentials.empty().for_host("h:1") is None


# --- tokens ---------------------------------------------------------------------------------


def test_token_from_response() -> None:
    now = 1000.0
    assert token_from_response({"token": "a", "expires_in": 300}, now) == Token("a", 1300.0)
    # access_token accepted; lifetime at least 60 s (as containers/image)
    assert token_from_response({"access_token": "b", "expires_in": 5}, now) == Token("b", 1060.0)
    assert token_from_response({"token": "c"}, now).expires == 1060.0
    for bad in ({}, {"token": ""}, [], {"token": 5}):
        with pytest.raises(RegistryError) as info:
            token_from_response(bad, now)
        assert info.value.exit_code == ExitCode.REGISTRY


def test_token_cache_expiry() -> None:
    cache = TokenCache()
    key = ("realm", "svc", "repository:a:pull", "")
    assert cache.get(key) is None
    cache.put(key, Token("t1", time.monotonic() + 100))
    assert cache.get(key) == "t1"
    assert len(cache) == 1
    cache.drop(key, "other")  # only drops the token it was asked to
    assert cache.get(key) == "t1"
    cache.drop(key, "t1")
    assert cache.get(key) is None
    cache.put(key, Token("t2", time.monotonic() + 1))  # inside the safety margin: expired
    assert cache.get(key) is None
