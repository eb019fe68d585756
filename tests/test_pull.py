"""``bootstrap pull`` end to end against the real docker-registry in its four modes: what lands in
the store, interop with skopeo and umoci, indexes, digests, and failures (exit codes, nothing
stored)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from bootstrap.image import maintenance
from bootstrap.image.model import OCI_INDEX, Platform
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.faultproxy import FaultProxy
from tests.harness.imagebuilder import (
    File,
    Layer,
    build_image,
    build_index,
    busybox_spec,
    random_content,
)
from tests.harness.registry import Registry, client_env, free_port

pytestmark = pytest.mark.slow


def repo_name(request: pytest.FixtureRequest) -> str:
    return "t/" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]


def assert_interop(store: Store, ref: str, bundle: Path) -> None:
    """skopeo inspects and umoci unpacks what the store holds under ``ref``."""
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{store.oci}:{ref}"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["Digest"] == store.resolve(ref).digest
    out = subprocess.run(
        ["umoci", "unpack", "--image", f"{store.oci}:{ref}", str(bundle)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()


def blobs_of(store: Store) -> set[str]:
    return {f"sha256:{p.name}" for p in (store.blobs / "sha256").iterdir()}


def test_pull_in_every_registry_mode(
    any_registry: Registry,
    busybox_image: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    reg = any_registry
    name = repo_name(request)
    reg.push(busybox_image, "latest", f"{name}:1")
    built = busybox_image.image  # type: ignore[attr-defined]
    store = Store(tmp_path / "store")
    env = client_env(reg, tmp_path)
    ref = f"{reg.host}/{name}:1"

    ran = bootstrap("pull", ref, store=store.root, env=env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == built.digest
    assert store.resolve(ref).digest == built.digest
    assert blobs_of(store) == {built.digest, built.config_digest, *built.layers}
    assert maintenance.fsck(store).ok
    assert not list(store.tmp.iterdir())

    assert_interop(store, ref, tmp_path / "bundle")  # the layout skopeo and umoci read

    # a second pull downloads nothing and says so in --json
    ran = bootstrap("--json", "pull", ref, store=store.root, env=env, check=True)
    doc = ran.json()
    assert doc["downloaded"] == 0 and doc["digest"] == built.digest
    assert doc["layers"] == list(built.layers) and doc["name"] == ref


def test_pull_for_another_platform_of_a_single_platform_image_warns(
    registry: Registry, busybox_image: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = repo_name(request)
    registry.push(busybox_image, "latest", f"{name}:1")
    env = client_env(registry, tmp_path)
    ref = f"{registry.host}/{name}:1"
    host = Platform.host()
    other = "arm64" if host.architecture != "arm64" else "amd64"
    ran = bootstrap("pull", "--platform", f"linux/{other}", ref, store=tmp_path / "s", env=env)
    # as containers/image: pulled as it is, with a warning naming both platforms
    assert ran.rc == 0, ran.stderr
    assert (
        f"warning: {ref}: image platform linux/{host.architecture} does not match the "
        f"expected platform linux/{other}"
    ) in ran.stderr


@pytest.mark.parametrize("where", ["REGISTRIES_CONFIG_PATH", "registries.conf.d"])
def test_a_plain_http_registry_hint_is_the_entry_and_the_file_to_put_it_in(
    registry: Registry, busybox_image: Path, tmp_path: Path, where: str
) -> None:
    """TLS against a plain-http registry: the hint names the entry and the file; written
    there as given, the pull works."""
    registry.push(busybox_image, "latest", "plain/hint:1")
    ref = f"{registry.host}/plain/hint:1"
    if where == "REGISTRIES_CONFIG_PATH":
        conf = tmp_path / "registries.conf"
        conf.write_text("")
        env = {"REGISTRIES_CONFIG_PATH": str(conf)}
    else:
        env = {"BOOTSTRAP_REGISTRIES_CONF_D": str(tmp_path / "conf.d")}
    ran = bootstrap("pull", ref, store=tmp_path / "s", env=env)
    assert ran.rc == 3, ran.stderr
    hint = ran.stderr.splitlines()[-1]
    m = re.fullmatch(
        rf"bootstrap: hint: if {re.escape(registry.host)} is a plain-http registry, add "
        r"(\[\[registry\]\] location = \S+ insecure = true) to (\S+)",
        hint,
    )
    assert m, hint
    entry, file = m.groups()
    target = Path(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(entry.replace("] ", "]\n").replace('" ', '"\n') + "\n")
    bootstrap("pull", ref, store=tmp_path / "s", env=env, check=True)


def test_pull_by_digest_and_short_name_normalized(
    registry: Registry, busybox_image: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = repo_name(request)
    registry.push(busybox_image, "latest", f"{name}:latest")
    built = busybox_image.image  # type: ignore[attr-defined]
    store = Store(tmp_path / "store")
    env = client_env(registry, tmp_path)
    by_digest = f"{registry.host}/{name}@{built.digest}"
    ran = bootstrap("pull", by_digest, store=store.root, env=env, check=True)
    assert ran.stdout.strip() == built.digest
    assert store.resolve(by_digest).digest == built.digest
    ran = bootstrap("pull", f"{registry.host}/{name}", store=store.root, env=env, check=True)
    assert store.resolve(f"{registry.host}/{name}:latest").digest == built.digest
    assert [r.name for r in store.images()] == sorted([by_digest, f"{registry.host}/{name}:latest"])


def test_pull_manifest_list_pushed_by_skopeo(
    registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    host = Platform.host()
    other = "arm64" if host.architecture != "arm64" else "amd64"
    layout = tmp_path / "src"
    built = build_index(
        layout,
        "multi",
        [
            busybox_spec(cmd=("echo", "host")),
            busybox_spec(
                cmd=("echo", "other"),
                architecture=other,
                extra=[Layer([File("other.txt", b"other platform")])],
            ),
        ],
    )
    name = repo_name(request)
    registry.push(layout, "multi", f"{name}:multi", all=True)
    store = Store(tmp_path / "store")
    env = client_env(registry, tmp_path)
    ref = f"{registry.host}/{name}:multi"
    mine, theirs = built.children

    ran = bootstrap("--json", "pull", ref, store=store.root, env=env, check=True)
    doc = ran.json()
    assert doc["digest"] == built.digest and doc["media_type"] == OCI_INDEX
    assert doc["manifest_digest"] == doc["stored_digest"] == mine.digest
    # like skopeo copy without --all: the tag names the host's manifest, the index is recorded
    stored = store.resolve(ref)
    assert stored.digest == mine.digest
    assert stored.annotations["io.bootstrap.source.digest"] == built.digest
    assert blobs_of(store) == {mine.digest, mine.config_digest, *mine.layers}
    assert store.image(ref).config.cmd == ("echo", "host")
    assert maintenance.fsck(store).ok
    assert_interop(store, ref, tmp_path / "bundle")

    ran = bootstrap(
        "pull", "--platform", f"linux/{other}", ref, store=store.root, env=env, check=True
    )
    assert ran.stdout.strip() == built.digest
    assert store.resolve(ref).digest == theirs.digest
    assert store.image(ref).config.cmd == ("echo", "other")
    assert maintenance.fsck(store).ok
    assert_interop(store, ref, tmp_path / "bundle2")

    ran = bootstrap("pull", "--platform", "linux/s390x", ref, store=store.root, env=env)
    assert ran.rc == 2 and "no manifest for platform" in ran.stderr


def test_checkout_pulls_what_is_missing_in_one_pass(
    registry: Registry, busybox_image: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    name = repo_name(request)
    registry.push(busybox_image, "latest", f"{name}:1")
    built = busybox_image.image  # type: ignore[attr-defined]
    store = Store(tmp_path / "store")
    env = client_env(registry, tmp_path)
    ref = f"{registry.host}/{name}:1"

    ran = bootstrap("checkout", "--pull", "never", ref, tmp_path / "a", store=store.root, env=env)
    assert ran.rc == 2 and "bootstrap pull" in ran.stderr, ran.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    ran = bootstrap("checkout", ref, taken, store=store.root, env=env)
    assert ran.rc == 2 and "already exists" in ran.stderr
    assert not (store.root / "oci" / "index.json").exists() or store.images() == []  # not pulled

    doc = bootstrap("--json", "checkout", ref, tmp_path / "a", store=store.root, env=env).json()
    assert doc["pulled"] is True and doc["manifest"] == built.digest
    assert doc["layers_extracted"] == 0  # the pull filled the layer cache as it downloaded
    assert (tmp_path / "a/bin/busybox").is_file()
    assert store.resolve(ref).digest == built.digest and maintenance.fsck(store).ok
    assert not list(store.tmp.iterdir())

    doc = bootstrap("--json", "checkout", ref, tmp_path / "b", store=store.root, env=env).json()
    assert doc["pulled"] is False and doc["layers_extracted"] == 0
    ran = bootstrap("checkout", "--pull", "always", ref, tmp_path / "c", store=store.root, env=env)
    assert ran.rc == 0 and "pulled and extracted in one pass" in ran.stdout, ran.stderr


@pytest.mark.parametrize("command", ["pull", "checkout"])
def test_digest_mismatch_exits_4_and_stores_nothing(
    command: str, registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    layout = tmp_path / "src"
    spec = busybox_spec(extra=[Layer([File("unique", request.node.name.encode() * 1000)])])
    built = build_image(layout, "t", spec)
    name = repo_name(request)
    registry.push(layout, "t", f"{name}:t")
    # damage the unique layer inside the registry's storage: it now serves wrong bytes
    hexd = built.layers[-1].split(":")[1]
    data_file = registry.storage / f"docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data_file.write_bytes(bytes(raw))

    store = Store(tmp_path / "store")
    args = [f"{registry.host}/{name}:t"] + (
        [str(tmp_path / "root")] if command == "checkout" else []
    )
    ran = bootstrap(command, *args, store=store.root, env=client_env(registry, tmp_path))
    assert ran.rc == 4, ran.stderr
    assert not (tmp_path / "root").exists()
    # a one-pass checkout leaves no partial layer extraction in the cache
    assert not [p for p in store.layers.rglob("*") if p.name.startswith(".")]
    assert built.layers[-1] in ran.stderr
    assert store.images() == []
    assert built.layers[-1] not in blobs_of(store)
    assert not list(store.tmp.iterdir())
    assert maintenance.fsck(store).ok


def test_pull_errors_have_exit_codes(
    registry: Registry, tmp_path: Path, busybox_image: Path
) -> None:
    store = tmp_path / "store"
    env = client_env(registry, tmp_path)
    ran = bootstrap("pull", f"{registry.host}/t/does-not-exist:1", store=store, env=env)
    assert ran.rc == 3, ran.stderr
    ran = bootstrap("pull", "UPPER/Case:x:y", store=store, env=env)
    assert ran.rc == 2
    ran = bootstrap("pull", "--platform", "linux", f"{registry.host}/a:b", store=store, env=env)
    assert ran.rc == 2
    ran = bootstrap("--json", "pull", f"{registry.host}/t/does-not-exist:1", store=store, env=env)
    assert ran.rc == 3 and ran.json()["exit_code"] == 3
    assert not (store / "oci" / "index.json").exists() or Store(store).images() == []


@pytest.mark.parametrize("multi", [False, True], ids=["v2s2", "manifest-list"])
def test_pull_docker_formats_stored_as_oci(
    multi: bool, registry: Registry, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Docker v2s2 manifests (alone or from a Docker manifest list) are stored converted to OCI
    over the same blobs, so skopeo and umoci read the store; pull prints the registry's digest,
    which pins the same image again."""
    layout = tmp_path / "src"
    other = "arm64" if Platform.host().architecture != "arm64" else "amd64"
    if multi:
        build_index(
            layout, "t", [busybox_spec(cmd=("echo", "host")), busybox_spec(architecture=other)]
        )
    else:
        build_image(layout, "t", busybox_spec(cmd=("echo", "host")))
    name = repo_name(request)
    argv = ["skopeo", "copy", "-q", "--format", "v2s2", *registry.skopeo_dest_args()]
    argv += ["--all"] if multi else []
    argv += [f"oci:{layout}:t", f"docker://{registry.host}/{name}:1"]
    subprocess.run(argv, check=True, capture_output=True)
    served = registry.inspect(f"{name}:1", raw=True)
    assert "docker" in str(served["mediaType"])
    store = Store(tmp_path / "store")
    env = client_env(registry, tmp_path)
    ref = f"{registry.host}/{name}:1"

    ran = bootstrap("--json", "pull", ref, store=store.root, env=env, check=True)
    doc = ran.json()
    registry_digest = str(registry.inspect(f"{name}:1")["Digest"])
    assert doc["digest"] == registry_digest != doc["stored_digest"]
    stored = store.resolve(ref)
    assert stored.digest == doc["stored_digest"]
    assert stored.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert stored.annotations["io.bootstrap.source.digest"] == registry_digest
    manifest = json.loads(store.read_blob(stored.digest))
    assert manifest["mediaType"] == stored.media_type
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    assert store.image(ref).config.cmd == ("echo", "host")
    assert maintenance.fsck(store).ok
    assert_interop(store, ref, tmp_path / "bundle")

    listed = bootstrap("--json", "images", store=store.root, check=True).json()
    assert listed[0]["digest"] == stored.digest
    assert listed[0]["source_digest"] == registry_digest

    pinned = f"{registry.host}/{name}@{registry_digest}"
    ran = bootstrap("--json", "pull", pinned, store=store.root, env=env, check=True)
    assert ran.json()["stored_digest"] == stored.digest and ran.json()["downloaded"] == 0


@pytest.mark.parametrize(
    ("fault", "kw", "rc"),
    [
        ("reset", {"after": 300_000}, 0),  # resumed with Range
        ("truncate", {"after": 100_000}, 0),
        ("flip", {"after": 500_000}, 4),
        ("status", {"status": 404, "times": -1}, 3),  # blob unknown
    ],
)
def test_pull_through_faults_ends_whole_or_with_nothing_tagged(
    fault: str,
    kw: dict[str, int],
    rc: int,
    registry: Registry,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The full CLI pull through a fault-injecting proxy: the image ends byte-identical to what
    was pushed, or the pull fails with exit 3/4, nothing is tagged, and fsck is clean."""
    layout = tmp_path / "src"
    spec = busybox_spec(extra=[Layer([File("big", random_content(11, 2 * 1024 * 1024))])])
    built = build_image(layout, "t", spec)
    name = repo_name(request)
    registry.push(layout, "t", f"{name}:1")
    big = built.layers[-1]
    with FaultProxy.for_registry(registry) as proxy:
        proxy.add(fault, f"/blobs/{big}", **kw)
        store = Store(tmp_path / "store")
        conf = tmp_path / "proxy.conf"
        conf.write_text(f'[[registry]]\nlocation = "{proxy.host}"\ninsecure = true\n')
        ran = bootstrap(
            "pull",
            proxy.ref(name, "1"),
            store=store.root,
            env={"REGISTRIES_CONFIG_PATH": str(conf)},
        )
    assert ran.rc == rc, ran.stderr
    if rc == 0:
        assert ran.stdout.strip() == built.digest
        for digest in (built.digest, built.config_digest, *built.layers):
            assert (
                store.blob_path(digest).read_bytes()
                == (layout / "blobs" / digest.replace(":", "/")).read_bytes()
            )
    else:
        assert store.images() == [] and not store.has_blob(big)
    report = maintenance.fsck(store)
    assert report.ok, report.findings()
    assert not list(store.tmp.iterdir())


def test_pull_through_mirrors_first_down(
    registry: Registry, busybox_image: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """registries.conf mirrors are tried in order: the first is down, the second serves the
    manifest and the blobs; the image is stored under the name the user asked for."""
    name = repo_name(request)
    registry.push(busybox_image, "latest", f"{name}:1")
    built = busybox_image.image  # type: ignore[attr-defined]
    dead = f"127.0.0.1:{free_port()}"
    conf = tmp_path / "mirrors.conf"
    conf.write_text(
        "[[registry]]\n"
        'prefix = "mirrored.example"\n'
        f'location = "{dead}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{dead}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{registry.host}"\n'
        "insecure = true\n"
    )
    store = Store(tmp_path / "store")
    ref = f"mirrored.example/{name}:1"
    ran = bootstrap("pull", ref, store=store.root, env={"REGISTRIES_CONFIG_PATH": str(conf)})
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == built.digest
    assert [r.name for r in store.images()] == [ref]
    assert maintenance.fsck(store).ok


def test_pull_and_install_of_a_short_name_fetch_the_same_image(
    registry: Registry,
    busybox_image: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``bootstrap pull NAME`` and ``bootstrap install X NAME`` obtain a short name the same way
    (registries.conf's search registries; install used to normalize it to docker.io): the
    deployer's image lookup, which install calls first, gets what pull got."""
    from bootstrap.deploy.deployer import Deployer

    name = repo_name(request)
    registry.push(busybox_image, "latest", f"{name}:1")
    env = client_env(registry, tmp_path)
    conf = Path(env["REGISTRIES_CONFIG_PATH"])
    conf.write_text(f'unqualified-search-registries = ["{registry.host}"]\n' + conf.read_text())
    ran = bootstrap("--json", "pull", f"{name}:1", store=tmp_path / "a", env=env, check=True)
    pulled = ran.json()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    image = Deployer(tmp_path / "state", Store(tmp_path / "b")).image(f"{name}:1")
    assert image.name == pulled["name"] == f"{registry.host}/{name}:1"
    assert image.manifest.digest == pulled["manifest_digest"]
    assert Deployer(tmp_path / "state", Store(tmp_path / "a")).image(f"{name}:1", pull="never") == (
        image
    )
