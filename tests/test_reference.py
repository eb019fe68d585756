"""Reference grammar and normalization: tables ported from distribution/reference
(reference_test.go, normalize_test.go). Where we differ from Go's ``Parse`` it is because we
always normalize (``ParseNormalizedNamed`` + ``TagNameOnly``) and register sha512."""

from __future__ import annotations

import pytest

from bootstrap.errors import ExitCode, UsageError
from bootstrap.image.reference import Reference, has_explicit_domain

F64 = "sha256:" + "f" * 64
D64 = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"

# (input, domain, path, tag, digest) -- from TestReferenceParse, normalized
VALID = [
    ("test_com", "docker.io", "library/test_com", "latest", None),
    ("test.com:tag", "docker.io", "library/test.com", "tag", None),
    ("test.com:5000", "docker.io", "library/test.com", "5000", None),
    ("test.com/repo:tag", "test.com", "repo", "tag", None),
    ("test:5000/repo", "test:5000", "repo", "latest", None),
    ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
    (f"test:5000/repo@{F64}", "test:5000", "repo", None, F64),
    (f"test:5000/repo:tag@{F64}", "test:5000", "repo", "tag", F64),
    ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", None),
    (
        "a/" * 127 + "a:tag-puts-this-over-max",
        "docker.io",
        "a/" * 127 + "a",
        "tag-puts-this-over-max",
        None,
    ),
    ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", "latest", None),
    (
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        "sub-dom1.foo.com",
        "bar/baz/quux",
        "some-long-tag",
        None,
    ),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io",
        "test.example.com/my-app",
        "test.example.com",
        None,
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
    (f"xn--7o8h.com/myimage:xn--7o8h.com@{F64}", "xn--7o8h.com", "myimage", "xn--7o8h.com", F64),
    ("foo_bar.com:8080", "docker.io", "library/foo_bar.com", "8080", None),
    ("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", "8080", None),
    ("192.168.1.1", "docker.io", "library/192.168.1.1", "latest", None),
    ("192.168.1.1:tag", "docker.io", "library/192.168.1.1", "tag", None),
    ("192.168.1.1:5000", "docker.io", "library/192.168.1.1", "5000", None),
    ("192.168.1.1/repo", "192.168.1.1", "repo", "latest", None),
    ("192.168.1.1:5000/repo", "192.168.1.1:5000", "repo", "latest", None),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
    ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", "latest", None),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", "latest", None),
    ("[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000", "repo", "tag", None),
    (f"[2001:db8::1]:5000/repo@{F64}", "[2001:db8::1]:5000", "repo", None, F64),
    (f"[2001:db8::1]:5000/repo:tag@{F64}", "[2001:db8::1]:5000", "repo", "tag", F64),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "latest", None),
    ("[::1]:5000/repo", "[::1]:5000", "repo", "latest", None),
    ("example.com/" + "a" * 255 + ":tag", "example.com", "a" * 255, "tag", None),
    # sha512 is registered here (go-digest needs crypto/sha512 imported for it)
    (
        "validname@sha512:" + "f" * 128,
        "docker.io",
        "library/validname",
        None,
        "sha512:" + "f" * 128,
    ),
    # localhost and friends
    ("localhost/fooo", "localhost", "fooo", "latest", None),
    ("localhost:5000/fooo/bar:t", "localhost:5000", "fooo/bar", "t", None),
    ("localhost", "docker.io", "library/localhost", "latest", None),
    ("LOCALDOMAIN/fooo", "LOCALDOMAIN", "fooo", "latest", None),
    ("Foo/bar", "Foo", "bar", "latest", None),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
]

INVALID = [
    # (input, a word the message must contain)
    ("", "empty"),
    (":justtag", "empty"),
    (f"@{F64}", "empty"),
    ("repo@sha256:" + "f" * 34, "hex"),
    ("validname@invaliddigest:" + "f" * 64, "invaliddigest"),
    ("Uppercase:tag", "lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "lowercase"),
    ("domain/" + "a" * 256 + ":tag", "more than 255"),
    ("aa/asdf$$^/aa", "asdf$$^"),
    ("[2001:db8::1]", "invalid"),
    ("[2001:db8::1]:5000", "invalid"),
    ("[2001:db8::1]:tag", "invalid"),
    ("[fe80::1%eth0]:5000/repo", "fe80"),
    ("[fe80::1%@invalidzone]:5000/repo", "invalid"),
    # TestValidateReferenceName invalid
    ("https://github.com/docker/docker", "invalid"),
    ("docker/Docker", "lowercase"),
    ("-docker", "-docker"),
    ("-docker/docker", "-docker"),
    ("-docker.io/docker/docker", "-docker.io"),
    ("docker///docker", "''"),
    ("docker.io/docker/Docker", "lowercase"),
    ("docker.io/docker///docker", "''"),
    ("[fc00::1]", "invalid"),
    ("[fc00::1]:5000", "invalid"),
    ("fc00::1:5000/debian", "invalid"),
    ("[fe80::1%eth0]:5000/debian", "invalid"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid"),
    ("1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "image ID"),
    # TestValidateRemoteName invalid
    ("docker-/docker", "docker-"),
    ("-docker-/docker", "-docker-"),
    ("____/____", "____"),
    ("_docker/_docker", "_docker"),
    ("dock..er/docker", "dock..er"),
    ("dock_.er/docker", "dock_.er"),
    ("dock-.er/docker", "dock-.er"),
    ("docker/", "''"),
    (
        "_".join(["this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255"] * 4)
        + "/docker",
        "characters",
    ),
    ("busybox:-tag", "-tag"),
    ("busybox:" + "t" * 129, "tag"),
    ("busybox@sha256:" + "F" * 64, "hex"),
    ("busy box", "whitespace"),
    (" busybox", "whitespace"),
]

VALID_NAMES = [
    "docker/docker",
    "library/debian",
    "debian",
    "localhost/library/debian",
    "localhost/debian",
    "LOCALDOMAIN/library/debian",
    "LOCALDOMAIN/debian",
    "docker.io/docker/docker",
    "docker.io/library/debian",
    "docker.io/debian",
    "index.docker.io/docker/docker",
    "index.docker.io/library/debian",
    "index.docker.io/debian",
    "127.0.0.1:5000/docker/docker",
    "127.0.0.1:5000/library/debian",
    "127.0.0.1:5000/debian",
    "192.168.0.1",
    "192.168.0.1:80",
    "192.168.0.1:8/debian",
    "192.168.0.2:25000/debian",
    "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
    "[fc00::1]:5000/docker",
    "[fc00::1]:5000/docker/docker",
    "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
    "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
    "Docker/docker",
    "DOCKER/docker",
    "docker-rules/docker",
    "docker---rules/docker",
    "doc/docker",
    "d/docker",
    "jess/t",
    "dock__er/docker",
]

# TestParseRepositoryInfo: (remote, familiar, full, ambiguous, domain)
REPO_INFO = [
    ("fooo", "localhost/fooo", "localhost/fooo", "localhost/fooo", "localhost"),
    ("fooo/bar", "localhost/fooo/bar", "localhost/fooo/bar", "localhost/fooo/bar", "localhost"),
    ("fooo", "LOCALDOMAIN/fooo", "LOCALDOMAIN/fooo", "LOCALDOMAIN/fooo", "LOCALDOMAIN"),
    (
        "fooo/bar",
        "LOCALDOMAIN/fooo/bar",
        "LOCALDOMAIN/fooo/bar",
        "LOCALDOMAIN/fooo/bar",
        "LOCALDOMAIN",
    ),
    ("fooo/bar", "fooo/bar", "docker.io/fooo/bar", "index.docker.io/fooo/bar", "docker.io"),
    ("library/ubuntu", "ubuntu", "docker.io/library/ubuntu", "library/ubuntu", "docker.io"),
    ("nonlibrary/ubuntu", "nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu", "", "docker.io"),
    ("other/library", "other/library", "docker.io/other/library", "", "docker.io"),
    (
        "private/moonbase",
        "127.0.0.1:8000/private/moonbase",
        "127.0.0.1:8000/private/moonbase",
        "",
        "127.0.0.1:8000",
    ),
    (
        "privatebase",
        "127.0.0.1:8000/privatebase",
        "127.0.0.1:8000/privatebase",
        "",
        "127.0.0.1:8000",
    ),
    (
        "private/moonbase",
        "example.com/private/moonbase",
        "example.com/private/moonbase",
        "",
        "example.com",
    ),
    ("privatebase", "example.com/privatebase", "example.com/privatebase", "", "example.com"),
    (
        "private/moonbase",
        "example.com:8000/private/moonbase",
        "example.com:8000/private/moonbase",
        "",
        "example.com:8000",
    ),
    (
        "privatebasee",
        "example.com:8000/privatebasee",
        "example.com:8000/privatebasee",
        "",
        "example.com:8000",
    ),
    (
        "library/ubuntu-12.04-base",
        "ubuntu-12.04-base",
        "docker.io/library/ubuntu-12.04-base",
        "index.docker.io/library/ubuntu-12.04-base",
        "docker.io",
    ),
    ("library/foo", "foo", "docker.io/library/foo", "docker.io/foo", "docker.io"),
    ("library/foo/bar", "library/foo/bar", "docker.io/library/foo/bar", "", "docker.io"),
    ("store/foo/bar", "store/foo/bar", "docker.io/store/foo/bar", "", "docker.io"),
    ("bar", "Foo/bar", "Foo/bar", "", "Foo"),
    ("bar", "FOO/bar", "FOO/bar", "", "FOO"),
]

# TestParseDockerRef (we keep the tag next to the digest; Docker drops it)
DOCKER_REF = [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:latest", "docker.io/library/busybox:latest"),
    (
        "busybox@sha256:e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582",
        "docker.io/library/busybox@sha256:e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582",
    ),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox:latest", "docker.io/library/busybox:latest"),
    ("library/busybox:latest", "docker.io/library/busybox:latest"),
    ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
    ("gcr.io/library/busybox", "gcr.io/library/busybox:latest"),
    (
        "gcr.io/library/busybox:latest@sha256:e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582",
        "gcr.io/library/busybox:latest@sha256:e6693c20186f837fc393390135d8a598a96a833917917789d63766cab6c59582",
    ),
    ("redis", "docker.io/library/redis:latest"),
    (f"redis@{D64}", f"docker.io/library/redis@{D64}"),
    ("dmcgowan/myapp", "docker.io/dmcgowan/myapp:latest"),
    (f"dmcgowan/myapp@{D64}", f"docker.io/dmcgowan/myapp@{D64}"),
    (
        "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9",
        "docker.io/library/dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9:latest",
    ),
    ("dbcc1", "docker.io/library/dbcc1:latest"),
]

# TestNormalizedSplitHostname
SPLIT = [
    ("test.com/foo", "test.com", "foo"),
    ("test_com/foo", "docker.io", "test_com/foo"),
    ("docker/migrator", "docker.io", "docker/migrator"),
    ("test.com:8080/foo", "test.com:8080", "foo"),
    ("test-com:8080/foo", "test-com:8080", "foo"),
    ("foo", "docker.io", "library/foo"),
    ("xn--n3h.com/foo", "xn--n3h.com", "foo"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo"),
    ("docker.io/foo", "docker.io", "library/foo"),
    ("docker.io/library/foo", "docker.io", "library/foo"),
    ("docker.io/library/foo/bar", "docker.io", "library/foo/bar"),
]


@pytest.mark.parametrize(("text", "domain", "path", "tag", "digest"), VALID)
def test_valid(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert ref.repository == f"{domain}/{path}"
    # the normalized string parses back to the same reference
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(("text", "word"), INVALID)
def test_invalid(text: str, word: str) -> None:
    with pytest.raises(UsageError) as info:
        Reference.parse(text)
    assert info.value.exit_code == ExitCode.USAGE == 2
    assert word in info.value.message, info.value.message
    assert info.value.hint
    assert "\n" not in info.value.message


@pytest.mark.parametrize("text", VALID_NAMES)
def test_valid_names(text: str) -> None:
    Reference.parse(text)


@pytest.mark.parametrize(("remote", "familiar", "full", "ambiguous", "domain"), REPO_INFO)
def test_repository_info(
    remote: str, familiar: str, full: str, ambiguous: str, domain: str
) -> None:
    for text in [familiar, full] + ([ambiguous] if ambiguous else []):
        ref = Reference.parse(text)
        assert ref.familiar_name() == familiar
        assert ref.repository == full
        assert ref.domain == domain
        assert ref.path == remote
        assert ref.tag == "latest"


@pytest.mark.parametrize(("text", "expected"), DOCKER_REF)
def test_normalized_string(text: str, expected: str) -> None:
    assert str(Reference.parse(text)) == expected


@pytest.mark.parametrize(("text", "domain", "path"), SPLIT)
def test_split_hostname(text: str, domain: str, path: str) -> None:
    ref = Reference.parse(text)
    assert (ref.domain, ref.path) == (domain, path)


def test_tag_and_digest_familiar() -> None:
    short = "busybox:latest@sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
    ref = Reference.parse(short)
    assert str(ref) == "docker.io/library/" + short
    assert ref.familiar() == short
    assert ref.tag == "latest"
    assert ref.tag_or_digest == short.split("@")[1]


def test_familiar_forms() -> None:
    assert Reference.parse("busybox").familiar() == "busybox:latest"
    assert Reference.parse("docker.io/user/app:1").familiar() == "user/app:1"
    assert Reference.parse("127.0.0.1:5000/x/y:t").familiar() == "127.0.0.1:5000/x/y:t"


def test_with_digest_and_tag() -> None:
    ref = Reference.parse("127.0.0.1:5000/a/b:t")
    pinned = ref.with_digest(F64)
    assert str(pinned) == f"127.0.0.1:5000/a/b:t@{F64}"
    assert pinned.tag_or_digest == F64
    with pytest.raises(UsageError):
        ref.with_digest("sha256:abc")
    assert str(pinned.with_tag("u")) == "127.0.0.1:5000/a/b:u"
    with pytest.raises(UsageError):
        ref.with_tag("-bad")


def test_frozen_and_hashable() -> None:
    a = Reference.parse("busybox")
    b = Reference.parse("docker.io/library/busybox:latest")
    assert a == b
    assert len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.tag = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "explicit"),
    [
        ("busybox", False),
        ("library/busybox", False),
        ("user/app:1", False),
        ("docker.io/busybox", True),
        ("localhost/x", True),
        ("127.0.0.1:5000/x", True),
        ("registry.example.com/x", True),
        ("Foo/bar", True),
    ],
)
def test_explicit_domain(text: str, explicit: bool) -> None:
    assert has_explicit_domain(text) is explicit
