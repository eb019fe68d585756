"""Compare two root filesystems: paths, types, modes, owners, link targets, hardlink groups
(inodes shared within the tree), contents, device numbers, xattrs, optionally mtimes.

``snapshot(root)`` walks a tree without following symlinks and returns ``{relpath: Node}``;
``diff(a, b)`` returns human-readable lines, empty when the trees are equal;
``assert_same_tree(a, b)`` asserts with those lines.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    target: str = ""
    sha256: str = ""
    rdev: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()
    mtime: int | None = None
    group: tuple[str, ...] = field(default=())  # other paths sharing the inode, sorted


def _xattrs(path: str) -> tuple[tuple[str, str], ...]:
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for k in sorted(keys):
        if k == "security.selinux":
            continue
        out.append((k, os.getxattr(path, k, follow_symlinks=False).hex()))
    return tuple(out)


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path, *, mtimes: bool = False, include_root: bool = True) -> dict[str, Node]:
    """Describe every entry under ``root`` (relative paths; the root itself is ``"."``).
    ``mtimes``: also record mtimes of non-directories (directory mtimes depend on extraction
    order in ways that tools legitimately differ on)."""
    raw: dict[str, tuple[os.stat_result, str]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def visit(full: str, rel: str) -> None:
        st = os.lstat(full)
        raw[rel] = (st, full)
        if not stat.S_ISDIR(st.st_mode):
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            return
        for name in sorted(os.listdir(full)):
            visit(os.path.join(full, name), name if rel == "." else f"{rel}/{name}")

    visit(str(root), ".")
    out: dict[str, Node] = {}
    for rel, (st, full) in raw.items():
        if rel == "." and not include_root:
            continue
        kind = _TYPES.get(stat.S_IFMT(st.st_mode), "?")
        group: tuple[str, ...] = ()
        if kind != "dir":
            peers = inodes[(st.st_dev, st.st_ino)]
            if len(peers) > 1:
                group = tuple(sorted(p for p in peers if p != rel))
        out[rel] = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode) if kind != "symlink" else 0,
            uid=st.st_uid,
            gid=st.st_gid,
            target=os.readlink(full) if kind == "symlink" else "",
            sha256=_sha(full) if kind == "file" else "",
            rdev=st.st_rdev if kind in ("chr", "blk") else 0,
            xattrs=_xattrs(full),
            mtime=st.st_mtime_ns if mtimes and kind != "dir" else None,
            group=group,
        )
    return out


def diff(a: dict[str, Node], b: dict[str, Node], limit: int = 40) -> list[str]:
    """Lines describing how ``b`` differs from ``a`` (at most ``limit``)."""
    lines: list[str] = []
    for rel in sorted(a.keys() | b.keys()):
        if rel not in b:
            lines.append(f"only in first: {rel} ({a[rel].kind})")
        elif rel not in a:
            lines.append(f"only in second: {rel} ({b[rel].kind})")
        elif a[rel] != b[rel]:
            na, nb = a[rel], b[rel]
            fields = [
                f"{f}: {getattr(na, f)!r} != {getattr(nb, f)!r}"
                for f in na.__dataclass_fields__
                if getattr(na, f) != getattr(nb, f)
            ]
            lines.append(f"differs: {rel}: " + "; ".join(fields))
        if len(lines) >= limit:
            lines.append("...")
            break
    return lines


def assert_same_tree(first: Path, second: Path, *, mtimes: bool = False) -> None:
    """Assert the trees under ``first`` and ``second`` are equal (see :func:`diff`)."""
    problems = diff(snapshot(first, mtimes=mtimes), snapshot(second, mtimes=mtimes))
    assert not problems, "trees differ:\n" + "\n".join(problems)
