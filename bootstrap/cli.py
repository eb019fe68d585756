"""Command line: argparse, output and exit codes. Nothing else lives here.

Each command handler parses nothing itself: it calls one function of a stage API with typed
arguments and gets back a result object with ``to_json()`` (for ``--json``, printed on stdout as
one document) and ``to_text()`` (human text, printed on stdout). Diagnostics and progress go to
stderr. A :class:`~bootstrap.errors.BootstrapError` ends the process with its exit code and a
one-line message plus hint; anything else ends with exit 1 and "rerun with -v".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from bootstrap import __version__
from bootstrap.errors import BootstrapError, ExitCode, UsageError
from bootstrap.progress import StderrHandler
from bootstrap.settings import Settings

if TYPE_CHECKING:
    from bootstrap.image.api import ImageVerifier

log = logging.getLogger("bootstrap")


class Result(Protocol):
    """What every stage API call returns to the CLI."""

    def to_json(self) -> Any: ...

    def to_text(self) -> str: ...


Handler = Callable[[Settings, argparse.Namespace], Result]


class _Parser(argparse.ArgumentParser):
    """argparse that raises the usage error (exit 2): one line naming the subcommand, a hint
    pointing at its ``--help``. Help text keeps its line breaks (examples)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]  # "bootstrap pull" -> "pull"; top level: ""
        raise UsageError(
            f"{command}: {message}" if command else message, f"see '{self.prog} --help'"
        )


def add_global_options(p: argparse.ArgumentParser, *, in_command: bool = False) -> None:
    """Add the global options to ``p``: the one place they are defined.

    They are added to the main parser (``in_command=False``: with their defaults) and to every
    subcommand's parser (``in_command=True``: defaults suppressed, so an option given before the
    command is not overwritten when it is absent after it). ``bootstrap --json list`` and
    ``bootstrap list --json`` are the same command. A new global option is one more
    ``add_argument`` here (and a field in :class:`~bootstrap.settings.Settings`)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_command else value

    p.add_argument(
        "--store",
        metavar="DIR",
        default=default(None),
        help="image store (default $BOOTSTRAP_STORE or /var/lib/bootstrap)",
    )
    p.add_argument(
        "--state",
        metavar="DIR",
        default=default(None),
        help="deployments (default $BOOTSTRAP_STATE or /var/lib/bootstrap)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print results as one JSON document on stdout",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        # counted apart after the command, so that "-v pull -v" is -vv: see verbosity()
        dest="verbose_in_command" if in_command else "verbose",
        default=default(0),
        help="more output (-vv: debug)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="no progress or log lines",
    )
    p.add_argument(
        "--signature-policy",
        metavar="PATH",
        default=default(None),
        help="containers-policy.json(5) to verify images against (/etc/containers/policy.json)",
    )
    p.add_argument(
        "--registries.d",
        dest="registries_d",
        metavar="DIR",
        default=default(None),
        help="registries.d(5) directory: where signatures are (/etc/containers/registries.d)",
    )
    p.add_argument(
        "--insecure-policy",
        action="store_true",
        default=default(False),
        help="do not verify image signatures (says so on stderr)",
    )


def verbosity(args: argparse.Namespace) -> int:
    """-1 with ``-q``, else the number of ``-v`` given before and after the command.
    Both ``-q`` and ``-v``: UsageError."""
    verbose = int(args.verbose) + int(getattr(args, "verbose_in_command", 0))
    if args.quiet and verbose:
        raise UsageError("-q and -v exclude each other", "give one of them")
    return -1 if args.quiet else verbose


def _seconds(text: str) -> float:
    """An argparse type: seconds between 0 and an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: expected seconds between 0 and 3600")
    return value


def _parse_set(values: Sequence[str] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE", "e.g. --set PORT=8080")
        result[key] = value
    return result


# ---- handlers: one stage call each -------------------------------------------------------------


def _pull(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api
    from bootstrap.trust.verify import Verifier

    return api.pull(
        s, a.ref, platform=a.platform, verifier=Verifier.from_settings(s), jitter=a.jitter
    )


def _push(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api

    return api.push(s, a.ref, a.dest)


def _import(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api
    from bootstrap.trust.verify import Verifier

    verifier = Verifier.from_settings(s)
    return api.import_archive(s, a.path, name=a.name, admit=verifier.check_archive)


def _images(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api

    return api.images(s)


def _rmi(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api

    return api.rmi(s, a.ref)


def _gc(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api

    return api.gc(s)


def _fsck(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api

    return api.fsck(s, repair=a.repair)


def _checkout(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import api

    def verifier() -> ImageVerifier:
        from bootstrap.trust.verify import Verifier

        return Verifier.from_settings(s)

    return api.checkout(
        s,
        a.ref,
        a.dest,
        hardlink=a.hardlink,
        devices=a.devices,
        policy=a.pull,
        verifier=verifier,
    )


def _install(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    return api.install(
        s,
        a.name,
        a.ref,
        values=a.set,
        definition=a.definition,
        start=not a.no_start,
        unit_dir=a.unit_dir,
        auto_update=a.auto_update,
    )


def _auto_update(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    return api.auto_update(s, a.names, dry_run=a.dry_run, retry_failed=a.retry_failed)


def _update(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    if a.node:
        given = [
            flag
            for flag, value in (
                ("NAME", a.name),
                ("REF", a.ref),
                ("--set", a.set),
                ("--definition", a.definition),
                ("--auto-update", a.auto_update),
                ("--init", a.init),
            )
            if value
        ]
        if given:
            raise UsageError(
                f"update --node: {', '.join(given)} cannot be given with --node",
                "'update --node' updates every container to what its reference names now; "
                "'update NAME [REF] [--set K=V]' changes one",
            )
        return api.update_node(s, dry_run=a.dry_run, pull=not a.no_pull)
    if a.name is None:
        raise UsageError(
            "update: NAME or --node is required", "'bootstrap list' shows the installed containers"
        )
    if a.dry_run:
        raise UsageError("update: --dry-run goes with --node", "bootstrap update --node --dry-run")
    return api.update(
        s,
        a.name,
        a.ref,
        values=a.set,
        definition=a.definition,
        pull=not a.no_pull,
        auto_update=a.auto_update,
    )


def _rollback(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    return api.rollback(s, a.name)


def _uninstall(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    return api.uninstall(s, a.name)


def _list(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    return api.list_containers(s)


def _status(s: Settings, a: argparse.Namespace) -> Result:
    if a.node:
        if a.name is not None:
            raise UsageError(
                "status: give either NAME or --node, not both",
                "'bootstrap status NAME' shows a container, 'bootstrap status --node' the node",
            )
        from bootstrap.node import up

        return up.node_status(s)
    if a.name is None:
        raise UsageError(
            "status: NAME or --node is required",
            "'bootstrap list' shows the installed containers",
        )
    from bootstrap.deploy import api

    return api.status(s, a.name)


def _up(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.node import up

    return up.up(s, a.manifest)


def _demo(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.demo import demo

    return demo.demo(s, down=a.down)


COMMANDS: dict[str, Handler] = {
    "pull": _pull,
    "push": _push,
    "import": _import,
    "images": _images,
    "rmi": _rmi,
    "gc": _gc,
    "fsck": _fsck,
    "checkout": _checkout,
    "install": _install,
    "update": _update,
    "auto-update": _auto_update,
    "rollback": _rollback,
    "uninstall": _uninstall,
    "list": _list,
    "status": _status,
    "up": _up,
    "demo": _demo,
}


def _command(
    sub: Any, name: str, summary: str, examples: Sequence[str], details: str = ""
) -> argparse.ArgumentParser:
    """A subcommand parser: ``summary`` in ``bootstrap --help``, ``summary`` and ``details`` on
    top of its own help, ``examples`` below it, and the global options accepted after it."""
    c: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
        epilog="example"
        + ("s" if len(examples) > 1 else "")
        + ":\n"
        + "\n".join(f"  bootstrap {e}" for e in examples),
    )
    add_global_options(c, in_command=True)
    return c


_REF_HELP = "image reference, e.g. docker.io/library/busybox:1.36 or NAME@sha256:DIGEST"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (the CLI contract of DESIGN.md)."""
    p = _Parser(
        prog="bootstrap",
        description="Pull images and run them as system containers.",
        epilog="Global options are accepted before or after the command.\n"
        "Run 'bootstrap COMMAND --help' for a command's arguments and examples.",
    )
    p.add_argument("--version", action="version", version=f"bootstrap {__version__}")
    add_global_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = _command(
        sub,
        "pull",
        "pull an image into the store; print its manifest digest",
        ["pull docker.io/library/busybox:1.36", "pull --platform linux/arm64 quay.io/org/app:v2"],
        "A short name (no registry) is looked up through registries.conf's aliases and\n"
        "unqualified-search-registries, as Podman does.",
    )
    c.add_argument("ref", metavar="REF", help=_REF_HELP)
    c.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform to select from an index"
    )
    c.add_argument(
        "--jitter",
        metavar="SECONDS",
        type=_seconds,
        default=0.0,
        help="first wait a random 0..SECONDS (nodes started at once spread their pulls)",
    )

    c = _command(
        sub,
        "push",
        "push a stored image to a registry; print the pushed manifest digest",
        [
            "push local/app:1 docker://registry.example.com:5000/site/app:1",
            "push registry.example.com/site/app:1",
        ],
        "Credentials, CA certificates (certs.d) and insecure registries come from the same\n"
        "files as for pull. Blobs the registry has already are not sent; the manifest goes\n"
        "last. No signature is made or copied (sign it with skopeo or cosign).",
    )
    c.add_argument("ref", metavar="REF", help="a stored reference, as 'bootstrap images' lists")
    c.add_argument(
        "dest",
        metavar="DEST",
        nargs="?",
        help="docker://HOST[:PORT]/NAME:TAG or HOST[:PORT]/NAME:TAG (default: REF)",
    )

    c = _command(
        sub,
        "import",
        "import a docker-archive, oci-archive or plain rootfs tar",
        ["import busybox.tar", "import --name example.org/rootfs:1 rootfs.tar.gz"],
    )
    c.add_argument(
        "path",
        metavar="PATH",
        help="a tar file (docker save, oci-archive, or a root filesystem; gzip/zstd accepted)",
    )
    c.add_argument("--name", metavar="REF", help="reference to store it under")

    _command(sub, "images", "list stored images", ["images", "images --json"])
    c = _command(
        sub,
        "rmi",
        "remove an image reference from the store",
        ["rmi docker.io/library/busybox:1.36"],
        "The blobs stay until 'bootstrap gc'.",
    )
    c.add_argument("ref", metavar="REF", help="a stored reference, as 'bootstrap images' lists")
    _command(sub, "gc", "remove unreferenced blobs, cached layers and temp files", ["gc"])
    c = _command(
        sub,
        "fsck",
        "re-hash every blob, check the layer cache against its records; damage is exit 4",
        ["fsck", "fsck --json", "fsck --repair"],
    )
    c.add_argument(
        "--repair", action="store_true", help="extract damaged cached layers again from their blobs"
    )

    c = _command(
        sub,
        "checkout",
        "unpack an image's rootfs into a new directory",
        [
            "checkout docker.io/library/busybox:1.36 /srv/busybox-root",
            "checkout --pull never --hardlink docker.io/library/busybox:1.36 /srv/read-only-view",
        ],
        "An image not yet stored is pulled first (--pull missing, the default): each layer\n"
        "is inflated into the layer cache as it downloads, then the rootfs is composed.",
    )
    c.add_argument("ref", metavar="REF", help=_REF_HELP)
    c.add_argument("dest", metavar="DEST", help="directory to create; must not exist yet")
    how = c.add_mutually_exclusive_group()
    how.add_argument(
        "--copy",
        action="store_true",
        help="files of its own: reflinks where supported, else copies (the default)",
    )
    how.add_argument(
        "--hardlink",
        action="store_true",
        help="share inodes with the layer cache (fast; writes through it change the cache)",
    )
    c.add_argument("--devices", action="store_true", help="create device nodes (root only)")
    c.add_argument(
        "--pull",
        choices=("missing", "always", "never"),
        default="missing",
        help="pull REF when it is not stored (missing, the default), always, or never",
    )

    c = _command(
        sub,
        "install",
        "install an image as a system container (runc + systemd)",
        [
            "install ocid registry.example.org/ocid:1.0",
            "install --set PORT=8080 --no-start web docker.io/library/nginx:1.25",
        ],
        "The definition (manifest.json, config.json.template, service.template) comes from\n"
        "--definition, or from the image's /exports directory.",
    )
    c.add_argument("name", metavar="NAME", help="container and unit name (NAME.service)")
    c.add_argument("ref", metavar="REF", help=_REF_HELP + " (pulled when not stored)")
    c.add_argument("--set", action="append", metavar="K=V", help="template variable (repeatable)")
    c.add_argument("--definition", metavar="DIR", help="definition directory (default: image's)")
    c.add_argument("--no-start", action="store_true", help="enable the unit but do not start it")
    c.add_argument(
        "--init",
        choices=("auto", "always", "never"),
        help="an init as the container's pid 1 (default: the definition's, auto); = --set INIT=",
    )
    c.add_argument(
        "--unit-dir", metavar="DIR", help="where to write NAME.service (/etc/systemd/system)"
    )
    c.add_argument(
        "--auto-update",
        choices=("registry", "local", "off"),
        help="auto-update policy (default: the definition's, else off)",
    )
    c = _command(
        sub,
        "update",
        "update a system container, or the node as one transaction; rolls back if it fails",
        [
            "update ocid",
            "update ocid registry.example.org/ocid:1.1",
            "update --node --dry-run",
            "update --node",
        ],
        "--node: every container's reference is pulled again; those that moved are updated\n"
        "together with the running containers ordered after them (the kubelet after the CRI\n"
        "daemon): staged, started in order, judged by the node's health (CRI Status, health\n"
        "checks), committed all or rolled back all (exit 5).",
    )
    c.add_argument(
        "name",
        metavar="NAME",
        nargs="?",
        help="an installed container, as 'bootstrap list' shows",
    )
    c.add_argument("ref", metavar="REF", nargs="?", help="new image (default: the current one)")
    c.add_argument("--set", action="append", metavar="K=V", help="template variable (repeatable)")
    c.add_argument("--definition", metavar="DIR", help="a new definition directory")
    c.add_argument("--no-pull", action="store_true", help="use the stored image, do not pull")
    c.add_argument(
        "--node",
        action="store_true",
        help="every container whose reference moved, with its dependants, as one transaction",
    )
    c.add_argument(
        "--dry-run", action="store_true", help="with --node: look up and report, change nothing"
    )
    c.add_argument(
        "--auto-update",
        choices=("registry", "local", "off"),
        help="set the auto-update policy (alone: only that changes)",
    )
    c.add_argument(
        "--init",
        choices=("auto", "always", "never"),
        help="an init as the container's pid 1 (default: the definition's, auto); = --set INIT=",
    )
    c = _command(
        sub,
        "auto-update",
        "update containers whose image moved (policy registry/local) as one node transaction",
        ["auto-update --dry-run", "auto-update ocid kubelet", "auto-update --retry-failed"],
        "A container takes part when its policy (install --auto-update, or its definition)\n"
        "is registry (the tag moved in the registry) or local (the stored tag moved). Those\n"
        "that moved are updated together with the running containers ordered after them,\n"
        "judged by the node's health, committed all or rolled back all (exit 5). A digest\n"
        "that was rolled back is skipped until the tag moves again.",
    )
    c.add_argument("names", metavar="NAME", nargs="*", help="only these (default: all)")
    c.add_argument("--dry-run", action="store_true", help="look up, report, change nothing")
    c.add_argument(
        "--retry-failed",
        action="store_true",
        help="also try a digest that was rolled back before",
    )
    c = _command(
        sub,
        "rollback",
        "switch a system container to its previous deployment",
        ["rollback ocid"],
    )
    c.add_argument("name", metavar="NAME", help="an installed container, as 'bootstrap list' shows")
    c = _command(sub, "uninstall", "stop and remove a system container", ["uninstall ocid"])
    c.add_argument("name", metavar="NAME", help="an installed container, as 'bootstrap list' shows")
    _command(sub, "list", "list system containers", ["list", "list --json"])
    c = _command(
        sub,
        "status",
        "show a system container's deployments and state",
        ["status ocid", "status --json kubelet", "status --node"],
    )
    c.add_argument(
        "name", metavar="NAME", nargs="?", help="an installed container, as 'bootstrap list' shows"
    )
    c.add_argument(
        "--node",
        action="store_true",
        help="the node instead: its last first boot (containers, boot chain with timings), an "
        "interrupted node update, digests auto-update skips",
    )
    c = _command(
        sub,
        "up",
        "first-boot provisioning from a node manifest (YAML)",
        ["up /etc/bootstrap/node.yaml"],
        "Installs and starts the manifest's containers in order; a rerun resumes where a\n"
        "previous run stopped. The format is described in docs/node-manifest.md.",
    )
    c.add_argument("manifest", metavar="MANIFEST", help="the node manifest, a YAML file")
    c = _command(
        sub,
        "demo",
        "bring up a throwaway systemd node here and provision it",
        ["demo", "demo --down"],
    )
    c.add_argument("--down", action="store_true", help="power the demo node off and remove it")
    return p


class _NoUrllib3Retries(logging.Filter):
    """urllib3's "Retrying (...)" warnings: bootstrap reports retries itself (bootstrap/http.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


def _setup_logging(verbosity: int, tty: bool) -> StderrHandler:
    """Log records to stderr: warnings with -q, INFO normally, DEBUG with -vv. Transient
    records (retries) show as a status line on a TTY, as lines with -v, once per host on a
    pipe or file, not at all with -q."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity < 2 else logging.DEBUG
    if verbosity < 0:
        mode = "hide"
    elif verbosity > 0:
        mode = "line"
    else:
        mode = "status" if tty else "once"
    handler = StderrHandler(mode)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.getLogger("urllib3.connectionpool").addFilter(_NoUrllib3Retries())
    return handler


def _erase_status() -> None:
    """Erase a retry status line before the result or the error is printed."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, StderrHandler):
            handler.clear()


def _report_error(err: BootstrapError, as_json: bool) -> None:
    with _writing():
        _print_error(err, as_json)


def _print_error(err: BootstrapError, as_json: bool) -> None:
    print(f"bootstrap: error: {err.message}", file=sys.stderr)
    if err.hint:
        print(f"bootstrap: hint: {err.hint}", file=sys.stderr)
    if as_json:
        doc: dict[str, Any] = {
            "error": err.message,
            "hint": err.hint,
            "exit_code": int(err.exit_code),
        }
        result = getattr(err, "result", None)  # an error may carry a report (fsck's findings)
        if result is not None and hasattr(result, "to_json"):
            doc["result"] = result.to_json()
        print(json.dumps(doc))


SIGPIPE_STATUS = 128 + signal.SIGPIPE
"""The status of a command whose output pipe was closed (``bootstrap images | head -1``): the
shell's status of a process killed by SIGPIPE, as git and podman end (docs/decisions.md)."""


def _closed_pipe(as_process: bool) -> int:
    """The reader of stdout (or stderr) went away: nothing more can be said to anyone. As the
    process (``argv`` None: the console script), end the way git and podman do, killed by
    SIGPIPE with nothing printed (the shell shows 141); called in-process, return 141."""
    if as_process:
        with contextlib.suppress(OSError, ValueError):
            # the interpreter's final flush must not fail again on the broken pipe
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.dup2(devnull, sys.stderr.fileno())
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    return SIGPIPE_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, run the command, print its result; return the exit code.
    Output to a pipe whose reader is gone ends the process quietly as if killed by SIGPIPE
    (status 141; see :func:`_closed_pipe`). As the process (``argv`` None), 022 is added to
    the umask: whatever the caller's umask, nothing bootstrap creates is writable by others
    (the store and the state are 0700 on their own, see :mod:`bootstrap.fsutil`), and the
    process ends through :func:`_end_process` once the command is done."""
    if argv is None:  # the command: nothing it creates is group- or world-writable
        os.umask(os.umask(0o022) | 0o022)
    try:
        code = _main(argv)
    except _OutputClosed:
        return _closed_pipe(argv is None)
    if argv is None:
        _end_process(code)
    return code


def _end_process(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown of every imported
    module (a fifth of a short command's CPU: a pull's ~60 ms of 0.3 s): the exit handlers
    run (logging's flush, weakref finalizers removing temp dirs), stdout and stderr are
    flushed, then ``os._exit``. Returns (the caller exits normally) when another non-daemon
    thread still runs, which a normal exit waits for, or when a flush fails."""
    import atexit
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code)


class _OutputClosed(Exception):
    """The reader of stdout or stderr went away while the CLI wrote the result or an error."""


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """Around the CLI's own writes to stdout/stderr: a broken pipe there is
    :class:`_OutputClosed` (a quiet end), unlike a broken pipe inside a stage (an error)."""
    try:
        yield
    except BrokenPipeError as exc:
        raise _OutputClosed() from exc


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    verbose = debug = False
    try:
        args = build_parser().parse_args(args_list)
        level = verbosity(args)
        verbose, debug = level > 0, level > 1
        _setup_logging(level, sys.stderr.isatty())
        settings = Settings.resolve(
            args.store,
            args.state,
            json=args.json,
            verbosity=level,
            progress=sys.stderr.isatty() and level >= 0 and not args.json,
            signature_policy=args.signature_policy,
            registries_d=args.registries_d,
            insecure_policy=args.insecure_policy,
        )
        if "set" in args:
            args.set = _parse_set(args.set)
            if getattr(args, "init", None):  # --init MODE is --set INIT=MODE
                args.set["INIT"] = args.init
        result = COMMANDS[args.command](settings, args)
        _erase_status()
        with _writing():
            if args.json:
                json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
                sys.stdout.write("\n")
            else:
                text = result.to_text()
                if text:  # the result itself; -q silences only progress and log lines
                    print(text)
            sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        # a report may carry a failure it also describes (auto-update's rolled-back/failed)
        return int(getattr(result, "exit_code", ExitCode.OK))
    except _OutputClosed:
        raise  # main() ends quietly
    except BootstrapError as err:
        _erase_status()
        if debug:  # a deliberate error's message says it all; its stack is for debugging
            traceback.print_exc()
        _report_error(err, as_json)
        return int(err.exit_code)
    except KeyboardInterrupt:
        _erase_status()
        with _writing():
            print("bootstrap: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a file the stages did not expect to fail: name it, one line
        _erase_status()
        if verbose:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        _report_error(
            BootstrapError(
                f"{exc.strerror or type(exc).__name__}{where}",
                "check that path, its permissions and free space (rerun with -v for details)",
            ),
            as_json,
        )
        return int(ExitCode.FAILURE)
    except Exception as exc:  # the last resort: one line, details behind -v
        _erase_status()
        if verbose:
            traceback.print_exc()
        with _writing():
            print(
                f"bootstrap: unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}"
                " (rerun with -v for details)",
                file=sys.stderr,
            )
            if as_json:
                print(
                    json.dumps(
                        {
                            "error": f"unexpected error: {type(exc).__name__}: {exc}",
                            "hint": "rerun with -v for details",
                            "exit_code": int(ExitCode.FAILURE),
                        }
                    )
                )
                sys.stdout.flush()
        return int(ExitCode.FAILURE)


if __name__ == "__main__":
    sys.exit(main())
