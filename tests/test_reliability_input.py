"""Hostile and bad input, table-driven through the real CLI. Each case must end with exactly one
``bootstrap: error:`` line plus a hint, the exit code of its class (2 bad input, 3 registry,
4 integrity) and nothing changed: no tag stored, ``fsck`` clean, no temp files, no DEST, no
unit file or deployment.

- references given to pull/checkout/rmi/install (empty, upper case, bad digests, huge, control
  characters);
- manifests, indexes and configs served by a tiny fake registry (wrong or contradicting media
  types, lying sizes, unknown digest algorithms, > 4 MiB and endless manifests, deep nesting,
  index cycles and nested indexes, configs that are not JSON objects);
- layers: a gzip bomb (a few hundred KiB expanding to hundreds of MiB) imported as a rootfs tar
  and checked out into a store on a small tmpfs; unpack has no bound on extracted bytes, so the
  disk fills: the failure is contained (clear error, nothing left), and a strict xfail records
  that a cap is missing;
- ``--set`` values that try to inject unit directives (newlines, control characters, a trailing
  backslash) and bad ``--set`` keys.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import ExitCode
from bootstrap.image import maintenance
from bootstrap.image.model import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Platform
from bootstrap.image.store import Store
from tests.harness.cli import Ran, bootstrap
from tests.harness.crashloop import (
    FakeRegistry,
    Served,
    registries_env,
    store_leftovers,
    tiny_tmpfs,
    tree_state,
)

USAGE, REGISTRY, INTEGRITY = ExitCode.USAGE, ExitCode.REGISTRY, ExitCode.INTEGRITY


def assert_clean_failure(ran: Ran, code: int, word: str = "") -> None:
    """Exit ``code``, one error line (+ hint), no traceback, ``word`` in the message."""
    assert ran.rc == code, f"exit {ran.rc}, expected {code}: {ran.stderr}"
    errors = [x for x in ran.stderr.splitlines() if x.startswith("bootstrap: error:")]
    assert len(errors) == 1, ran.stderr
    assert "bootstrap: hint:" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr and "unexpected error" not in ran.stderr
    assert len(errors[0]) < 2000, "the error line should be bounded"
    if word:
        assert word.lower() in errors[0].lower(), errors[0]


def assert_store_unchanged(store: Path) -> None:
    st = Store(store)
    if not store.exists():
        return
    assert st.images() == []
    report = maintenance.fsck(st)
    assert report.ok, report.findings()
    assert store_leftovers(store) == []


# ---- references ----------------------------------------------------------------------------------

BAD_REFS = {
    "empty": "",
    "upper-case repository": "Busybox/Upper",
    "short digest": "busybox@sha256:abc",
    "unknown digest algorithm": "busybox@md5:" + "0" * 32,
    "upper-case hex digest": "busybox@sha256:" + "A" * 64,
    "huge": "a" * 100_000,
    "huge tag": "busybox:" + "t" * 200,
    "space": "busy box",
    "newline injection": "busybox\nExecStartPre=/bin/evil",
    "control character": "busybox\x1b[2J",
    "path traversal": "../../etc/passwd",
    "double slash": "registry.example//x",
    "trailing colon": "busybox:",
    "at without digest": "busybox@",
}


@pytest.mark.parametrize("ref", list(BAD_REFS.values()), ids=list(BAD_REFS))
def test_bad_reference(ref: str, tmp_path: Path) -> None:
    store = tmp_path / "store"
    dest = tmp_path / "dest"
    for argv in (["pull", ref], ["checkout", ref, str(dest)], ["rmi", ref]):
        ran = bootstrap(*argv, store=store)
        assert_clean_failure(ran, USAGE)
        assert (
            "\n" not in ran.stderr.split("bootstrap: error:")[1].split("bootstrap: hint:")[0][:-1]
        )
        assert not dest.exists()
    assert_store_unchanged(store)


# ---- hostile manifests from a fake registry -----------------------------------------------


def _tar_gz(files: dict[str, bytes]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1700000000
            tar.addfile(ti, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    return gzip.compress(raw.getvalue(), mtime=0), diff_id


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Base:
    """A valid tiny image's parts, to be bent into hostile shapes."""

    layer: bytes
    diff_id: str
    config: bytes

    def config_desc(self) -> dict[str, Any]:
        return {"mediaType": OCI_CONFIG, "digest": _sha(self.config), "size": len(self.config)}

    def layer_desc(self) -> dict[str, Any]:
        return {"mediaType": OCI_LAYER_GZIP, "digest": _sha(self.layer), "size": len(self.layer)}

    def manifest(self, **over: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.config_desc(),
            "layers": [self.layer_desc()],
        }
        doc.update(over)
        return doc


def _base() -> Base:
    layer, diff_id = _tar_gz({"hello.txt": b"hello\n"})
    host = Platform.host()
    config = json.dumps(
        {
            "architecture": host.architecture,
            "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    return Base(layer, diff_id, config)


def _serve_parts(f: FakeRegistry, repo: str, b: Base) -> None:
    f.blob(repo, b.layer)
    f.blob(repo, b.config)


def _endless() -> Iterator[bytes]:
    yield b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","x":"'
    while True:
        yield b"a" * 65536


def _m(
    doc: dict[str, Any] | bytes, ctype: str = OCI_MANIFEST
) -> Callable[[FakeRegistry, str, Base], None]:
    """A case serving ``doc`` as the manifest (with the base blobs)."""

    def case(f: FakeRegistry, repo: str, b: Base) -> None:
        _serve_parts(f, repo, b)
        f.manifest(repo, "1", doc, ctype)

    return case


def _cases() -> dict[str, tuple[Callable[[FakeRegistry, str, Base], None], int, str]]:
    b = _base()
    deep = b"[" * 100_000 + b"]" * 100_000
    host = Platform.host()
    plat = {"os": "linux", "architecture": host.architecture}
    cases: dict[str, tuple[Callable[[FakeRegistry, str, Base], None], int, str]] = {}

    def add(name: str, code: int, word: str) -> Callable[[Any], Any]:
        def deco(fn: Callable[[FakeRegistry, str, Base], None]) -> Any:
            cases[name] = (fn, code, word)
            return fn

        return deco

    add("html instead of a manifest", INTEGRITY, "")(_m(b"<html>login</html>", "text/html"))
    add("unknown manifest media type", INTEGRITY, "media type")(
        _m(b.manifest(mediaType="application/vnd.evil+json"), "application/vnd.evil+json")
    )
    add("media type contradicts the document", INTEGRITY, "contradicts")(
        _m(b.manifest(mediaType=OCI_INDEX), OCI_MANIFEST)
    )
    add("manifest is a JSON array", INTEGRITY, "object")(_m(b"[1,2,3]"))
    add("manifest nested 100000 deep", INTEGRITY, "")(_m(deep))
    add("manifest of 5 MiB", INTEGRITY, "larger than")(
        _m(json.dumps(b.manifest(annotations={"x": "a" * (5 << 20)})).encode())
    )

    @add("endless manifest stream", INTEGRITY, "larger than")
    def endless(f: FakeRegistry, repo: str, bb: Base) -> None:
        f.routes[f"{repo}/manifests/1"] = Served(content_type=OCI_MANIFEST, chunks=_endless)

    add("schemaVersion 3", INTEGRITY, "schemaVersion")(_m(b.manifest(schemaVersion=3)))
    add("layer digest md5", INTEGRITY, "digest")(
        _m(b.manifest(layers=[{**b.layer_desc(), "digest": "md5:" + "0" * 32}]))
    )
    add("layer digest upper-case hex", INTEGRITY, "digest")(
        _m(b.manifest(layers=[{**b.layer_desc(), "digest": b.layer_desc()["digest"].upper()}]))
    )
    add("layer digest too short", INTEGRITY, "digest")(
        _m(b.manifest(layers=[{**b.layer_desc(), "digest": "sha256:abcd"}]))
    )
    add("config digest sha1", INTEGRITY, "digest")(
        _m(b.manifest(config={**b.config_desc(), "digest": "sha1:" + "0" * 40}))
    )
    add("layer size smaller than the blob", INTEGRITY, "")(
        _m(b.manifest(layers=[{**b.layer_desc(), "size": len(b.layer) - 10}]))
    )
    add("layer size larger than the blob", INTEGRITY, "")(
        _m(b.manifest(layers=[{**b.layer_desc(), "size": len(b.layer) + 10}]))
    )
    add("negative layer size", INTEGRITY, "")(
        _m(b.manifest(layers=[{**b.layer_desc(), "size": -1}]))
    )
    add("size is a string", INTEGRITY, "")(
        _m(b.manifest(layers=[{**b.layer_desc(), "size": "12"}]))
    )
    add("config claims a terabyte", INTEGRITY, "")(
        _m(b.manifest(config={**b.config_desc(), "size": 1 << 40}))
    )
    add("two layers, one diff_id", INTEGRITY, "diff_id")(
        _m(b.manifest(layers=[b.layer_desc(), b.layer_desc()]))
    )

    @add("config is not JSON", INTEGRITY, "json")
    def cfg_text(f: FakeRegistry, repo: str, bb: Base) -> None:
        bad = Base(bb.layer, bb.diff_id, b"this is not json")
        _serve_parts(f, repo, bad)
        f.manifest(repo, "1", bad.manifest())

    @add("config is a JSON array", INTEGRITY, "object")
    def cfg_array(f: FakeRegistry, repo: str, bb: Base) -> None:
        bad = Base(bb.layer, bb.diff_id, b"[]")
        _serve_parts(f, repo, bad)
        f.manifest(repo, "1", bad.manifest())

    @add("config nested 100000 deep", INTEGRITY, "")
    def cfg_deep(f: FakeRegistry, repo: str, bb: Base) -> None:
        bad = Base(bb.layer, bb.diff_id, b'{"rootfs":' + deep + b"}")
        _serve_parts(f, repo, bad)
        f.manifest(repo, "1", bad.manifest())

    @add("config with a bad diff_id", INTEGRITY, "diff_id")
    def cfg_diff(f: FakeRegistry, repo: str, bb: Base) -> None:
        doc = json.loads(bb.config)
        doc["rootfs"]["diff_ids"] = ["sha256:xyz"]
        bad = Base(bb.layer, bb.diff_id, json.dumps(doc).encode())
        _serve_parts(f, repo, bad)
        f.manifest(repo, "1", bad.manifest())

    @add("index listing itself (server lies by digest)", INTEGRITY, "digest")
    def index_self(f: FakeRegistry, repo: str, bb: Base) -> None:
        # a document cannot contain its own digest; a cycle needs a server that lies
        fake_digest = "sha256:" + "1" * 64
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_INDEX, "digest": fake_digest, "size": 300, "platform": plat}
            ],
        }
        data = json.dumps(index).encode()
        index["manifests"][0]["size"] = len(data)
        data = json.dumps(index).encode()
        f.manifest(repo, "1", data, OCI_INDEX)
        f.routes[f"{repo}/manifests/{fake_digest}"] = Served(data, OCI_INDEX)

    @add("index A -> index B -> A", INTEGRITY, "index")
    def index_nested(f: FakeRegistry, repo: str, bb: Base) -> None:
        inner = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_INDEX,
                    "digest": "sha256:" + "2" * 64,
                    "size": 10,
                    "platform": plat,
                }
            ],
        }
        inner_data = json.dumps(inner).encode()
        inner_digest = f.manifest(repo, "inner", inner_data, OCI_INDEX)
        outer = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_INDEX,
                    "digest": inner_digest,
                    "size": len(inner_data),
                    "platform": plat,
                }
            ],
        }
        outer_data = json.dumps(outer).encode()
        f.manifest(repo, "1", outer_data, OCI_INDEX)
        # B "points back" at A: served under B's listed child digest, it is A's bytes
        f.routes[f"{repo}/manifests/sha256:{'2' * 64}"] = Served(outer_data, OCI_INDEX)

    @add("index without the host platform", USAGE, "platform")
    def index_other(f: FakeRegistry, repo: str, bb: Base) -> None:
        _serve_parts(f, repo, bb)
        m = json.dumps(bb.manifest()).encode()
        d = f.manifest(repo, "m", m, OCI_MANIFEST)
        f.manifest(
            repo,
            "1",
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": d,
                        "size": len(m),
                        "platform": {"os": "plan9", "architecture": "mips"},
                    }
                ],
            },
        )

    @add("index with 15000 entries", USAGE, "platform")
    def index_wide(f: FakeRegistry, repo: str, bb: Base) -> None:
        entry = {
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:" + "3" * 64,
            "size": 100,
            "platform": {"os": "plan9", "architecture": "mips"},
        }
        f.manifest(
            repo, "1", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry] * 15000}
        )

    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_manifest(name: str, tmp_path: Path) -> None:
    build, code, word = CASES[name]
    b = _base()
    store = tmp_path / "store"
    with FakeRegistry() as f:
        build(f, "h/img", b)
        env = registries_env(tmp_path, f.host)
        ran = bootstrap("pull", f"{f.host}/h/img:1", store=store, env=env, timeout=120)
    assert_clean_failure(ran, code, word)
    assert_store_unchanged(store)


def test_fake_registry_serves_the_valid_base(tmp_path: Path) -> None:
    """The corpus's base image is valid: the failures above come from the bent parts."""
    b = _base()
    store = tmp_path / "store"
    with FakeRegistry() as f:
        _serve_parts(f, "h/img", b)
        digest = f.manifest("h/img", "1", b.manifest())
        env = registries_env(tmp_path, f.host)
        ran = bootstrap("pull", f"{f.host}/h/img:1", store=store, env=env)
    assert ran.rc == 0, ran.stderr
    assert ran.stdout.strip() == digest
    bootstrap("checkout", f"{f.host}/h/img:1", tmp_path / "root", store=store, check=True)
    assert (tmp_path / "root" / "hello.txt").read_bytes() == b"hello\n"


# ---- layers: gzip bombs -------------------------------------------------------------------

BOMB_SIZE = 160 << 20  # 160 MiB of zeros in one file: ~160 KiB of gzip


def _bomb(path: Path) -> None:
    """A gzip'd tar holding one 160 MiB file of zeros (written streaming)."""

    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            n = min(len(buf), self.left)
            buf[:n] = bytes(n)
            self.left -= n
            return n

    with (
        gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        ti = tarfile.TarInfo("zeros.bin")
        ti.size = BOMB_SIZE
        tar.addfile(ti, io.BufferedReader(Zeros(BOMB_SIZE), 1 << 20))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    _bomb(path)
    assert path.stat().st_size < 1 << 20
    return path


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    with tiny_tmpfs(tmp_path / "fs", "48m") as fs:
        yield fs / "store"


@pytest.mark.slow
def test_gzip_bomb_checkout_is_contained(bomb: Path, small_store: Path, tmp_path: Path) -> None:
    """Under the bound's floor, extracting the bomb fills the store's file system: it must end
    with one clear error naming the lack of space, leave no cache temp dir and no DEST, and
    the store must stay valid; gc gives the space back."""
    unbounded = {"BOOTSTRAP_MAX_LAYER_EXPANSION": "0"}
    bootstrap("import", bomb, "--name", "bomb:1", store=small_store, env=unbounded, check=True)
    dest = tmp_path / "dest"
    ran = bootstrap("checkout", "bomb:1", dest, store=small_store, env=unbounded)
    assert ran.rc != 0
    assert_clean_failure(ran, ran.rc)
    assert ran.rc in (1, INTEGRITY), ran.stderr
    assert "space" in ran.stderr.lower(), ran.stderr
    assert not dest.exists()
    assert store_leftovers(small_store) == []
    assert maintenance.fsck(Store(small_store)).ok


@pytest.mark.slow
def test_gzip_bomb_is_refused_by_a_cap(bomb: Path, small_store: Path, tmp_path: Path) -> None:
    """The expansion bound (ratio 200 by default) refuses the bomb as hostile before the disk
    fills; its floor (64 MiB by default) is lowered below this 48 MiB store's size."""
    unbounded = {"BOOTSTRAP_MAX_LAYER_EXPANSION": "0"}
    bootstrap("import", bomb, "--name", "bomb:1", store=small_store, env=unbounded, check=True)
    env = {"BOOTSTRAP_LAYER_EXPANSION_FLOOR": str(4 << 20)}
    ran = bootstrap("checkout", "bomb:1", tmp_path / "dest", store=small_store, env=env)
    assert_clean_failure(ran, INTEGRITY)  # refused as hostile before the disk fills
    assert "decompression bomb" in ran.stderr
    assert "BOOTSTRAP_MAX_LAYER_EXPANSION" in ran.stderr
    assert not (tmp_path / "dest").exists()
    assert store_leftovers(small_store) == []
    assert maintenance.fsck(Store(small_store)).ok


@pytest.mark.slow
def test_gzip_bomb_import_is_refused(bomb: Path, small_store: Path) -> None:
    """With the default bound (200x past 64 MiB) importing the 160 MiB-from-160 KiB layer is
    refused as hostile while it is scanned, before anything is stored."""
    ran = bootstrap("import", bomb, "--name", "bomb:1", store=small_store)
    assert_clean_failure(ran, INTEGRITY)
    assert "decompression bomb" in ran.stderr
    assert Store(small_store).images() == []
    assert maintenance.fsck(Store(small_store)).ok


@pytest.mark.parametrize("value", ["-1", "lots", "1e9"])
def test_expansion_bound_setting_must_be_an_integer(bomb: Path, tmp_path: Path, value: str) -> None:
    ran = bootstrap(
        "import",
        bomb,
        "--name",
        "bomb:1",
        store=tmp_path / "s",
        env={"BOOTSTRAP_MAX_LAYER_EXPANSION": value},
    )
    assert_clean_failure(ran, USAGE)
    assert "BOOTSTRAP_MAX_LAYER_EXPANSION" in ran.stderr


# ---- --set values injecting unit directives ---------------------------------------------------


@pytest.fixture
def install_env(tmp_path: Path) -> dict[str, Path]:
    store, state, units, definition = (tmp_path / n for n in ("store", "state", "units", "def"))
    layer, _ = _tar_gz({"bin/hello": b"#!/bin/sh\necho hi\n"})
    archive = tmp_path / "rootfs.tar.gz"
    archive.write_bytes(layer)
    bootstrap("import", archive, "--name", "inject:1", store=store, check=True)
    definition.mkdir()
    (definition / "manifest.json").write_text(json.dumps({"defaultValues": {"X": "1"}}))
    (definition / "service.template").write_text(
        "[Unit]\nDescription=$NAME $X\n[Service]\nExecStart=$EXEC_START\nEnvironment=X=$X\n"
    )
    (definition / "config.json.template").write_text(
        json.dumps({"process": {"args": ["/bin/hello"], "env": ["X=$X"]}})
    )
    return {"store": store, "state": state, "units": units, "def": definition}


BAD_SETS = {
    "newline then directive": ["X=a\nExecStartPre=/bin/evil"],
    "carriage return": ["X=a\rExecStartPre=/bin/evil"],
    "escape sequence": ["X=\x1b[31mred"],
    "trailing backslash continues the line": ["X=evil\\"],
    "newline in EXEC_START": ["EXEC_START=/bin/sh\nExecStartPre=/bin/evil"],
    "key with a newline": ["X\nExecStartPre=/bin/evil=1"],
    "key with a space": ["MY VAR=1"],
    "empty key": ["=1"],
    "no equals sign": ["X"],
    "forced built-in NAME": ["NAME=other"],
}


@pytest.mark.parametrize("values", list(BAD_SETS.values()), ids=list(BAD_SETS))
def test_set_injection_is_refused(install_env: dict[str, Path], values: list[str]) -> None:
    e = install_env
    before = tree_state(e["store"], e["state"], e["units"], e["def"])
    argv: list[str | Path] = ["install", "inj", "inject:1", "--definition", e["def"]]
    for v in values:
        argv += ["--set", v]
    argv += ["--no-start", "--unit-dir", e["units"]]
    ran = bootstrap(*argv, store=e["store"], state=e["state"], timeout=120)
    assert_clean_failure(ran, USAGE)
    after = tree_state(e["store"], e["state"], e["units"], e["def"])
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    assert not (e["units"] / "inj.service").exists()
    assert_store_unchanged_but_tagged(e["store"])


def assert_store_unchanged_but_tagged(store: Path) -> None:
    st = Store(store)
    assert [r.name for r in st.images()] == ["docker.io/library/inject:1"]
    assert maintenance.fsck(st).ok
    assert store_leftovers(store) == []


# ---- node manifests (YAML) -----------------------------------------------------------------------


def _billion_laughs() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
        prev = name
    return "\n".join(lines) + "\n"


BAD_YAML: dict[str, tuple[str | bytes, str]] = {
    "billion laughs": (_billion_laughs(), "nodes"),
    "recursive alias": ("a: &a [*a]\n", "recursive"),
    "nested 100000 deep": ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "deep"),
    "2 MiB document": ('x: "' + "a" * (2 << 20) + '"\n', "larger"),
    "not UTF-8": (b"\xff\xfe bad", "UTF-8"),
    "duplicate key": ("containers: []\ncontainers: []\n", "duplicate"),
    "newline in a container name": (
        'containers:\n  - name: "x\\nExecStartPre=/bin/evil"\n    image: busybox\n',
        "name",
    ),
    "not a mapping": ("- 1\n- 2\n", ""),
}


@pytest.mark.parametrize("name", list(BAD_YAML))
def test_bad_node_manifest(name: str, tmp_path: Path) -> None:
    text, word = BAD_YAML[name]
    doc = tmp_path / "node.yaml"
    doc.write_bytes(text if isinstance(text, bytes) else text.encode())
    store, state = tmp_path / "store", tmp_path / "state"
    ran = bootstrap("up", doc, store=store, state=state, timeout=60)
    assert_clean_failure(ran, USAGE, word)
    assert not store.exists() and not state.exists()


# ---- checkout destinations and --platform --------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    store = tmp_path / "store"
    layer, _ = _tar_gz({"f": b"hello"})
    archive = tmp_path / "r.tar.gz"
    archive.write_bytes(layer)
    bootstrap("import", archive, "--name", "x:1", store=store, check=True)
    return store


BAD_DESTS = {
    "existing file": ("file", "exists"),
    "existing dir": ("dir", "exists"),
    "dangling symlink": ("dangling", "exists"),
    "parent missing": ("no/such/parent/d", "does not exist"),
    "inside the store's blobs": ("store/oci/blobs/sha256/zz", "inside the store"),
    "the store's layer cache": ("store/layers/sha256/abc", "inside the store"),
    "the store's tmp": ("store/tmp/x", "inside the store"),
    "through a symlink into the store": ("into-store/oci/blobs/x", "inside the store"),
}


@pytest.mark.parametrize("name", list(BAD_DESTS))
def test_bad_checkout_destination(name: str, stored: Path, tmp_path: Path) -> None:
    rel, word = BAD_DESTS[name]
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "into-store").symlink_to(stored)
    before = tree_state(tmp_path)
    ran = bootstrap("checkout", "x:1", tmp_path / rel, store=stored)
    assert_clean_failure(ran, USAGE, word)
    assert tree_state(tmp_path) == before
    assert maintenance.fsck(Store(stored)).ok


BAD_PLATFORMS = ["linux", "a/b/c/d", "LINUX/AMD64", "linux/amd64\nx", "linux//", "/amd64"]


@pytest.mark.parametrize("platform", BAD_PLATFORMS)
def test_bad_platform(platform: str, tmp_path: Path) -> None:
    ran = bootstrap("pull", "--platform", platform, "127.0.0.1:9/x:1", store=tmp_path / "s")
    assert_clean_failure(ran, USAGE, "platform")
    assert not (tmp_path / "s").exists()
