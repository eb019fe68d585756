"""systemd unit text: quoting per systemd.syntax(7)/systemd.service(5) and the generated unit.

Command lines are built from argv lists by :func:`exec_command`, which quotes each word so that
systemd reads back exactly that argv: ``%`` becomes ``%%`` (specifiers), ``$`` becomes ``$$``
(environment expansion), and a word with whitespace, quotes, backslashes or control characters
is double-quoted with C escapes. No value can end a line or start a directive.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from bootstrap.errors import UsageError

#: Container (and unit) names: a letter or digit, then letters, digits, ``_`` and ``-``. No dots:
#: the deployments ``NAME.0``/``NAME.1`` live beside the ``NAME`` symlink.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")

_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+\Z")
_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid system-container name, else raise :class:`UsageError`."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"invalid container name {name!r}",
            "use 1-64 letters, digits, '_' or '-', starting with a letter or digit (no dots)",
        )
    return name


def quote_word(word: str) -> str:
    """One argv word in systemd command-line syntax (``ExecStart=`` and friends)."""
    text = word.replace("%", "%%").replace("$", "$$")
    if text and _SAFE_WORD.match(text) and text != ";":
        return text
    out = []
    for ch in text:
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def exec_command(argv: Sequence[str], *, prefix: str = "") -> str:
    """A systemd command line running exactly ``argv``. ``prefix`` holds systemd's special
    executable prefixes (``-`` to ignore failure, ...). The executable must be absolute."""
    if not argv or not argv[0].startswith("/"):
        raise ValueError(f"executable must be an absolute path: {argv!r}")
    if prefix.strip("-@:+!") or len(prefix) > 3:
        raise ValueError(f"bad command prefix {prefix!r}")
    return prefix + " ".join(quote_word(w) for w in argv)


def stop_script(runtime: str, name: str, grace: int) -> list[str]:
    """argv of the stop command: ``runc kill NAME TERM``, wait up to ``grace`` seconds for the
    container to go, then ``runc kill --all NAME KILL``. A pid 1 that ignores SIGTERM (busybox
    ``sleep``) thus stops in ``grace`` seconds instead of the unit's stop timeout."""
    r, n = shlex.quote(runtime), shlex.quote(name)
    script = (
        f"{r} kill {n} TERM 2>/dev/null || exit 0; i=0; "
        f"while [ $i -lt {grace * 10} ]; do {r} kill {n} 0 2>/dev/null || exit 0; "
        "sleep 0.1; i=$((i+1)); done; "
        f"{r} kill --all {n} KILL 2>/dev/null; exit 0"
    )
    return ["/bin/sh", "-c", script]


def _slots(bundle: str) -> str:
    b = shlex.quote(bundle)
    return f"{b}.0 {b}.1 {b}.new"


def start_pre_script(runtime: str, name: str, bundle: str) -> list[str]:
    """argv of the start-pre command: ``runc delete --force NAME`` (a leftover container), then
    unmount the rootfs of every slot of ``bundle`` that is not the active one, and mount the
    active slot's overlay rootfs (``lower`` read-only, ``upper``/``work`` the slot's own) when
    the slot has a ``lower`` link and its rootfs is not mounted yet. A slot without ``lower``
    has a plain rootfs directory: nothing to mount. Fails (the unit does not start) when the
    mount fails."""
    r, n, b = shlex.quote(runtime), shlex.quote(name), shlex.quote(bundle)
    script = (
        f"{r} delete --force {n} >/dev/null 2>&1; "
        f"a=$(readlink -f {b}) || exit 1; "
        f'for s in {_slots(bundle)}; do [ "$(readlink -f "$s")" = "$a" ] && continue; '
        'mountpoint -q "$s/rootfs" 2>/dev/null && umount "$s/rootfs"; done; '
        '[ -L "$a/lower" ] || exit 0; mountpoint -q "$a/rootfs" && exit 0; '
        'rm -rf "$a/work/work" "$a/work/index"; '
        'exec mount -t overlay overlay -o "lowerdir=$(readlink -f "$a/lower"),'
        'upperdir=$a/upper,workdir=$a/work" "$a/rootfs"'
    )
    return ["/bin/sh", "-c", script]


def stop_post_script(runtime: str, name: str, bundle: str) -> list[str]:
    """argv of the stop-post command: ``runc delete --force NAME``, then unmount the rootfs of
    every slot of ``bundle`` that is mounted. Always succeeds."""
    r, n = shlex.quote(runtime), shlex.quote(name)
    script = (
        f"{r} delete --force {n} >/dev/null 2>&1; "
        f'for s in {_slots(bundle)}; do mountpoint -q "$s/rootfs" 2>/dev/null && '
        'umount "$s/rootfs"; done; exit 0'
    )
    return ["/bin/sh", "-c", script]


def default_service_template(*, host_network: bool, notify: bool, oneshot: bool = False) -> str:
    """The unit template of the built-in definition (variables resolved like any template).

    runc with cgroupfs; ``runc delete -f`` before start and after stop; an explicit stop
    (``$EXEC_STOP``); ``KillMode=mixed``, ``Delegate=yes``, ``Restart=on-failure``; ordered after
    ``network-online.target`` for a host-network container; ``Type=notify`` when asked.
    ``oneshot``: ``Type=oneshot`` + ``RemainAfterExit=yes`` (the start job ends when the
    command exited, the unit stays active (exited) when it exited 0), no ``Restart=`` and no
    extra ``SuccessExitStatus=`` (a command killed by a signal failed).
    ``TimeoutStartFailureMode=kill``: until the container is ready, ``runc run`` relays no
    signal to it, so a start that times out is killed at once instead of waiting out
    ``TimeoutStopSec`` for a SIGTERM that cannot arrive."""
    unit = [
        "# Written by bootstrap for the system container $NAME; `bootstrap update` rewrites it.",
        "[Unit]",
        "Description=System container $NAME ($IMAGE_NAME)",
    ]
    if host_network:
        unit += ["After=network-online.target", "Wants=network-online.target"]
    service = ["", "[Service]"]
    if oneshot:
        service += ["Type=oneshot", "RemainAfterExit=yes"]
    elif notify:
        service += ["Type=notify", "NotifyAccess=all"]
    else:
        service += ["Type=simple"]
    service += [
        "ExecStartPre=$EXEC_START_PRE",
        "ExecStart=$EXEC_START",
        "ExecStop=$EXEC_STOP",
        "ExecStopPost=$EXEC_STOP_POST",
        "KillMode=mixed",
        "Delegate=yes",
    ]
    if not oneshot:
        service += ["Restart=on-failure", "RestartSec=1", "SuccessExitStatus=137 143"]
    service += [
        "TimeoutStartSec=$TIMEOUT_START_SEC",
        "TimeoutStartFailureMode=kill",
        "TimeoutStopSec=$TIMEOUT_STOP_SEC",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(unit + service)
