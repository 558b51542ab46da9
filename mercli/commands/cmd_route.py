"""`mercli route`: complete series in incoming/ become jobs in outgoing/ or items in discard/."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mercli.commands.options import common_options
from mercli.errors import ExitCode
from mercli.names import printable
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
@click.option(
    "--complete-study",
    "study_uid",
    metavar="UID",
    help="Complete the held study with this StudyInstanceUID now; print what it made.",
)
def route(
    spool: Path, rules_path: Path, once: bool, everything: bool, study_uid: str | None
) -> None:
    """Route complete series from spool/incoming/ by the rules.

    \b
    A series is complete `settle` (default 2s) after the association that sent it ended, if no
    instance came after, or `series_timeout` (default 60s) after its last instance. Then every
    matching rule applies: one job per target in spool/outgoing/ (instances hard-linked, the
    target's definition inside, so `mercli dispatch` needs no config), or spool/discard/ with
    the reason when a discard rule matched or none did. Instances that arrive while a series
    is routed are routed in a follow-up batch. Any number of routers can share a spool.

    Series matching a study rule (trigger = "study") are held in spool/studies/ until their
    study is complete (every `require` met and `study_settle` passed, or `study_timeout`),
    then become one study job per target. --complete-study UID completes one study now and
    prints the ids of the jobs and discarded items it made (exit 1 if no such study is held).

    As a service, the rules file is reloaded when it changes (an invalid edit is reported and
    the previous rules stay). Stops on SIGINT/SIGTERM after the series in hand.

    \b
    Examples:
      mercli route --rules /etc/mercli/rules.toml --spool /var/spool/mercli
      mercli route --rules rules.toml --once          # from cron or a script
      mercli route --rules rules.toml --once --all    # flush everything now
      mercli route --rules rules.toml --complete-study 1.2.840.99.1
    """
    if everything and not once:
        raise click.UsageError("--all needs --once")
    service = RouteService(spool, rules_path)
    if study_uid is not None:
        _complete_study(service, study_uid)
        return
    summary = service.run_once(everything=everything) if once else service.run_forever()
    click.echo(
        f"routed {summary.series} series ({summary.instances} instances): "
        f"{len(summary.jobs)} jobs, {len(summary.discarded)} discarded"
        + (f", {summary.failed} failed" if summary.failed else ""),
        err=True,
    )
    if once and summary.failed:  # a service stopped by a signal exits 0
        sys.exit(ExitCode.SOME_FAILED)


def _complete_study(service: RouteService, uid: str) -> None:
    """--complete-study: the ids made, one per line; exit 1 when no held study matched."""
    done = service.complete_study(uid)
    if done is None or not (done.jobs or done.discarded):
        click.echo(f"Error: no held study {printable(uid)} ({service.spool.root})", err=True)
        sys.exit(ExitCode.SOME_FAILED)
    for item in done.jobs + done.discarded:
        click.echo(item)
    click.echo(f"{len(done.jobs)} study job(s), {len(done.discarded)} discarded", err=True)
