"""The store is root's alone whatever the umask: created under ``umask 000`` (by the command and
by the library without it), nothing in it is reachable, readable or writable by other users
except through its 0700 root; only image content (the layer cache's and image trees' files,
with the modes the image gives them: ``/tmp`` 1777) may be world-writable, and it sits below
private directories. Stores an older version left open are closed on their next write; a
directory made by hand keeps its mode, with a warning when others can write to it."""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.image.store import Store
from tests.harness.cli import BOOTSTRAP, bootstrap

#: Image content: the files of the layer cache and of composed image trees. Their modes are the
#: image's (a world-writable /tmp is what the container must get).
CONTENT = ("layers/*/*/rootfs", "trees/*/*")


def _rootfs_tar(tmp_path: Path) -> Path:
    """A rootfs tar with a 1777 /tmp and a 0666 file: content the store must keep as it is."""
    tree = tmp_path / "tree"
    (tree / "tmp").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("hello\n")
    os.chmod(tree / "tmp", 0o1777)
    os.chmod(tree / "etc" / "motd", 0o666)
    tar = tmp_path / "rootfs.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tree, arcname=".")
    return tar


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


def _umask_000() -> None:
    os.umask(0)


def test_store_made_by_the_command_under_umask_000_is_private(tmp_path: Path) -> None:
    store = tmp_path / "store"
    tar = _rootfs_tar(tmp_path)
    for argv in (
        ["import", "--name", "a/b:1", tar],
        ["checkout", "a/b:1", tmp_path / "co"],
        ["fsck", "--repair"],
        ["gc"],
        ["rmi", "a/b:1"],
        ["import", "--name", "a/b:2", tar],
    ):
        proc = subprocess.run(
            [str(BOOTSTRAP), "--store", str(store), *map(str, argv)],
            capture_output=True,
            text=True,
            preexec_fn=_umask_000,
            timeout=300,
        )
        assert proc.returncode == 0, (argv, proc.stderr)
    assert exposures(store) == []
    # the image's own modes are kept where the image puts them
    layer = next(store.glob("layers/sha256/*/rootfs"))
    assert stat.S_IMODE((layer / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "co" / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((tmp_path / "co" / "etc" / "motd").stat().st_mode) == 0o666
    # a checkout's own top directory is not opened to others by the umask either
    assert stat.S_IMODE((tmp_path / "co").stat().st_mode) & 0o022 == 0


def test_store_made_through_the_library_under_umask_000_is_private(tmp_path: Path) -> None:
    """Without the command's umask: the store sets its modes itself (library callers, the
    deployer inside ``up``)."""
    from bootstrap.image import api
    from bootstrap.settings import Settings

    settings = Settings(store=tmp_path / "deep" / "store", state=tmp_path / "state")
    tar = _rootfs_tar(tmp_path)
    old = os.umask(0)
    try:
        api.import_archive(settings, str(tar), name="a/b:1")
        api.checkout(settings, "a/b:1", str(tmp_path / "co"), hardlink=False, devices=False)
        store = Store(settings.store)
        image = store.image("docker.io/a/b:1")
        from bootstrap.image.compose import image_tree

        with store.using():
            image_tree(store, image)
        api.fsck(settings, repair=True)
        api.gc(settings)
    finally:
        os.umask(old)
    assert exposures(settings.store) == []
    # missing parents of the store are made private too
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700


def test_a_store_left_open_by_an_older_version_is_closed_on_its_next_write(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    tar = _rootfs_tar(tmp_path)
    bootstrap("import", "--name", "a/b:1", tar, store=store, check=True)
    for path in [store, *(p for p in store.iterdir() if p.is_dir())]:
        os.chmod(path, 0o777)  # what the older version made under umask 000
    assert exposures(store)
    bootstrap("import", "--name", "a/b:2", tar, store=store, check=True)
    assert exposures(store) == []


def test_a_directory_made_by_hand_keeps_its_mode_with_a_warning(tmp_path: Path) -> None:
    tar = _rootfs_tar(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    ran = bootstrap("import", "--name", "a/b:1", tar, store=shared, check=True)
    assert f"warning: the store {shared} is writable by other users (mode 777)" in ran.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # not ours to change
    assert [line for line in exposures(shared) if not line.startswith(str(shared))] == []
    # a private directory made by hand: nothing said
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    ran = bootstrap("import", "--name", "a/b:1", tar, store=private, check=True)
    assert "warning" not in ran.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user's view")
def test_another_user_sees_nothing_of_the_store(tmp_path: Path) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="bootstrap-privacy-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)  # reachable by anyone up to the store (pytest's dirs are not)
        store = base / "store"
        tar = _rootfs_tar(tmp_path)
        for argv in (["import", "--name", "a/b:1", tar], ["checkout", "a/b:1", base / "co"]):
            proc = subprocess.run(
                [str(BOOTSTRAP), "--store", str(store), *map(str, argv)],
                capture_output=True,
                text=True,
                preexec_fn=_umask_000,
            )
            assert proc.returncode == 0, proc.stderr
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        assert subprocess.run([*nobody, "ls", str(base)], capture_output=True).returncode == 0
        layer = next(store.glob("layers/sha256/*/rootfs"))
        for argv in (
            ["ls", store],
            ["cat", next(store.glob("oci/blobs/sha256/*"))],
            ["touch", store / "x"],
            ["touch", layer / "tmp" / "planted"],  # the cache's world-writable /tmp: unreachable
        ):
            out = subprocess.run([*nobody, *map(str, argv)], capture_output=True, text=True)
            assert out.returncode != 0 and "Permission denied" in out.stderr, (argv, out)
        assert not (layer / "tmp" / "planted").exists()
    finally:
        shutil.rmtree(base)
