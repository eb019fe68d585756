# ruff: noqa: E501  (table rows read best one per line)
"""Policy parsing and scope order (no network): containers-policy.json(5) read strictly, scopes
ordered as containers/image orders them, signedIdentity rules, registries.d merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bootstrap.errors import UsageError
from bootstrap.image.reference import Reference
from bootstrap.trust.identity import identity_matches
from bootstrap.trust.policy import SignedIdentity, docker_scopes, load_policy, parse_policy
from bootstrap.trust.registries_d import load_registries_d


def test_scope_order() -> None:
    ref = Reference.parse("reg.sub.example.com:5000/ns/deep/app:1")
    assert docker_scopes(ref) == [
        "reg.sub.example.com:5000/ns/deep/app:1",
        "reg.sub.example.com:5000/ns/deep/app",
        "reg.sub.example.com:5000/ns/deep",
        "reg.sub.example.com:5000/ns",
        "reg.sub.example.com:5000",
        "*.sub.example.com",
        "*.example.com",
        "*.com",
    ]
    pinned = Reference.parse("quay.io/a@sha256:" + "a" * 64)
    assert docker_scopes(pinned)[0] == "quay.io/a@sha256:" + "a" * 64


def test_most_specific_scope_wins_then_default() -> None:
    doc = {
        "default": [{"type": "reject"}],
        "transports": {"docker": {
            "quay.io": [{"type": "insecureAcceptAnything"}],
            "quay.io/ns/app": [{"type": "reject"}],
            "*.example.com": [{"type": "insecureAcceptAnything"}],
        }},
    }  # fmt: skip
    policy = parse_policy(json.dumps(doc).encode(), Path("p.json"))
    assert policy.requirements_for(Reference.parse("quay.io/ns/app:1")).scope == "quay.io/ns/app"
    assert policy.requirements_for(Reference.parse("quay.io/ns/other:1")).scope == "quay.io"
    assert policy.requirements_for(Reference.parse("r.example.com/x")).scope == "*.example.com"
    assert policy.requirements_for(Reference.parse("docker.io/x")).scope == "default"


BAD = [
    ("{", "not valid JSON"),
    ("{}", '"default" is required'),
    ('{"default": []}', "non-empty list"),
    ('{"default": [{"type": "nope"}]}', "unknown requirement type"),
    ('{"default": [{"type": "reject", "x": 1}]}', "unknown field 'x'"),
    ('{"default": [{"type": "signedBy", "keyPath": "/k"}]}', '"keyType" must be "GPGKeys"'),
    ('{"default": [{"type": "signedBy", "keyType": "GPGKeys"}]}', "exactly one of"),
    ('{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", "keyData": "AA=="}]}',
     "exactly one of"),
    ('{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyData": "!!"}]}', "base64"),
    ('{"default": [{"type": "reject"}], "transports": {"docker": {"busybox": [{"type": "reject"}]}}}',
     "fully qualified"),
    ('{"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "/k", '
     '"signedIdentity": {"type": "exactReference", "dockerReference": "quay.io/a"}}]}',
     "tag or digest"),
    ('{"default": [{"type": "sigstoreSigned"}]}', "keyPath"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "why"), BAD, ids=[w for _, w in BAD])
def test_malformed_policy_names_file_and_reason(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_policy(path)
    assert str(path) in err.value.message and why in err.value.message
    assert err.value.hint


def test_missing_policy(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_policy(tmp_path / "none.json")


R = Reference.parse
IDENTITY = [
    (SignedIdentity(), R("quay.io/a:1"), "quay.io/a:1", True),
    (SignedIdentity(), R("quay.io/a:1"), "quay.io/a:2", False),
    (SignedIdentity(), R("quay.io/a:1"), "quay.io/a", False),
    (SignedIdentity(), R("quay.io/a@sha256:" + "b" * 64), "quay.io/a:any", True),
    (SignedIdentity("matchExact"), R("quay.io/a:1"), "quay.io/a:1", True),
    (SignedIdentity("matchExact"), R("quay.io/a@sha256:" + "b" * 64), "quay.io/a:1", False),
    (SignedIdentity("matchRepository"), R("quay.io/a:1"), "quay.io/a:9", True),
    (SignedIdentity("matchRepository"), R("quay.io/a:1"), "quay.io/b:1", False),
    (SignedIdentity("exactReference", reference="quay.io/x:1"), R("quay.io/a:1"), "quay.io/x:1", True),
    (SignedIdentity("exactRepository", reference="quay.io/x"), R("quay.io/a:1"), "quay.io/x:7", True),
    (SignedIdentity("remapIdentity", prefix="mirror.local/q", signed_prefix="quay.io"),
     R("mirror.local/q/a:1"), "quay.io/a:1", True),
    (SignedIdentity("remapIdentity", prefix="mirror.local/q", signed_prefix="quay.io"),
     R("mirror.local/qq/a:1"), "quay.io/a:1", False),
    (SignedIdentity(), R("docker.io/library/busybox:latest"), "busybox:latest", True),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "intended", "signed", "ok"), IDENTITY)
def test_signed_identity(rule: SignedIdentity, intended: Reference, signed: str, ok: bool) -> None:
    assert identity_matches(rule, intended, signed) is ok


def test_registries_d_duplicates_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("default-docker: {lookaside: file:///a}\n")
    (tmp_path / "b.yaml").write_text("default-docker: {lookaside: file:///b}\n")
    (tmp_path / "c.txt").write_text("ignored: [\n")
    with pytest.raises(UsageError, match="default-docker is also defined"):
        load_registries_d(tmp_path)
    (tmp_path / "b.yaml").write_text("docker: {quay.io: {lookaside: file:///q}}\n")
    conf = load_registries_d(tmp_path)
    assert conf.sources_for(R("quay.io/a:1")).lookaside == "file:///q"
    assert conf.sources_for(R("docker.io/a:1")).lookaside == "file:///a"
    assert load_registries_d(tmp_path / "none").sources_for(R("x.io/a")).lookaside == (
        "file:///var/lib/containers/sigstore"
    )
