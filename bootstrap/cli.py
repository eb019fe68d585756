"""Command line: argparse, output and exit codes. Nothing else lives here.

Each command handler parses nothing itself: it calls one function of a stage API with typed
arguments and gets back a result object with ``to_json()`` (for ``--json``, printed on stdout as
one document) and ``to_text()`` (human text, printed on stdout). Diagnostics and progress go to
stderr. A :class:`~bootstrap.errors.BootstrapError` ends the process with its exit code and a
one-line message plus hint; anything else ends with exit 1 and "rerun with -v".
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

from bootstrap import __version__
from bootstrap.errors import BootstrapError, ExitCode, UsageError
from bootstrap.settings import Settings

log = logging.getLogger("bootstrap")


class Result(Protocol):
    """What every stage API call returns to the CLI."""

    def to_json(self) -> Any: ...

    def to_text(self) -> str: ...


Handler = Callable[[Settings, argparse.Namespace], Result]


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the usage code and a one-line message plus hint."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", f"see '{self.prog} --help'")


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

    return api.pull(s, a.ref, platform=a.platform)


def _import(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import archive

    return archive.import_command(s, a.path, name=a.name)


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

    return api.fsck(s)


def _checkout(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.image import unpack

    return unpack.checkout_command(s, a.ref, a.dest, copy=a.copy, devices=a.devices)


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

    return api.auto_update(s, a.names, dry_run=a.dry_run)


def _update(s: Settings, a: argparse.Namespace) -> Result:
    from bootstrap.deploy import api

    return api.update(s, a.name, a.ref, values=a.set, definition=a.definition, pull=not a.no_pull)


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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (the CLI contract of DESIGN.md)."""
    p = _Parser(prog="bootstrap", description="Pull images and run them as system containers.")
    p.add_argument("--version", action="version", version=f"bootstrap {__version__}")
    p.add_argument(
        "--store",
        metavar="DIR",
        help="image store (default $BOOTSTRAP_STORE or /var/lib/bootstrap)",
    )
    p.add_argument(
        "--state",
        metavar="DIR",
        help="deployments (default $BOOTSTRAP_STATE or /var/lib/bootstrap)",
    )
    p.add_argument(
        "--json", action="store_true", help="print results as one JSON document on stdout"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="count", default=0, help="more output (-vv: debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress or log lines")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("pull", help="pull an image into the store; print its manifest digest")
    c.add_argument("ref", metavar="REF")
    c.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform to select from an index"
    )

    c = sub.add_parser("import", help="import a docker-archive, oci-archive or plain rootfs tar")
    c.add_argument("path", metavar="PATH")
    c.add_argument("--name", metavar="REF", help="reference to store it under")

    sub.add_parser("images", help="list stored images")
    c = sub.add_parser("rmi", help="remove an image reference from the store")
    c.add_argument("ref", metavar="REF")
    sub.add_parser("gc", help="remove unreferenced blobs, cached layers and temp files")
    sub.add_parser("fsck", help="re-hash every blob and report damage (exit 4)")

    c = sub.add_parser("checkout", help="unpack a stored image's rootfs into a new directory")
    c.add_argument("ref", metavar="REF")
    c.add_argument("dest", metavar="DEST")
    c.add_argument(
        "--copy", action="store_true", help="independent writable copy (no shared inodes)"
    )
    c.add_argument("--devices", action="store_true", help="create device nodes (root only)")

    c = sub.add_parser("install", help="install an image as a system container (runc + systemd)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("ref", metavar="REF")
    c.add_argument("--set", action="append", metavar="K=V", help="template variable (repeatable)")
    c.add_argument("--definition", metavar="DIR", help="definition directory (default: image's)")
    c.add_argument("--no-start", action="store_true", help="enable the unit but do not start it")
    c.add_argument(
        "--unit-dir", metavar="DIR", help="where to write NAME.service (/etc/systemd/system)"
    )
    c.add_argument(
        "--auto-update",
        choices=("registry", "local", "off"),
        help="auto-update policy (default: the definition's, else off)",
    )
    c = sub.add_parser("update", help="update a system container; rolls back if it fails")
    c.add_argument("name", metavar="NAME")
    c.add_argument("ref", metavar="REF", nargs="?", help="new image (default: the current one)")
    c.add_argument("--set", action="append", metavar="K=V", help="template variable (repeatable)")
    c.add_argument("--definition", metavar="DIR", help="a new definition directory")
    c.add_argument("--no-pull", action="store_true", help="use the stored image, do not pull")
    c = sub.add_parser(
        "auto-update",
        help="update containers whose image moved (policy registry/local); roll back failures",
    )
    c.add_argument("names", metavar="NAME", nargs="*", help="only these (default: all)")
    c.add_argument("--dry-run", action="store_true", help="look up, report, change nothing")
    c = sub.add_parser("rollback", help="switch a system container to its previous deployment")
    c.add_argument("name", metavar="NAME")
    c = sub.add_parser("uninstall", help="stop and remove a system container")
    c.add_argument("name", metavar="NAME")
    sub.add_parser("list", help="list system containers")
    c = sub.add_parser("status", help="show a system container's deployments and state")
    c.add_argument("name", metavar="NAME")
    c = sub.add_parser("up", help="first-boot provisioning from a node manifest (YAML)")
    c.add_argument("manifest", metavar="MANIFEST")
    c = sub.add_parser("demo", help="bring up a throwaway systemd node here and provision it")
    c.add_argument("--down", action="store_true", help="power the demo node off and remove it")
    return p


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity < 2 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _report_error(err: BootstrapError, as_json: bool) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, run the command, print its result; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args_list
    verbose = False
    try:
        args = build_parser().parse_args(args_list)
        verbose = args.verbose > 0
        verbosity = -1 if args.quiet else args.verbose
        _setup_logging(verbosity)
        settings = Settings.resolve(
            args.store,
            args.state,
            json=args.json,
            verbosity=verbosity,
            progress=sys.stderr.isatty() and verbosity >= 0 and not args.json,
        )
        if "set" in args:
            args.set = _parse_set(args.set)
        result = COMMANDS[args.command](settings, args)
        if args.json:
            json.dump(result.to_json(), sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        else:
            text = result.to_text()
            if text:  # the result itself; -q silences only progress and log lines
                print(text)
        # a report may carry a failure it also describes (auto-update's rolled-back/failed)
        return int(getattr(result, "exit_code", ExitCode.OK))
    except BootstrapError as err:
        if verbose:
            traceback.print_exc()
        _report_error(err, as_json)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("bootstrap: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, details behind -v
        if verbose:
            traceback.print_exc()
        print(
            f"bootstrap: unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}"
            " (rerun with -v for details)",
            file=sys.stderr,
        )
        return int(ExitCode.FAILURE)


if __name__ == "__main__":
    sys.exit(main())
