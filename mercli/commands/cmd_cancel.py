"""`mercli cancel`: take queued jobs out of outgoing/ and processing/, into error/."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from mercli.cancel import CANCEL_STATES, CancelReport, Queued, cancel_jobs, find
from mercli.commands.options import common_options, read_ids
from mercli.errors import ExitCode, UsageError
from mercli.resend import Filters
from mercli.spool import Spool, recover


@click.command()
@common_options
@click.option("--target", metavar="NAME", help="Only jobs to this target.")
@click.option("--study", metavar="UID", help="Only this StudyInstanceUID.")
@click.option("--series", metavar="UID", help="Only this SeriesInstanceUID.")
@click.option("--reason", default="by request", show_default=True, help="Why, for error.json.")
@click.option("--dry-run", is_flag=True, help="List what would be cancelled; change nothing.")
@click.argument("ids", nargs=-1, metavar="[ID ... | -]")
def cancel(
    spool: Path,
    target: str | None,
    study: str | None,
    series: str | None,
    reason: str,
    dry_run: bool,
    ids: tuple[str, ...],
) -> None:
    """Cancel queued jobs: move them from outgoing/ or processing/ to error/.

    \b
    Selects jobs by ids given as arguments or one per line on stdin with `-` (`outgoing/ID`,
    `processing/ID` or plain `ID`) and by --target, --study, --series (all must match; at
    least one id or filter is needed). Each goes to error/ with error.json "cancelled:
    <reason>", who (user name, uid) and when; event `cancelled`.

    \b
    A job being sent right now is asked to stop (cancel.json in its claim): the dispatcher
    stops after the instance in flight, never mid-file, and moves it to error/ the same way.
    A job delivered whole before that goes to success/ as usual. A processing job being run
    now is not stopped (reported; exit 1). `mercli resend --from error ID` brings a cancelled
    job back, sending only what the target does not have yet.

    \b
    Prints `cancelled: outgoing/ID` or `cancel requested: ID (being sent by OWNER; stops
    after the current instance)` per job; with --dry-run the jobs that would be cancelled.
    Exit: 0 done, 1 an id not found or a job not cancelled, 2 usage, 4 spool unusable.

    \b
    Examples:
      mercli cancel --study 1.2.840.113619.2.55.3 --target pacs --reason "wrong PACS"
      mercli cancel outgoing/20261130T101500-3f2a
      mercli cancel --target pacs --dry-run
    """
    names = read_ids(ids, CANCEL_STATES)
    filters = Filters(study=study, series=series, ids=names)
    if names is None and filters == Filters() and target is None:
        raise UsageError("select jobs: give ids, `-`, or a filter (--target, --study, --series)")
    the_spool = Spool.open(spool)
    if not dry_run:
        recover(the_spool)  # a dead worker's claims go back to their queue before we list
    jobs, missing = find(the_spool, filters, target)
    for name in missing:
        click.echo(f"Error: no job {name} in outgoing/ or processing/", err=True)
    if dry_run:
        for job in jobs:
            click.echo(job.label + (f" (being sent by {job.owner})" if job.owner else ""))
        _summarize(jobs, None)
    else:
        report = cancel_jobs(the_spool, jobs, reason)
        for label in report.cancelled:
            click.echo(f"cancelled: {label}")
        for label, owner in report.requested:
            name = label.rpartition("/")[2]
            click.echo(
                f"cancel requested: {name} (being sent by {owner}; "
                "stops after the current instance)"
            )
        _summarize(jobs, report)
        if report.failed:
            sys.exit(ExitCode.SOME_FAILED)
    if missing:
        sys.exit(ExitCode.SOME_FAILED)


def _summarize(jobs: list[Queued], report: CancelReport | None) -> None:
    """Failures always; totals unless -q; all on stderr."""
    if report is not None:
        for label, why in report.failed:
            click.echo(f"Error: cannot cancel {label}: {why}", err=True)
    if not logging.getLogger("mercli").isEnabledFor(logging.INFO):
        return
    if report is None:
        click.echo(f"would cancel {len(jobs)} job(s)", err=True)
        return
    line = f"cancelled {len(report.cancelled)} of {len(jobs)} job(s)"
    if report.requested:
        line += f", {len(report.requested)} asked to stop"
    if report.vanished:
        line += f"; {report.vanished} finished or taken by another process first"
    click.echo(line, err=True)
