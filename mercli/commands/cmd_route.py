"""`mercli route`: complete series in incoming/ become jobs in outgoing/ or items in discard/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mercli.commands.options import common_options
from mercli.errors import ExitCode
from mercli.route.service import RouteService


@click.command()
@common_options
@click.option(
    "--rules",
    "rules_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The rules file (targets and rules; see `mercli rules check`).",
)
@click.option("--once", is_flag=True, help="Route every series complete now, then exit.")
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="With --once: route every series waiting, complete or not (scripts, tests, flushing).",
)
def route(spool: Path, rules_path: Path, once: bool, everything: bool) -> None:
    """Route complete series from spool/incoming/ by the rules.

    \b
    A series is complete `settle` (default 2s) after the association that sent it ended, if no
    instance came after, or `series_timeout` (default 60s) after its last instance. Then every
    matching rule applies: one job per target in spool/outgoing/ (instances hard-linked, the
    target's definition inside, so `mercli dispatch` needs no config), or spool/discard/ with
    the reason when a discard rule matched or none did. Instances that arrive while a series
    is routed are routed in a follow-up batch. Any number of routers can share a spool.

    As a service, the rules file is reloaded when it changes (an invalid edit is reported and
    the previous rules stay). Stops on SIGINT/SIGTERM after the series in hand.

    \b
    Examples:
      mercli route --rules /etc/mercli/rules.toml --spool /var/spool/mercli
      mercli route --rules rules.toml --once          # from cron or a script
      mercli route --rules rules.toml --once --all    # flush everything now
    """
    if everything and not once:
        raise click.UsageError("--all needs --once")
    service = RouteService(spool, rules_path)
    summary = service.run_once(everything=everything) if once else service.run_forever()
    click.echo(
        f"routed {summary.series} series ({summary.instances} instances): "
        f"{len(summary.jobs)} jobs, {len(summary.discarded)} discarded"
        + (f", {summary.failed} failed" if summary.failed else ""),
        err=True,
    )
    if once and summary.failed:  # a service stopped by a signal exits 0
        sys.exit(ExitCode.SOME_FAILED)
