"""`mercli dispatch`: send the jobs in outgoing/ to their targets."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mercli.commands.options import common_options
from mercli.dispatch.helpers import default_count
from mercli.dispatch.service import DispatchService
from mercli.errors import ExitCode


@click.command()
@common_options
@click.option("--once", is_flag=True, help="Try every job that is due now once, then exit.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Jobs sent at the same time (threads; one association each).",
)
@click.option(
    "--edit-helpers",
    type=click.IntRange(0, 64),
    default=None,
    help="Processes that de-identify half of each large series beside a worker "
    "(forked at start; default: one fewer than the usable cores; 0: none).",
)
def dispatch(spool: Path, once: bool, workers: int, edit_helpers: int | None) -> None:
    """Send the jobs in spool/outgoing/ to their targets.

    \b
    Needs no config: each job carries its target (from the rules file route used).
    DICOM targets get one association per job, instances in InstanceNumber order, each in the
    transfer syntax it was received in (converted to uncompressed only if the target accepts
    nothing else); every C-STORE status is checked and only what the target does not have
    yet is sent again. Folder targets get DEST/<job id>/, written under a temporary name and
    renamed when complete.

    \b
    A failed job is retried after retry_delay, growing by retry_backoff up to
    retry_max_delay; after max_attempts or max_age it goes to spool/error/ with the reason
    (`mercli resend --from error` sends it again). A target that is down does not hold up
    the others. Any number of dispatchers can share a spool: each job is sent by one.

    \b
    Exit (--once): 0 all sent, 1 some jobs failed or wait for a retry, 5 a target was
    unreachable or refused the association.

    \b
    Examples:
      mercli dispatch --spool /var/spool/mercli --workers 8
      mercli dispatch --once          # from cron or a script
    """
    if edit_helpers is None:
        edit_helpers = default_count(workers)
    summary = DispatchService(spool, workers, edit_helpers).run(once=once)
    click.echo(
        f"dispatched {summary.delivered} job(s), {summary.retried} to retry, "
        f"{summary.failed} failed"
        + (f", {summary.cancelled} cancelled" if summary.cancelled else "")
        + (
            f"; unreachable: {', '.join(sorted(summary.unreachable))}"
            if summary.unreachable
            else ""
        ),
        err=True,
    )
    if not once:
        return  # a service stopped by a signal exits 0; its problems are in the log
    if summary.unreachable:
        sys.exit(ExitCode.PEER)
    if summary.retried or summary.failed:
        sys.exit(ExitCode.SOME_FAILED)
