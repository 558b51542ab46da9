"""Typed errors of the library, each carrying the exit code SPEC §2 documents for it.

The library raises these; only the click layer turns them into process exits, so library code
stays usable from tests and from other Python programs.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes every mercli command uses (SPEC §2)."""

    OK = 0
    SOME_FAILED = 1
    USAGE = 2
    CONFIG = 3
    SPOOL = 4
    PEER = 5


class MercliError(Exception):
    """Base of all errors mercli reports to the user as `Error: <message>`."""

    exit_code: ExitCode = ExitCode.SOME_FAILED


class UsageError(MercliError):
    """The command line asks for something that makes no sense."""

    exit_code = ExitCode.USAGE


class ConfigError(MercliError):
    """A rules or config file is invalid; the message names file, line and rule."""

    exit_code = ExitCode.CONFIG


class SpoolError(MercliError):
    """The spool cannot be used: missing permissions, full disk, not a directory."""

    exit_code = ExitCode.SPOOL


class PeerError(MercliError):
    """A DICOM peer could not be reached or refused us."""

    exit_code = ExitCode.PEER


class ListenError(MercliError):
    """A receiver cannot listen (port in use, not permitted, a listener died at start).

    Exit 3: it is the configuration (port, address, privileges) that must change.
    """

    exit_code = ExitCode.CONFIG
