"""Support for the store and maintenance tests: a store filled as a pull fills it (through
``ensure_blob``) from an OCI layout, blob digests and damage, and what of a store other users
could reach."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from bootstrap.image.model import INDEX_TYPES, MANIFEST_TYPES, REF_NAME_ANNOTATION, Descriptor
from bootstrap.image.store import Store

REF = "docker.io/library/busybox:latest"


def sha256(data: bytes) -> str:
    """The digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def streamer(data: bytes, chunk: int = 7) -> Callable[[Callable[[bytes], object]], None]:
    """A fetch function for :meth:`Store.ensure_blob` writing ``data`` in ``chunk``-byte pieces."""

    def fetch(write: Callable[[bytes], object]) -> None:
        for i in range(0, len(data), chunk):
            write(data[i : i + chunk])

    return fetch


def copy_layout_image(store: Store, layout: Path, tag: str, name: str) -> Descriptor:
    """Copy the image tagged ``tag`` in an OCI layout into the store through ensure_blob (what a
    pull does, minus the registry) and tag it ``name``."""
    index = json.loads((layout / "index.json").read_bytes())
    entry = next(
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag
    )
    top = Descriptor.from_json(entry)

    def copy(desc: Descriptor) -> None:
        path = layout / "blobs" / desc.digest.replace(":", "/")
        data = path.read_bytes()
        store.ensure_blob(desc, streamer(data, 65536))
        if desc.media_type in INDEX_TYPES:
            for child in json.loads(data)["manifests"]:
                copy(Descriptor.from_json(child))
        elif desc.media_type in MANIFEST_TYPES:
            doc = json.loads(data)
            copy(Descriptor.from_json(doc["config"]))
            for layer in doc["layers"]:
                copy(Descriptor.from_json(layer))

    with store.using():
        copy(top)
        store.tag(name, Descriptor(top.media_type, top.digest, top.size))
    return top


def flip_byte(path: Path, at: int = 100) -> None:
    """Damage ``path``: invert its byte at offset ``at``."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


#: Image content: the files of the layer cache and of composed image trees. Their modes are the
#: image's (a world-writable /tmp is what the container must get).
CONTENT = ("layers/*/*/rootfs", "trees/*/*")


def _is_content(rel: Path, content: tuple[str, ...]) -> bool:
    return any(
        rel.match(pattern) or any(p.match(pattern) for p in rel.parents) for pattern in content
    )


def _walk(root: Path) -> Iterator[Path]:
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def exposures(root: Path, content: tuple[str, ...] = CONTENT) -> list[str]:
    """What other users could read, write or enter in ``root``: the root itself must be 0700;
    below it, nothing but image ``content`` (glob patterns relative to ``root``) may be
    group/world-writable, and every directory is 0700."""
    found = []
    mode = stat.S_IMODE(root.stat().st_mode)
    if mode & 0o077:
        found.append(f"{root}: mode {mode:o}, not 0700")
    for path in _walk(root):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or path == root:
            continue
        rel = path.relative_to(root)
        if _is_content(rel, content):
            continue
        if st.st_mode & 0o022:
            found.append(f"{rel}: mode {stat.S_IMODE(st.st_mode):o}")
        if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o077:
            found.append(f"{rel}/: mode {stat.S_IMODE(st.st_mode):o}, not 0700")
    return found
