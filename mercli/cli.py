"""The `mercli` command group: a thin click layer over the library.

Each subcommand lives in `mercli/commands/cmd_<name>.py`, parses its options, calls one library
function and lets typed `MercliError`s travel up to here, where they become `Error: ...` on
stderr and the exit code SPEC §2 documents. Nothing below this layer imports click.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from mercli import __version__
from mercli.commands import COMMAND_MODULES, load
from mercli.errors import ExitCode, MercliError

EPILOG = """\b
Exit codes:
  0  success, or nothing to do
  1  some items failed (the rest were done)
  2  usage error
  3  invalid config or rules
  4  spool unusable (permissions, disk)
  5  peer unreachable or refused

Every command takes --spool DIR (default: $MERCLI_SPOOL, else ./spool).
"""

log = logging.getLogger("mercli")


class CommandError(click.ClickException):
    """A library error on its way out, keeping the documented exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


class MercliGroup(click.Group):
    """Loads subcommands on demand; maps library errors to exit codes (tracebacks with -v)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return load(cmd_name) if cmd_name in COMMAND_MODULES else None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MercliError as exc:
            raise CommandError(str(exc), int(exc.exit_code)) from exc
        except OSError as exc:
            # An OSError that escaped the library is almost always the spool's filesystem.
            if log.isEnabledFor(logging.DEBUG):
                log.exception("unexpected filesystem error")
            raise CommandError(_describe_oserror(exc), int(ExitCode.SPOOL)) from exc


def _describe_oserror(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


@click.group(
    cls=MercliGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="mercli")
def cli() -> None:
    """mercli — a DICOM router as composable commands over one spool directory.

    \b
    receive  ->  spool/incoming/  ->  route  ->  spool/outgoing/  ->  dispatch
                                          \\->  spool/discard/
    Run each stage as a service or with --once from cron and scripts; run as many
    copies of each as the load needs.
    """


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="mercli")
    sys.exit(0)  # pragma: no cover - click.main exits itself
