"""The one exception hierarchy and the process exit codes.

Every error the tool raises on purpose is a :class:`BootstrapError`: a one-line ``message`` saying
what went wrong and a ``hint`` saying what to do about it. Each subclass fixes the exit code that
``bootstrap`` ends with. This module imports nothing from the package, so every stage may use it.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; part of the CLI contract (scripts test them)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    REGISTRY = 3
    INTEGRITY = 4
    SYSTEMD = 5
    BUSY = 6
    TRUST = 7


class BootstrapError(Exception):
    """Root of all deliberate errors.

    ``message`` is one line describing the failure (no trailing period needed); ``hint`` is one
    line telling the user what to try. Both are plain text with no newlines: they are flattened so
    a hostile input cannot forge extra output lines.
    """

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = _one_line(message)
        self.hint = _one_line(hint)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def with_context(self, context: str) -> BootstrapError:
        """Return a copy of this error (same class, hint) with ``context: `` before the message."""
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)
        BootstrapError.__init__(err, f"{context}: {self.message}", self.hint)
        return err


class UsageError(BootstrapError):
    """Bad input from the user: arguments, references, YAML, definitions, ``--set`` values."""

    exit_code = ExitCode.USAGE


class RegistryError(BootstrapError):
    """A registry or the network failed: unreachable, refused, unauthorized, not found, timeout."""

    exit_code = ExitCode.REGISTRY


class IntegrityError(BootstrapError):
    """Content is not what it claims: digest or size mismatch, hostile layer, damaged store."""

    exit_code = ExitCode.INTEGRITY


class SystemdError(BootstrapError):
    """systemd or the container runtime failed: a unit did not start, D-Bus refused, runc failed."""

    exit_code = ExitCode.SYSTEMD


class BusyError(BootstrapError):
    """A lock is held by another process and waiting was not allowed or timed out."""

    exit_code = ExitCode.BUSY


class TrustError(BootstrapError):
    """The signature policy refused an image: no signature, unknown key, a signature for another
    identity or manifest, or a ``reject`` requirement. Nothing of the image is tagged."""

    exit_code = ExitCode.TRUST


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
