"""Differential test on random layer stacks: applying layers one by one onto a tree
(``apply_layer``) and a checkout from the layer cache (extract each layer alone, compose) must
agree — the same tree, or both refuse with IntegrityError. Well-formed stacks must succeed both
ways, and the tree must equal ``umoci unpack``'s (umoci failing on one is a test failure, not a
skip)."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from bootstrap.errors import IntegrityError
from bootstrap.image.apply import UnpackOptions, apply_layer
from bootstrap.image.compose import checkout
from bootstrap.image.model import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST
from bootstrap.image.store import Store
from tests.harness.imagebuilder import init_layout, put_blob
from tests.harness.treediff import diff, snapshot
from tests.harness.unpack_support import load_layout

NAMES = ["a", "b", "a/x", "a/y", "b/x", "a/x/z", "c"]
SEEDS = range(150)


def random_stack(rng: random.Random, *, well_formed: bool) -> list[bytes]:
    """2 to 4 random layers (see :func:`random_layer`); well-formed ones over the tree the
    layers below them leave."""
    lower: dict[str, str] = {}
    return [
        random_layer(rng, well_formed=well_formed, lower=lower) for _ in range(rng.randint(2, 4))
    ]


def _merge(lower: dict[str, str], entries: list[tuple[str, str]]) -> None:
    """Update ``lower`` (path -> "dir" or another kind) with what a layer of ``entries`` does."""

    def drop_below(path: str) -> None:
        for p in [p for p in lower if p.startswith(path + "/")]:
            del lower[p]

    for name, kind in entries:
        head, _, base = name.rpartition("/")
        if base == ".wh..wh..opq":
            drop_below(head)
        elif base.startswith(".wh."):
            victim = (head + "/" if head else "") + base[4:]
            lower.pop(victim, None)
            drop_below(victim)
        else:
            if kind != "dir":
                drop_below(name)
            lower[name] = kind


def random_layer(
    rng: random.Random, *, well_formed: bool, lower: dict[str, str] | None = None
) -> bytes:
    """A random layer over a small namespace. ``well_formed``: what image builders produce —
    each path at most once, sorted by path (parents first; whiteout markers among their
    siblings), whiteouts only of paths this layer does not also create, hardlinks only to
    regular files earlier in the same layer, nothing below a path that this layer or the
    layers below (``lower``, path -> kind, updated with this layer) leave a file or a symlink.
    Otherwise anything goes (order, repeats, forward and cross-layer hardlinks)."""
    below: dict[str, str] = lower if lower is not None else {}
    entries: list[tuple[str, str]] = []
    for _ in range(rng.randint(1, 6)):
        name = rng.choice(NAMES)
        kind = rng.choice(["file", "file", "dir", "dir", "symlink", "hardlink", "wh", "opq"])
        head, _, base = name.rpartition("/")
        if kind == "wh":
            name, kind = (f"{head}/.wh.{base}" if head else f".wh.{base}"), "marker"
        elif kind == "opq":
            name, kind = f"{name}/.wh..wh..opq", "marker"
        entries.append((name, kind))
    if well_formed:
        seen: dict[str, str] = {}
        for name, kind in entries:
            seen.setdefault(name, kind)
        entries = sorted(seen.items())
        made = {n for n, k in entries if k != "marker"}
        parents = {n.rsplit("/", i)[0] for n in made for i in range(1, n.count("/") + 1)}
        kept = []
        for name, kind in entries:
            head, _, base = name.rpartition("/")
            ancestors = {name.rsplit("/", i)[0] for i in range(1, name.count("/") + 1)}
            if any(seen.get(a, below.get(a, "dir")) != "dir" for a in ancestors):
                continue  # below something this layer or a lower one makes a file or symlink
            if base.startswith(".wh.") and base != ".wh..wh..opq":
                victim = (head + "/" if head else "") + base[4:]
                if victim in made or victim in parents:
                    continue
            if base == ".wh..wh..opq" and (head in made and seen.get(head) != "dir"):
                continue
            kept.append((name, kind))
        entries = kept
        _merge(below, entries)
    files: list[str] = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000 + rng.randint(0, 1000)
            ti.uid = rng.choice([0, 0, 7])
            data = b""
            if kind == "hardlink" and well_formed and not files:
                kind = "file"
            if kind in ("file", "marker"):
                ti.mode = rng.choice([0o644, 0o755, 0o4755])
                data = rng.randbytes(rng.randint(0, 20)) if kind == "file" else b""
                ti.size = len(data)
                if kind == "file":
                    files.append(name)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = rng.choice([0o755, 0o700, 0o1777])
            elif kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = rng.choice(["a", "x", "../b", "/c", "nowhere"])
            else:
                ti.type = tarfile.LNKTYPE
                ti.linkname = rng.choice(files if well_formed else NAMES)
            tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue()


def build(layout: Path, layers: list[bytes]) -> None:
    init_layout(layout)
    descs = []
    for data in layers:
        digest, size = put_blob(layout, data)
        descs.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }
    cdigest, csize = put_blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": descs,
    }
    mdigest, msize = put_blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": "t"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def _run_both(
    layers: list[bytes], tmp_path: Path
) -> tuple[Path, IntegrityError | None, IntegrityError | None]:
    """Apply ``layers`` both ways; return the OCI layout and the errors (None: success)."""
    applied = tmp_path / "applied"
    applied.mkdir(mode=0o755)
    os.chmod(applied, 0o755)
    apply_error: IntegrityError | None = None
    try:
        for i, data in enumerate(layers):
            apply_layer(
                io.BytesIO(data), "none", applied, options=UnpackOptions(), layer_name=f"{i}"
            )
    except IntegrityError as exc:
        apply_error = exc
    layout = tmp_path / "oci"
    build(layout, layers)
    store = Store(tmp_path / "store")
    store.init()
    load_layout(store, layout, "t", "example.com/r:1")
    checkout_error: IntegrityError | None = None
    try:
        checkout(store, store.image("example.com/r:1"), tmp_path / "checkout")
    except IntegrityError as exc:
        checkout_error = exc
    return layout, apply_error, checkout_error


@pytest.mark.skipif(os.geteuid() != 0, reason="owners need root")
@pytest.mark.parametrize("seed", SEEDS)
def test_apply_and_checkout_agree(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    layers = random_stack(rng, well_formed=True)
    applied = tmp_path / "applied"
    layout, apply_error, checkout_error = _run_both(layers, tmp_path)
    assert apply_error is None and checkout_error is None, (apply_error, checkout_error)
    problems = diff(snapshot(applied, mtimes=True), snapshot(tmp_path / "checkout", mtimes=True))
    assert not problems, "\n".join(problems)
    proc = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:t", str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"umoci unpack failed on a well-formed stack: {proc.stderr}"
    reference = tmp_path / "bundle" / "rootfs"
    problems = diff(snapshot(reference, mtimes=True), snapshot(applied, mtimes=True))
    assert not problems, "differs from umoci:\n" + "\n".join(problems)


@pytest.mark.parametrize("seed", SEEDS)
def test_ill_formed_layers_fail_cleanly(seed: int, tmp_path: Path) -> None:
    """Repeated paths, children before parents, forward and cross-layer hardlinks, whiteouts of
    what the layer itself makes: apply and checkout agree as the module promises — both refuse
    with IntegrityError (no other exception; a refused checkout leaves nothing behind) or both
    succeed with the same tree."""
    rng = random.Random(seed)
    layers = random_stack(rng, well_formed=False)
    _, apply_error, checkout_error = _run_both(layers, tmp_path)
    assert (apply_error is None) == (checkout_error is None), (apply_error, checkout_error)
    if checkout_error is not None:
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("checkout")]
        return
    applied, checked_out = tmp_path / "applied", tmp_path / "checkout"
    problems = diff(snapshot(applied, mtimes=True), snapshot(checked_out, mtimes=True))
    assert not problems, "\n".join(problems)
