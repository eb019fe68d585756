"""``bootstrap push`` against the real docker-registry in its four modes (plain, TLS, basic and
token auth): a store filled by ``import`` seeds a registry; skopeo reads back exactly what the
store holds; blobs the registry has are not sent again; credentials, certs.d and insecure
handling are the pull's; a damaged stored blob never reaches the registry; bad destinations
and refusals are one error line with a hint."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.imagebuilder import (
    File,
    ImageSpec,
    Layer,
    build_index,
    save_docker_archive,
    save_oci_archive,
)
from tests.harness.registry import Registry, client_env

pytestmark = pytest.mark.slow


def repo_name(request: pytest.FixtureRequest) -> str:
    return "push/" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]


def _own_spec() -> ImageSpec:
    """An image whose layers no other test pushes: a docker-archive's layers are stored
    uncompressed, and once skopeo has read one back from a registry, its blob-info cache
    (shared by every test on the machine) would offer it in place of the same content
    compressed (busybox's layer, say) to a later skopeo copy without --preserve-digests."""
    return ImageSpec(
        layers=[Layer([File("etc/app", os.urandom(4096))]), Layer([File("etc/v", b"v1\n")])],
        cmd=("/etc/app",),
    )


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, str]:
    """A store holding one image imported from a docker-archive (no registry involved):
    (store, stored name)."""
    store = tmp_path / "store"
    archive = tmp_path / "app.tar"
    save_docker_archive(_own_spec(), archive, "local/app:1")
    bootstrap("import", archive, store=store, check=True)
    return store, "docker.io/local/app:1"


def _blob_puts(reg: Registry, repo: str) -> int:
    """How many blob uploads the registry's access log shows for ``repo``."""
    return len(re.findall(rf'"PUT /v2/{re.escape(repo)}/blobs/uploads/', reg.log()))


def test_push_in_every_registry_mode_and_skopeo_reads_it_back(
    any_registry: Registry,
    imported: tuple[Path, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    reg = any_registry
    store, name = imported
    repo = repo_name(request)
    env = client_env(reg, tmp_path)
    stored = Store(store).resolve(name)
    ran = bootstrap("push", name, f"docker://{reg.host}/{repo}:1", store=store, env=env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == stored.digest  # the stored manifest, as it is
    assert "no signatures" in ran.stderr
    # skopeo reads back the very manifest bytes the store holds, and can copy the image
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", *reg.skopeo_args(), f"docker://{reg.host}/{repo}:1"],
        capture_output=True,
        check=True,
    ).stdout
    assert raw == Store(store).read_blob(stored.digest)
    copy = subprocess.run(
        ["skopeo", "copy", "--quiet", *reg.skopeo_src_args(),
         f"docker://{reg.host}/{repo}:1", f"oci:{tmp_path / 'back'}:1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert copy.returncode == 0, copy.stderr
    # bootstrap pulls it back as well, to the same digest
    ran = bootstrap("pull", f"{reg.host}/{repo}:1", store=tmp_path / "s2", env=env, check=True)
    assert ran.stdout.strip() == stored.digest


def test_a_second_push_sends_no_blob(
    registry: Registry, imported: tuple[Path, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store, name = imported
    repo = repo_name(request)
    env = client_env(registry, tmp_path)
    first = bootstrap("--json", "push", name, f"{registry.host}/{repo}:1", store=store, env=env)
    assert first.rc == 0, first.stderr
    doc = first.json()
    assert doc["blobs_sent"] == 3 and doc["blobs_present"] == 0 and doc["signatures"] == 0
    uploads = _blob_puts(registry, repo)
    assert uploads == 3  # a config and two layers
    again = bootstrap("--json", "push", name, f"{registry.host}/{repo}:2", store=store, env=env)
    assert again.rc == 0, again.stderr
    assert (again.json()["blobs_sent"], again.json()["blobs_present"]) == (0, 3)
    assert _blob_puts(registry, repo) == uploads  # HEAD said present: nothing uploaded
    assert registry.inspect(f"{repo}:2")["Digest"] == doc["digest"]


def test_push_to_the_stored_name_by_default_and_a_short_name(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``push REF`` alone sends it where its name says (as podman push); the stored image is
    found by the name the user typed."""
    repo = repo_name(request)
    store = tmp_path / "store"
    archive = tmp_path / "a.tar"
    save_docker_archive(_own_spec(), archive, f"{registry.host}/{repo}:1")
    bootstrap("import", archive, store=store, check=True)
    env = client_env(registry, tmp_path)
    ran = bootstrap("push", f"{registry.host}/{repo}:1", store=store, env=env)
    assert ran.rc == 0, ran.stderr
    assert registry.inspect(f"{repo}:1")["Digest"] == ran.stdout.strip()


def test_an_index_whose_manifests_are_stored_is_pushed_whole(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    repo = repo_name(request)
    layout = tmp_path / "oci"
    specs = [
        ImageSpec(layers=[Layer([File("arch", arch.encode())])], architecture=arch)
        for arch in ("amd64", "arm64")
    ]
    built = build_index(layout, "multi", specs)
    archive = tmp_path / "multi.tar"
    save_oci_archive(layout, archive)
    store = tmp_path / "store"
    bootstrap("import", "--name", "local/multi:1", archive, store=store, check=True)
    env = client_env(registry, tmp_path)
    ran = bootstrap("push", "local/multi:1", f"{registry.host}/{repo}:1", store=store, env=env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == built.digest
    raw = registry.inspect(f"{repo}:1", raw=True)
    assert len(raw["manifests"]) == 2  # type: ignore[arg-type]
    for arch in ("amd64", "arm64"):
        out = subprocess.run(
            ["skopeo", "--override-arch", arch, "inspect", *registry.skopeo_args(),
             f"docker://{registry.host}/{repo}:1"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0 and json.loads(out.stdout)["Architecture"] == arch, out.stderr


def test_credentials_certs_and_insecure_come_from_the_pull_s_files(
    registry_basic: Registry,
    registry: Registry,
    imported: tuple[Path, str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    store, name = imported
    repo = repo_name(request)
    dest = f"{registry_basic.host}/{repo}:1"
    env = client_env(registry_basic, tmp_path)
    # no credentials: refused, with the auth files named
    ran = bootstrap(
        "push", name, dest, store=store, env={**env, "REGISTRY_AUTH_FILE": str(tmp_path / "n")}
    )
    assert ran.rc == 3, ran.stderr
    assert "access denied without credentials" in ran.stderr and "push" in ran.stderr
    assert len(ran.stderr.splitlines()) == 2 and "auth file" in ran.stderr.splitlines()[1]
    # no CA for the TLS registry: the certs.d directory to put it in
    ran = bootstrap(
        "push", name, dest, store=store, env={**env, "BOOTSTRAP_CERTS_D": str(tmp_path / "none")}
    )
    assert ran.rc == 3 and f"{tmp_path / 'none'}/{registry_basic.host}/ca.crt" in ran.stderr
    # a plain-http registry not marked insecure: the entry and the file to put it in
    plain = tmp_path / "plain.conf"
    plain.write_text("")
    ran = bootstrap(
        "push", name, f"{registry.host}/{repo}:1", store=store,
        env={"REGISTRIES_CONFIG_PATH": str(plain)},
    )  # fmt: skip
    assert ran.rc == 3
    assert f'add [[registry]] location = "{registry.host}" insecure = true to {plain}' in (
        ran.stderr
    )
    # with everything in place
    assert bootstrap("push", name, dest, store=store, env=env).rc == 0


def test_a_damaged_stored_blob_never_reaches_the_registry(
    registry: Registry, imported: tuple[Path, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store, name = imported
    repo = repo_name(request)
    st = Store(store)
    layer = st.image(name).manifest.layers[-1].digest
    path = st.blob_path(layer)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    env = client_env(registry, tmp_path)
    ran = bootstrap("push", name, f"{registry.host}/{repo}:1", store=store, env=env)
    assert ran.rc == 4, ran.stderr
    assert f"stored blob {layer} ({path}) is damaged" in ran.stderr
    assert "fsck --repair" in ran.stderr.splitlines()[-1]
    out = subprocess.run(
        ["skopeo", "inspect", *registry.skopeo_args(), f"docker://{registry.host}/{repo}:1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0  # no manifest was put: nothing half-pushed is tagged


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("oci:/tmp/x:1", "only docker:// destinations are supported"),
        ("oci-archive:/tmp/x.tar", "only docker:// destinations are supported"),
        ("dir:///tmp/x", "only docker:// destinations are supported"),
        ("docker://reg.example.com/a@sha256:" + "0" * 64, "names a digest"),
        ("docker://Bad Name", "invalid image reference"),
    ],
)
def test_bad_destinations_are_exit_2(imported: tuple[Path, str], dest: str, message: str) -> None:
    store, name = imported
    ran = bootstrap("push", name, dest, store=store)
    assert ran.rc == 2 and message in ran.stderr.lower(), ran.stderr
    assert len(ran.stderr.splitlines()) == 2


def test_what_is_not_stored_or_a_blocked_registry_is_exit_2(
    imported: tuple[Path, str], tmp_path: Path
) -> None:
    store, name = imported
    ran = bootstrap("push", "local/nope:1", "docker://127.0.0.1:1/a:1", store=store)
    assert ran.rc == 2 and "not in the store" in ran.stderr
    conf = tmp_path / "blocked.conf"
    conf.write_text('[[registry]]\nlocation = "127.0.0.1:1"\nblocked = true\n')
    ran = bootstrap(
        "push", name, "127.0.0.1:1/a:1", store=store, env={"REGISTRIES_CONFIG_PATH": str(conf)}
    )
    assert ran.rc == 2 and "blocked" in ran.stderr
