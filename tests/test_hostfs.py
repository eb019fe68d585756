"""Host files from an image's ``/exports/hostfs`` (bootstrap/deploy/hostfs.py) on a temporary
host root: install, conflicts, adoption, update (replace, remove, keep what the operator
changed), rollback, the restore after a failed or interrupted update, uninstall, hostile
sources, and symlinks on the host that must never be written through."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bootstrap.deploy import hostfs
from bootstrap.errors import BootstrapError, UsageError

NAME = "c1"

#: An image's hostfs: path -> bytes (a 0644 file), ("file", bytes, mode), ("link", target),
#: ("dir", mode)
Spec = Mapping[str, Any]

V1: Spec = {
    "etc/c1/c1.conf": b"version 1\n",
    "etc/c1/keep.conf": b"same in both\n",
    "opt/cni/bin/bridge": ("file", b"bridge v1", 0o755),
    "opt/cni/bin/old-only": ("file", b"gone in v2", 0o755),
    "opt/cni/bin/br": ("link", "bridge"),
}
V2: Spec = {
    "etc/c1/c1.conf": b"version 2\n",
    "etc/c1/keep.conf": b"same in both\n",
    "opt/cni/bin/bridge": ("file", b"bridge v2", 0o755),
    "opt/cni/bin/new-only": ("file", b"new in v2", 0o700),
    "opt/cni/bin/br": ("link", "new-only"),
}


def build(base: Path, spec: Spec) -> Path:
    """Write ``spec`` below ``base`` (parents 0755); returns ``base``."""
    base.mkdir(parents=True, exist_ok=True)
    for rel, what in sorted(spec.items()):
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, bytes):
            what = ("file", what, 0o644)
        if what[0] == "file":
            p.write_bytes(what[1])
            p.chmod(what[2])
        elif what[0] == "link":
            os.symlink(what[1], p)
        elif what[0] == "dir":
            p.mkdir(exist_ok=True)
            p.chmod(what[1])
        elif what[0] == "fifo":
            os.mkfifo(p)
        elif what[0] == "chr":
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        else:
            raise AssertionError(what)
    return base


def image(tmp: Path, name: str, spec: Spec) -> hostfs.Shipped:
    tree = tmp / "trees" / name
    build(tree / "exports" / "hostfs", spec)
    (tree / "bin").mkdir(exist_ok=True)  # the rest of the image is not looked at
    return hostfs.scan(tree, f"{name}:/exports/hostfs")


def snap(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything below ``root``: path -> (type, mode, content or target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif not stat.S_ISREG(st.st_mode):
                out[rel] = ("special", st.st_mode)
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def expected(spec: Spec) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for rel, what in spec.items():
        if isinstance(what, bytes):
            what = ("file", what, 0o644)
        out[rel] = (
            ("file", what[2], what[1])
            if what[0] == "file"
            else ("link", what[1])
            if what[0] == "link"
            else ("dir", what[1])
        )
    return out


class Host:
    """A host root and the slots of one container (records and marks live there)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "host"
        self.root.mkdir()
        (self.root / "etc").mkdir()  # a directory that is not ours
        self.slots = tmp / "slots"

    def slot(self, n: int) -> Path:
        p = self.slots / f"{NAME}.{n}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def move(
        self,
        owned: list[hostfs.Entry],
        to: hostfs.Shipped,
        slot: Path | None,
        *,
        strict: bool,
        known: set[str] | None = None,
    ) -> tuple[hostfs.Entry, ...]:
        t = hostfs.prepare(NAME, owned, to, strict=strict, known=known or set(), root=self.root)
        if slot is not None:
            t.begin(slot)
        return t.finish(slot)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    h = Host(tmp_path)
    monkeypatch.setenv("BOOTSTRAP_HOSTFS_ROOT", str(h.root))
    return h


def by_path(entries: tuple[hostfs.Entry, ...] | list[hostfs.Entry]) -> dict[str, hostfs.Entry]:
    return {e.path: e for e in entries}


# ---- install -----------------------------------------------------------------------------------


def test_root_from_environment(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hostfs.host_root() == host.root
    monkeypatch.delenv("BOOTSTRAP_HOSTFS_ROOT")
    assert hostfs.host_root() == Path("/")


def test_install_puts_files_records_them_and_only_directories_it_made(host: Host) -> None:
    v1 = image(host.tmp, "v1", V1)
    rec = host.move([], v1, host.slot(0), strict=True)
    got = snap(host.root)
    for rel, want in expected(V1).items():
        assert got[rel] == want, rel
    files = by_path(rec)
    assert set(files) == {
        "/etc/c1", "/etc/c1/c1.conf", "/etc/c1/keep.conf", "/opt", "/opt/cni", "/opt/cni/bin",
        "/opt/cni/bin/bridge", "/opt/cni/bin/old-only", "/opt/cni/bin/br",
    }  # fmt: skip
    assert "/etc" not in files  # existed before: not ours
    assert files["/opt/cni/bin/bridge"].sha256 and files["/opt/cni/bin/bridge"].mode == 0o755
    assert files["/opt/cni/bin/br"].target == "bridge"
    assert not any(e.adopted for e in rec)
    # the record in the slot says the same, the pending mark is gone
    assert hostfs.load(host.slot(0)) == rec
    assert not hostfs.pending(host.slot(0))
    doc = json.loads((host.slot(0) / hostfs.RECORD).read_text())
    assert doc["version"] == 1
    assert {"path": "/opt/cni", "type": "directory", "mode": "0755"} in doc["files"]
    assert {"path": "/opt/cni/bin/br", "type": "symlink", "target": "bridge", "adopted": False} in (
        doc["files"]
    )


def test_empty_or_missing_hostfs_changes_nothing(host: Host) -> None:
    tree = host.tmp / "trees" / "plain"
    (tree / "bin").mkdir(parents=True)
    assert hostfs.scan(tree, "plain") == hostfs.NOTHING
    before = snap(host.root)
    assert host.move([], hostfs.NOTHING, host.slot(0), strict=True) == ()
    assert snap(host.root) == before
    assert not (host.slot(0) / hostfs.RECORD).exists()
    assert not hostfs.pending(host.slot(0))


CONFLICTS: dict[str, tuple[Spec, str]] = {
    "other content": ({"etc/c1/c1.conf": b"operator's\n"}, r"/etc/c1/c1.conf exists \(file\)"),
    "other mode": (
        {"opt/cni/bin/bridge": ("file", b"bridge v1", 0o700)},
        r"/opt/cni/bin/bridge exists \(file\) and was not installed by c1",
    ),
    "a directory where a file goes": (
        {"etc/c1/c1.conf/x": b""},
        r"/etc/c1/c1.conf exists \(directory\)",
    ),
    "a file where a directory goes": ({"opt/cni": b"x"}, r"/opt/cni exists \(file\)"),
    "a symlink where a file goes": (
        {"etc/c1/c1.conf": ("link", "/etc/passwd")},
        r"/etc/c1/c1.conf exists \(symlink\)",
    ),
    "a symlink where a directory goes": (
        {"opt": ("link", "/tmp")},
        r"cannot install directory .*/opt: it is a symlink on the host",
    ),
    "another symlink target": ({"opt/cni/bin/br": ("link", "x")}, r"/opt/cni/bin/br exists"),
    "a fifo": ({"etc/c1/keep.conf": ("fifo",)}, r"/etc/c1/keep.conf exists \(special file\)"),
}


@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_install_conflict_refused_before_anything_is_written(host: Host, case: str) -> None:
    present, message = CONFLICTS[case]
    build(host.root, present)
    v1 = image(host.tmp, "v1", V1)
    before = snap(host.root)
    with pytest.raises(UsageError, match=message) as err:
        hostfs.prepare(NAME, [], v1, strict=True)
    assert err.value.exit_code == 2
    assert "remove" in err.value.hint or "symlink" in err.value.hint
    assert snap(host.root) == before
    # several conflicts: the first is named, the others counted
    if case == "other content":
        build(host.root, {"etc/c1/keep.conf": b"mine too\n"})
        with pytest.raises(UsageError, match=r"c1.conf exists .*\(and 1 more\)"):
            hostfs.prepare(NAME, [], v1, strict=True)


def test_install_adopts_identical_files_and_leaves_them_at_uninstall(host: Host) -> None:
    build(host.root, {"etc/c1/keep.conf": b"same in both\n", "opt/cni/bin/br": ("link", "bridge")})
    inode = (host.root / "etc/c1/keep.conf").stat().st_ino
    v1 = image(host.tmp, "v1", V1)
    rec = by_path(host.move([], v1, host.slot(0), strict=True))
    assert rec["/etc/c1/keep.conf"].adopted and rec["/opt/cni/bin/br"].adopted
    assert not rec["/etc/c1/c1.conf"].adopted
    assert "/etc/c1" not in rec  # existed
    assert (host.root / "etc/c1/keep.conf").stat().st_ino == inode  # not rewritten
    host.move(list(rec.values()), hostfs.NOTHING, None, strict=False)
    assert snap(host.root) == {
        "etc": ("dir", 0o755),
        "etc/c1": ("dir", 0o755),
        "etc/c1/keep.conf": ("file", 0o644, b"same in both\n"),
        "opt": ("dir", 0o755),
        "opt/cni": ("dir", 0o755),
        "opt/cni/bin": ("dir", 0o755),
        "opt/cni/bin/br": ("link", "bridge"),
    }


def test_adopted_file_with_other_content_shipped(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """An adopted file is not ours to write: a version shipping other content for it is a
    conflict, unless the running deployment ships that path too (then it is kept, with a
    warning, as a file the operator took over)."""
    build(host.root, {"etc/c1/c1.conf": b"version 1\n"})
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec = host.move([], v1, host.slot(0), strict=True)
    assert by_path(rec)["/etc/c1/c1.conf"].adopted
    with pytest.raises(UsageError, match=r"/etc/c1/c1.conf exists \(file\) and was not installed"):
        hostfs.prepare(NAME, list(rec), v2, strict=True)
    known = {e.path for e in v1.entries}
    with caplog.at_level(logging.WARNING):
        t = hostfs.prepare(NAME, list(rec), v2, strict=True, known=known)
        rec2 = by_path(t.finish(host.slot(1)))
    assert (host.root / "etc/c1/c1.conf").read_bytes() == b"version 1\n"
    assert "/etc/c1/c1.conf" not in rec2
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        f"{host.root}/etc/c1/c1.conf exists (file) and was not installed by c1; kept, not replaced"
    ]


def test_update_keeps_a_file_taken_over_earlier(host: Host) -> None:
    """A file the operator changed stays theirs: later versions shipping it keep it too."""
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec1 = host.move([], v1, host.slot(0), strict=True)
    (host.root / "etc/c1/keep.conf").write_bytes(b"tuned\n")
    rec2 = host.move(list(rec1), v2, host.slot(1), strict=True)
    v3 = image(host.tmp, "v3", {**V2, "etc/c1/keep.conf": b"v3 default\n"})
    known = {e.path for e in v2.entries}
    host.move(list(rec2), v3, host.slot(0), strict=True, known=known)
    assert (host.root / "etc/c1/keep.conf").read_bytes() == b"tuned\n"


# ---- update, rollback, restore ------------------------------------------------------------------


def test_update_replaces_removes_and_keeps_what_the_operator_changed(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec1 = host.move([], v1, host.slot(0), strict=True)
    # the operator edits one of our files, and puts a file of their own into our directory
    (host.root / "etc/c1/keep.conf").write_bytes(b"tuned by hand\n")
    build(host.root, {"opt/cni/bin/operators": b"mine"})
    inode = (host.root / "opt/cni/bin/bridge").stat().st_ino
    with caplog.at_level(logging.WARNING):
        rec2 = by_path(host.move(list(rec1), v2, host.slot(1), strict=True))
    got = snap(host.root)
    assert got["etc/c1/c1.conf"] == ("file", 0o644, b"version 2\n")
    assert got["opt/cni/bin/bridge"] == ("file", 0o755, b"bridge v2")
    assert (host.root / "opt/cni/bin/bridge").stat().st_ino != inode  # a new file renamed in
    assert got["opt/cni/bin/new-only"] == ("file", 0o700, b"new in v2")
    assert got["opt/cni/bin/br"] == ("link", "new-only")
    assert "opt/cni/bin/old-only" not in got  # no longer shipped: removed
    assert got["etc/c1/keep.conf"] == ("file", 0o644, b"tuned by hand\n")  # kept
    assert got["opt/cni/bin/operators"] == ("file", 0o644, b"mine")
    assert "/etc/c1/keep.conf" not in rec2  # no longer ours
    assert "/opt/cni/bin/old-only" not in rec2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"c1: kept {host.root}/etc/c1/keep.conf: changed since c1")
    assert "\n" not in warnings[0]


def test_rollback_brings_back_the_other_deployments_files(host: Host) -> None:
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec1 = host.move([], v1, host.slot(0), strict=True)
    rec2 = host.move(list(rec1), v2, host.slot(1), strict=True)
    rec1b = host.move(list(rec2), v1, host.slot(0), strict=False)
    assert snap(host.root) == {**snap_of(host, V1)}
    assert rec1b == rec1
    # and forth again
    host.move(list(rec1b), v2, host.slot(1), strict=False)
    assert snap(host.root) == snap_of(host, V2)


def snap_of(host: Host, spec: Spec) -> dict[str, tuple[Any, ...]]:
    """What the host holds with only ``spec`` installed on a fresh host root."""
    fresh = host.tmp / f"fresh-{len(list(host.tmp.iterdir()))}"
    (fresh / "etc").mkdir(parents=True)
    build(fresh, spec)
    return snap(fresh)


def test_rollback_keeps_foreign_files_with_a_warning(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec1 = host.move([], v1, host.slot(0), strict=True)
    rec2 = host.move(list(rec1), v2, host.slot(1), strict=True)
    build(host.root, {"opt/cni/bin/old-only": b"the operator's now"})
    with caplog.at_level(logging.WARNING):
        rec = by_path(host.move(list(rec2), v1, host.slot(0), strict=False))
    assert (host.root / "opt/cni/bin/old-only").read_bytes() == b"the operator's now"
    assert "/opt/cni/bin/old-only" not in rec
    assert any("old-only exists (file) and was not installed by c1; kept" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert (host.root / "etc/c1/c1.conf").read_bytes() == b"version 1\n"


@pytest.mark.parametrize("where", ["before", "midway", "after"])
def test_failed_or_interrupted_update_is_undone_from_the_records(host: Host, where: str) -> None:
    """An update from v1 (slot 0) to v2 (the staged slot) that failed, or was killed before,
    during or after changing the host files: taking every state either slot records or marks
    as ours and going to v1 restores v1's files exactly."""
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    old, staged = host.slot(0), host.slots / f"{NAME}.new"
    staged.mkdir()
    rec1 = host.move([], v1, old, strict=True)
    t = hostfs.prepare(NAME, list(rec1), v2, strict=True)
    t.begin(staged)
    if where == "midway":  # killed after some of the operations
        t.ops = t.ops[: len(t.ops) // 2]
        t.apply()
    elif where == "after":
        t.finish(staged)
    assert hostfs.pending(staged) == (where != "after")
    owned = hostfs.claims(old) + hostfs.claims(staged)
    back = hostfs.prepare(NAME, owned, v1, strict=False)
    back.begin(old)
    assert back.finish(old) == rec1
    assert snap(host.root) == snap_of(host, V1)
    assert not hostfs.pending(old)


def test_uninstall_removes_only_ours(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    v1 = image(host.tmp, "v1", V1)
    # with nothing changed by hand, nothing is left behind
    rec = host.move([], v1, host.slot(0), strict=True)
    host.move(list(rec), hostfs.NOTHING, None, strict=False)
    assert snap(host.root) == {"etc": ("dir", 0o755)}
    # the operator's changes stay
    rec = host.move([], v1, host.slot(0), strict=True)
    (host.root / "opt/cni/bin/bridge").chmod(0o700)  # the operator's change: kept
    build(host.root, {"etc/c1/extra": b"operator's"})  # keeps /etc/c1 (ours) alive
    with caplog.at_level(logging.WARNING):
        assert host.move(list(rec), hostfs.NOTHING, None, strict=False) == ()
    assert snap(host.root) == {
        "etc": ("dir", 0o755),
        "etc/c1": ("dir", 0o755),
        "etc/c1/extra": ("file", 0o644, b"operator's"),
        "opt": ("dir", 0o755),
        "opt/cni": ("dir", 0o755),
        "opt/cni/bin": ("dir", 0o755),
        "opt/cni/bin/bridge": ("file", 0o700, b"bridge v1"),
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"c1: kept {host.root}/opt/cni/bin/bridge: changed since c1 installed it (not removed; "
        "no longer managed by bootstrap)"
    ]


def test_type_changes_between_versions(host: Host) -> None:
    a = image(host.tmp, "a", {"etc/x": b"file", "etc/d/f": b"in dir", "etc/l": ("link", "x")})
    b = image(host.tmp, "b", {"etc/x/inner": b"now a dir", "etc/d": b"now a file", "etc/l": b"f"})
    rec_a = host.move([], a, host.slot(0), strict=True)
    rec_b = host.move(list(rec_a), b, host.slot(1), strict=True)
    assert snap(host.root) == snap_of(host, {"etc/x/inner": b"now a dir", "etc/d": b"now a file",
                                             "etc/l": b"f"})  # fmt: skip
    host.move(list(rec_b), a, host.slot(0), strict=False)
    assert snap(host.root) == snap_of(host, {"etc/x": b"file", "etc/d/f": b"in dir",
                                             "etc/l": ("link", "x")})  # fmt: skip


def test_deleted_files_come_back_at_update(host: Host) -> None:
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec1 = host.move([], v1, host.slot(0), strict=True)
    (host.root / "etc/c1/keep.conf").unlink()
    host.move(list(rec1), v2, host.slot(1), strict=True)
    assert snap(host.root) == snap_of(host, V2)


def test_changed_between_plan_and_apply_is_kept(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2 = image(host.tmp, "v1", V1), image(host.tmp, "v2", V2)
    rec1 = host.move([], v1, host.slot(0), strict=True)
    t = hostfs.prepare(NAME, list(rec1), v2, strict=True)
    (host.root / "etc/c1/c1.conf").write_bytes(b"edited meanwhile\n")  # after the plan
    (host.root / "opt/cni/bin/old-only").write_bytes(b"edited too")
    build(host.root, {"opt/cni/bin/new-only": b"appeared"})
    with caplog.at_level(logging.WARNING):
        rec = by_path(t.finish(host.slot(1)))
    assert (host.root / "etc/c1/c1.conf").read_bytes() == b"edited meanwhile\n"
    assert (host.root / "opt/cni/bin/old-only").read_bytes() == b"edited too"
    assert (host.root / "opt/cni/bin/new-only").read_bytes() == b"appeared"
    for path in ("/etc/c1/c1.conf", "/opt/cni/bin/new-only"):
        assert path not in rec
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 3


# ---- symlinks on the host ------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
def test_symlinked_host_directory_is_never_written_through(
    host: Host, tmp_path: Path, strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, host.root / "opt")  # absolute: leaves the root
    os.symlink("../outside2", host.root / "etc/c1")  # relative: leaves it too
    (tmp_path / "outside2").mkdir()
    v1 = image(host.tmp, "v1", V1)
    if strict:
        with pytest.raises(UsageError, match=r"it is a symlink on the host") as err:
            hostfs.prepare(NAME, [], v1, strict=True)
        assert "(and " in err.value.message
    else:
        with caplog.at_level(logging.WARNING):
            rec = host.move([], v1, host.slot(0), strict=False)
        assert rec == ()
        assert sum("it is a symlink on the host" in r.getMessage() for r in caplog.records) == 2
    assert list(outside.iterdir()) == [] and list((tmp_path / "outside2").iterdir()) == []


def test_a_symlink_swapped_in_after_the_plan_is_not_followed(host: Host, tmp_path: Path) -> None:
    v1 = image(host.tmp, "v1", {"etc/c1/new.conf": b"x"})
    (host.root / "etc/c1").mkdir()
    t = hostfs.prepare(NAME, [], v1, strict=True)
    (host.root / "etc/c1").rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, host.root / "etc/c1")
    with pytest.raises(BootstrapError, match="parent changed while installing"):
        t.apply()
    assert list(outside.iterdir()) == []


def test_our_symlink_is_replaced_not_followed(host: Host, tmp_path: Path) -> None:
    """A symlink we installed that points outside is replaced by the file shipped next, and
    removed (not its target) when no longer shipped."""
    target = tmp_path / "target"
    target.write_bytes(b"do not touch")
    a = image(host.tmp, "a", {"etc/l": ("link", str(target)), "etc/m": ("link", str(target))})
    b = image(host.tmp, "b", {"etc/l": b"a file now"})
    rec = host.move([], a, host.slot(0), strict=True)
    host.move(list(rec), b, host.slot(1), strict=True)
    assert (host.root / "etc/l").read_bytes() == b"a file now"
    assert not os.path.lexists(host.root / "etc/m")
    assert target.read_bytes() == b"do not touch"


# ---- what an image may ship ----------------------------------------------------------------------

HOSTILE: dict[str, tuple[Spec, str]] = {
    "fifo": ({"etc/pipe": ("fifo",)}, r"v1:/exports/hostfs/etc/pipe: a FIFO"),
    "device": ({"dev/null": ("chr",)}, r"/dev/null: a character device"),
    "control char": ({"etc/a\nb": b"x"}, r"a name holds a control character"),
    "link control char": ({"etc/l": ("link", "a\rb")}, r"symlink target"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sources_refused(host: Host, case: str) -> None:
    spec, message = HOSTILE[case]
    with pytest.raises(UsageError, match=message) as err:
        image(host.tmp, "v1", spec)
    assert "regular files, symlinks and directories" in err.value.hint or "printable" in (
        err.value.hint
    )
    assert "\n" not in err.value.message


def test_hostfs_that_is_a_symlink_is_refused(host: Host, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "exports").mkdir(parents=True)
    os.symlink("/etc", tree / "exports" / "hostfs")
    with pytest.raises(UsageError, match="a symlink, not a directory"):
        hostfs.scan(tree, "img:/exports/hostfs")
    # an exports that is a symlink is no exports at all (as for the definition files)
    tree2 = tmp_path / "tree2"
    tree2.mkdir()
    os.symlink(tree / "exports", tree2 / "exports")
    assert hostfs.scan(tree2, "img") == hostfs.NOTHING
    with pytest.raises(BootstrapError, match=r"image tree .* is missing"):
        hostfs.scan(tmp_path / "nope", "img")


def test_hardlinks_are_installed_as_copies(host: Host) -> None:
    v1 = image(host.tmp, "v1", {"etc/a": b"shared"})
    assert v1.source is not None
    os.link(v1.source / "etc/a", v1.source / "etc/b")
    v1 = hostfs.scan(v1.source.parent.parent, "v1")
    host.move([], v1, host.slot(0), strict=True)
    a, b = host.root / "etc/a", host.root / "etc/b"
    assert a.read_bytes() == b.read_bytes() == b"shared"
    assert a.stat().st_ino != b.stat().st_ino
    assert a.stat().st_ino != (v1.source / "etc/a").stat().st_ino


# ---- records -------------------------------------------------------------------------------------


def _record(*files: object) -> str:
    return json.dumps({"version": 1, "files": list(files)})


BAD_RECORDS = {
    "not json": "{",
    "other version": '{"version": 2, "files": []}',
    "relative path": _record({"path": "etc/x", "type": "directory", "mode": "0755"}),
    "dotdot": _record({"path": "/etc/../x", "type": "directory", "mode": "0755"}),
    "bad type": _record({"path": "/etc/x", "type": "fifo"}),
    "bad sha": _record({"path": "/x", "type": "file", "mode": "0644", "sha256": "zz"}),
    "newline": _record({"path": "/a\nb", "type": "symlink", "target": "t"}),
    "bad mode": _record({"path": "/x", "type": "directory", "mode": "rwx"}),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_damaged_record_is_an_error(host: Host, case: str) -> None:
    (host.slot(0) / hostfs.RECORD).write_text(BAD_RECORDS[case])
    with pytest.raises(BootstrapError, match="cannot read the host-file record"):
        hostfs.load(host.slot(0))


def test_record_round_trip(host: Host) -> None:
    rec = host.move([], image(host.tmp, "v1", V1), host.slot(0), strict=True)
    assert tuple(hostfs.Entry.from_json(e.to_json()) for e in rec) == rec
    assert hostfs.claims(host.tmp / "no-such-slot") == []
