"""A container's deployment slots on disk: the NAME.0/NAME.1/NAME.new mechanics (flip, promote,
remove), the host files that follow the symlink, and the repair of what a killed command left.

The ``NAME`` symlink names the live slot (:func:`flip` moves it atomically). An update stages
``NAME.new``, marks it with the slot it replaces (:data:`PREVIOUS`), makes it live, and once it
proved itself :func:`promote` renames it over the older slot (which goes through ``NAME.old``).
Host files (the image's ``/exports/hostfs``, see :mod:`bootstrap.deploy.hostfs`) change with the
symlink (:func:`settle_host_files`): the transition into a slot is marked in that slot
(``hostfs.pending``) *before* the symlink is flipped to it, carried out, then recorded
(``hostfs.json``). So whenever a command is killed, the slot the symlink points to either has no
mark (the host holds its files) or has one, or the symlink is being moved back by
:func:`recover`, which then makes the host files those of the slot the symlink points to,
taking as ours every state any slot's record or mark names.

Nothing here talks to systemd: what a unit must do when the symlink moved is the caller's
(:func:`recover` takes it as a callback). The caller holds the container's lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from bootstrap.deploy import definition as defn
from bootstrap.deploy import hostfs
from bootstrap.deploy.definition import Definition
from bootstrap.deploy.records import DEFINITION_COPY, INFO, Deployment, Paths
from bootstrap.errors import BootstrapError, SystemdError, UsageError
from bootstrap.fsutil import fsync_dir, remove_tree, write_atomic
from bootstrap.process import run

log = logging.getLogger(__name__)

#: Marker in a staged deployment while an update proves it: the name of the slot that was live
#: before (so an interrupted update can go back to it). Removed once the update is final.
PREVIOUS = ".previous"


# ---- the symlink and the slots -----------------------------------------------------------------


def flip(paths: Paths, target: Path) -> None:
    """Point ``paths.link`` at ``target`` atomically (new symlink + rename over the old)."""
    tmp = paths.root / f".{paths.name}.link.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, paths.link)
    fsync_dir(paths.root)


def all_slots(paths: Paths) -> tuple[Path, ...]:
    """Every deployment directory a container may have: both slots and the staged one."""
    return (paths.slot(0), paths.slot(1), paths.staged)


def require_active(paths: Paths) -> Path:
    """The live slot; :class:`UsageError` when the container is not installed."""
    active = paths.active()
    if active is None:
        raise UsageError(f"{paths.name} is not installed", f"bootstrap install {paths.name} REF")
    return active


def mark_previous(paths: Paths, previous: Path) -> None:
    """Record in ``paths.staged`` that ``previous`` is the slot it replaces (:data:`PREVIOUS`)."""
    write_atomic(paths.staged / PREVIOUS, previous.name)


def promote(paths: Paths, previous: str) -> Path:
    """Make the proven ``paths.staged`` the slot that is not ``previous`` (the slot it
    replaced stays as the rollback target; the older one is removed) and point the symlink
    at it; returns that slot. Finishes a promotion that was cut short: when the staged
    deployment was renamed already, only the symlink and the leftovers are seen to."""
    older = paths.other(paths.root / previous)
    if paths.staged.is_dir():
        if os.path.lexists(older):
            remove(paths.trash)  # a leftover of an earlier promotion
            os.rename(older, paths.trash)
        os.rename(paths.staged, older)
    flip(paths, older)
    (older / PREVIOUS).unlink(missing_ok=True)
    remove(paths.trash)
    return older


def remove(path: Path) -> None:
    """Remove a deployment directory, unmounting its rootfs first if it is mounted."""
    if os.path.lexists(path):
        unmount_below(path)
    remove_tree(path)


def unmount_below(path: Path) -> None:
    """Unmount every mount at or below ``path`` (deepest first), e.g. a slot's overlay rootfs
    left mounted by a stop that never ran. Raises SystemdError when one cannot be unmounted."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as fh:
            points = [
                line.split()[4].encode().decode("unicode_escape") for line in fh if line.strip()
            ]
    except OSError:
        return
    inside = [p for p in points if p == real or p.startswith(real + "/")]
    for point in sorted(set(inside), key=len, reverse=True):
        run(["umount", point], error=SystemdError, hint=f"something still uses {point}", timeout=60)


# ---- what a slot holds -------------------------------------------------------------------------


def image_tree(slot: Path) -> Path:
    """The directory holding deployment ``slot``'s image files as they are seen: the ``lower``
    link of an overlay deployment, else its ``rootfs/`` checkout."""
    return slot / "lower" if (slot / "lower").is_symlink() else slot / "rootfs"


def shipped(slot: Path) -> hostfs.Shipped:
    """The host files deployment ``slot`` ships: its image tree's ``exports/hostfs``."""
    try:
        image = Deployment.load(slot).image
    except BootstrapError:
        image = slot.name
    return hostfs.scan(image_tree(slot), f"{image}:/exports/hostfs")


def kept_definition(slot: Path, deployment: Deployment) -> Definition | None:
    """The copy of a ``--definition`` directory ``deployment`` (in ``slot``) was rendered from;
    None when it came from its image's ``/exports`` or is the built-in (an update decides
    those again from its new image)."""
    if deployment.definition_source != "directory":
        return None
    return defn.load(slot / DEFINITION_COPY, where=deployment.definition_origin)


def definition_of(slot: Path) -> Definition:
    """The definition deployment ``slot`` was rendered from: its copy of a definition
    directory, the image's ``/exports``, or the built-in."""
    dep = Deployment.load(slot)
    kept = kept_definition(slot, dep)
    if kept is not None:
        return kept
    if dep.definition_source == "image":
        exports = image_tree(slot) / "exports"
        return defn.load(exports, source="image", where=f"{dep.image}:/exports")
    return defn.builtin()


# ---- host files that follow the symlink --------------------------------------------------------


def settle_host_files(
    paths: Paths,
    live: Path,
    *,
    flip_link: bool = False,
    owned_by: tuple[Path | None, ...] | None = None,
) -> None:
    """Make the host files those ``live`` ships, taking as ours every state that the slots
    ``owned_by`` (default: all of the container's) record or mark (:func:`hostfs.claims`);
    host files that are not ours are kept (a warning each). With ``flip_link``, ``live`` is
    marked, then the symlink flipped to it, then the files changed. A failure is logged,
    not raised (the symlink is still flipped; the mark stays, so the next command tries
    again)."""
    transition = None
    try:
        slots = all_slots(paths) if owned_by is None else owned_by
        owned = [e for slot in slots if slot is not None for e in hostfs.claims(slot)]
        transition = hostfs.prepare(paths.name, owned, shipped(live), strict=False)
        transition.begin(live)
    except BootstrapError as err:
        log.error("%s: cannot restore the host files of %s: %s", paths.name, live, err)
    if flip_link:
        flip(paths, live)
    if transition is None:
        return
    try:
        transition.finish(live)
    except BootstrapError as err:
        log.error("%s: cannot restore the host files of %s: %s", paths.name, live, err)
        return
    for slot in all_slots(paths):
        if slot != live:
            hostfs.clear_pending(slot)


# ---- crash repair ------------------------------------------------------------------------------


def recover(paths: Paths, *, went_back: Callable[[Path], None]) -> None:
    """Repair what an update killed midway left (see :data:`PREVIOUS`): a symlink on an
    unproven staged deployment goes back to the slot recorded in it; a symlink dangling
    because the proven staged deployment was already renamed into its slot follows it; the
    host files follow the symlink (:func:`settle_host_files`), then ``went_back(slot)`` is
    called for the unit to follow it too. A host-file transition left unfinished
    (``hostfs.pending`` in a slot) is finished for the slot the symlink points to. Stale
    staged/trash directories and markers are removed last (after ``went_back``, which may
    restart a unit that still runs from one)."""
    back = _interrupted(paths)
    if back is not None:
        log.warning("%s: an update was interrupted; making %s live", paths.name, back)
        settle_host_files(paths, back, flip_link=True)
        went_back(back)
    live = paths.active()
    if live is not None and any(hostfs.pending(s) for s in all_slots(paths)):
        log.warning("%s: a change of its host files was interrupted; finishing it", paths.name)
        settle_host_files(paths, live)
    for slot in (paths.slot(0), paths.slot(1)):
        (slot / PREVIOUS).unlink(missing_ok=True)
    for stale in (paths.staged, paths.trash):
        if os.path.lexists(stale) and paths.active() != stale:
            log.info("removing stale %s", stale)
            remove(stale)


def _interrupted(paths: Paths) -> Path | None:
    """The slot the symlink must go back to after an interrupted update, or None when it
    points at a slot of its own."""
    if not paths.link.is_symlink():
        return None
    target = os.readlink(paths.link)
    slots = [p for p in (paths.slot(0), paths.slot(1)) if (p / INFO).exists()]
    if target == paths.staged.name and paths.staged.is_dir():
        recorded = _read_marker(paths.staged)
        back = paths.root / recorded if recorded else None
        if back is None or not (back / INFO).exists():
            back = _newest(slots)
        return back
    if not paths.link.exists():
        marked = [p for p in slots if (p / PREVIOUS).exists()]
        return marked[0] if marked else _newest(slots)
    return None


def _newest(slots: list[Path]) -> Path | None:
    return max(slots, key=lambda p: Deployment.load(p).installed) if slots else None


def _read_marker(staged: Path) -> str | None:
    try:
        name = (staged / PREVIOUS).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return name if name and "/" not in name else None
